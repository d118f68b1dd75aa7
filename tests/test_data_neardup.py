import random

import numpy as np

from tunelab.data.neardup import exact_jaccard, lsh_params, near_duplicates, shingles

BASE = "the flight to boston was late again and the crew at the gate was rude to everyone"


def test_shingles_ignore_case_and_punctuation():
    h, off = shingles([BASE, BASE.upper() + "!!!", "something else"])
    a, b = set(h[off[0]:off[1]].tolist()), set(h[off[1]:off[2]].tolist())
    assert a == b and len(a) > 10
    assert exact_jaccard(h, off, np.array([[0, 2]]))[0] < 0.1


def test_small_edits_group_and_different_texts_do_not():
    words = BASE.split()
    edited = " ".join(words[:5] + ["terribly"] + words[5:])
    other = "my new phone arrived today and the screen is already cracked which is sad"
    res = near_duplicates([BASE, edited, other, "", "ok"], threshold=0.7)
    assert res.group.tolist() == [0, 0, 2, 3, 4]
    assert res.pairs.tolist() == [[0, 1]]


def test_recall_and_precision_on_planted_copies():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(20)) for _ in range(2000)]
    planted = []
    for k in range(100):
        src = rng.randrange(2000)
        ws = docs[src].split()
        ws[rng.randrange(20)] = rng.choice(vocab)
        planted.append((src, len(docs)))
        docs.append(" ".join(ws))
    res = near_duplicates(docs, threshold=0.7)
    found = {tuple(p) for p in res.pairs.tolist()}
    hits = sum(res.group[s] == res.group[c] for s, c in planted)
    assert hits >= 98
    assert len(found) <= len(planted) + 2


def test_lsh_params_keep_recall_at_threshold():
    for t in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(t, 64)
        assert bands * rows == 64
        assert 1 - (1 - t ** rows) ** bands >= 0.98
