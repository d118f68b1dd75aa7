import random

from tunelab.config import AugmentConfig, PrepareOptions
from tunelab.data.augment import EmbeddingNeighbours, Paraphraser, augment, delete_words, swap_words
from tunelab.data.dataset import load_split
from tunelab.data.prepare import prepare

from conftest import make_rows, write_csv


def test_eda_operations():
    rng = random.Random(0)
    words = "the flight to boston was late again".split()
    swapped = swap_words(words, 0.1, rng)
    assert sorted(swapped) == sorted(words) and swapped != words
    deleted = delete_words(words, 0.3, rng)
    assert 0 < len(deleted) < len(words) and all(w in words for w in deleted)
    assert delete_words(["one"], 0.9, rng) == ["one"]


def test_embedding_neighbours_are_related_words():
    nb = EmbeddingNeighbours("builtin:minilm-l6")
    near = nb.of("terrible")
    assert len(near) == 5 and "terrible" not in near
    assert nb.of("zzzqqq") == []


def test_augment_keeps_labels_counts_and_filters():
    rows = make_rows(120)
    cfg = AugmentConfig(enabled=True, ops=["swap", "delete", "synonym"], per_example=1, p=0.2)
    new, rep = augment(rows, cfg, seed=0)
    assert rep["originals"] == 120 and rep["generated"] == {"swap": 120, "delete": 120, "synonym": 120}
    assert sum(rep["added"].values()) == len(new) > 0
    assert rep["rejected_by_label_filter"] + rep["duplicates_or_empty"] + len(new) == 360
    originals = {r["text"] for r in rows}
    assert all(r["text"] not in originals and r["augmented"] in ("swap", "delete", "synonym") for r in new)
    unfiltered, rep2 = augment(rows, cfg.model_copy(update={"filter": "none"}), seed=0)
    assert rep2["rejected_by_label_filter"] == 0 and len(unfiltered) >= len(new)


def test_paraphraser_generates_one_text_per_input():
    out = Paraphraser("tiny-llama", batch_size=2)(["great service today", "the flight was late again"])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_prepare_augments_train_split_only(tmp_path):
    src = write_csv(tmp_path / "in.csv", make_rows(150))
    meta = prepare(str(src), tmp_path / "ds", PrepareOptions(augment={"enabled": True, "ops": ["swap"]}))
    aug = meta["report"]["augmentation"]
    assert meta["report"]["rows_kept"] == 150  # originals only; augmented rows are counted apart
    train = load_split(tmp_path / "ds", "train")
    assert sum("augmented" in r for r in train) == sum(aug["added"].values()) > 0
    assert meta["splits"]["train"] == 120 + sum(aug["added"].values())
    for split in ("validation", "test"):
        assert not any("augmented" in r for r in load_split(tmp_path / "ds", split))


def test_label_filter_is_cross_fitted():
    """Texts with no label signal: a filter fit on the same rows would pass copies of its own training
    texts (memorised); the cross-fitted one judges each by a model that never saw it -> about chance."""
    from tunelab.data.augment import label_filter

    rng = random.Random(0)
    rows = [{"text": f"w{i} x{rng.randrange(10**6)}", "label": rng.choice("ab")} for i in range(400)]
    keep = label_filter(rows)([r["text"] for r in rows], [r["label"] for r in rows], list(range(len(rows))))
    assert 0.3 < keep.mean() < 0.7
