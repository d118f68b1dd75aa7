"""The streaming, parallel preparation writes the in-memory pipeline's dataset dir byte for byte."""

import filecmp
import json
import os
import random

import numpy as np
import pytest

from tunelab.config import PrepareOptions
from tunelab.data import stream
from tunelab.data.prepare import prepare
from tunelab.errors import UserError

from conftest import make_rows, write_csv

FILES = ("dataset.json", "train.jsonl", "validation.jsonl", "test.jsonl", "rejected.jsonl", "near_duplicates.jsonl",
         "conflicts.json")


def messy_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows with everything the pipeline decides on: exact and near duplicates (some with other labels), PII,
    mojibake, full-width text, empty texts and labels, Chinese text."""
    rng = random.Random(seed)
    rows = make_rows(n, seed=seed)
    extra = []
    for r in rng.sample(rows, n // 10):  # exact duplicates, a third with another label
        label = r["label"] if rng.random() < 0.67 else rng.choice(["positive", "negative", "neutral"])
        extra.append({"text": "  " + r["text"].upper() + " ", "label": label})
    for r in rng.sample(rows, n // 10):  # near duplicates: one word changed, a few with another label
        words = r["text"].split()
        words[rng.randrange(len(words))] = rng.choice(["great", "awful", "fine", "而且"])
        label = r["label"] if rng.random() < 0.8 else rng.choice(["positive", "negative"])
        extra.append({"text": " ".join(words) + "!", "label": label})
    extra += [{"text": "call me at +1 415 555 0133 or mail a.b@example.com", "label": "neutral"},
              {"text": "Ã©tÃ© was great", "label": "positive"}, {"text": "ＡＢＣ full width ！", "label": "neutral"},
              {"text": "质量很好，物流也快！ 推荐购买", "label": "positive"}, {"text": "", "label": "positive"},
              {"text": "no label", "label": ""}, {"text": "质量很好，物流也快！ 推荐购买。", "label": "negative"}]
    rows += extra
    rng.shuffle(rows)
    return rows


def assert_same_dirs(a, b) -> None:
    for name in FILES:
        assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(stream, "BATCH_ROWS", 37)  # many batches, each through the pool


@pytest.mark.parametrize("opts", [{}, {"seed": 5, "dedup": {"near_action": "group"}, "pii": {"enabled": False}},
                                  {"task": "text", "dedup": {"near": False}}, {"dedup": {"exact": False}}],
                         ids=["default", "group", "text", "near-only"])
def test_streaming_with_workers_equals_in_memory(tmp_path, small_batches, opts):
    src = write_csv(tmp_path / "in.csv", messy_rows(400))
    a = prepare(str(src), tmp_path / "a", PrepareOptions(**opts), streaming=False)
    b = prepare(str(src), tmp_path / "b", PrepareOptions(**opts), streaming=True, workers=2)
    assert a == b
    duplicates = a["report"]["duplicates"]
    assert duplicates["exact_dropped"] or not PrepareOptions(**opts).dedup.exact
    assert opts or duplicates["exact_conflicting_groups"]
    assert duplicates["near_groups"] or opts.get("task") == "text"
    assert_same_dirs(tmp_path / "a", tmp_path / "b")
    assert not list(tmp_path.glob(".b.tunelab-scratch-*"))  # the scratch folder is gone


def test_streaming_equals_in_memory_on_chat_and_a_split_column(tmp_path, small_batches):
    opts = PrepareOptions(task="sft", max_drop_rate=1)
    prepare("builtin:chatterbot", tmp_path / "a", opts, streaming=False)
    prepare("builtin:chatterbot", tmp_path / "b", opts, streaming=True, workers=2)
    assert_same_dirs(tmp_path / "a", tmp_path / "b")
    rows = [{**r, "split": random.Random(i).choice(["train", "dev", "test", "??"])}
            for i, r in enumerate(messy_rows(200, seed=1))]
    src = write_csv(tmp_path / "split.csv", rows, columns=("text", "label", "split"))
    opts = PrepareOptions(split_column="split", max_drop_rate=1)
    prepare(str(src), tmp_path / "c", opts, streaming=False)
    meta = prepare(str(src), tmp_path / "d", opts, streaming=True, workers=1)
    assert meta["report"]["dropped"]["unknown_split"] > 10
    assert_same_dirs(tmp_path / "c", tmp_path / "d")


def test_streaming_stops_at_the_first_malformed_row_like_in_memory(tmp_path, small_batches):
    lines = ["text,label"] + [f"row number {i} is fine,positive" for i in range(200)]
    lines[150] = "a,b,c"  # line 151: wrong field count
    lines[180] = "x,y,z"
    src = tmp_path / "in.csv"
    src.write_text("\n".join(lines) + "\n")
    messages = []
    for streaming in (False, True):
        with pytest.raises(UserError) as err:
            prepare(str(src), tmp_path / f"o{streaming}", PrepareOptions(strict=True), streaming=streaming, workers=2)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and ":151: wrong_field_count" in messages[0]
    assert not list(tmp_path.glob(".*tunelab-scratch-*"))


def test_streaming_refusals(tmp_path):
    src = write_csv(tmp_path / "in.csv", make_rows(50))
    with pytest.raises(UserError, match="at least 1"):
        prepare(str(src), tmp_path / "o", workers=0)
    with pytest.raises(UserError, match="streaming preparation covers"):
        prepare(str(src), tmp_path / "o", PrepareOptions(max_rows=10), streaming=True)
    meta = prepare(str(src), tmp_path / "o", PrepareOptions(max_rows=10))  # the in-memory pipeline takes it
    assert meta["report"]["rows_kept"] == 10
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["report"]["rows_read"] == 50


def test_a_worker_that_dies_fails_the_run_with_one_message(tmp_path, small_batches, monkeypatch):
    rows = make_rows(300)
    rows[200]["text"] = "this row kills its worker"
    src = write_csv(tmp_path / "in.csv", rows)
    call = stream.BatchWorker.__call__

    def dying(self, batch):  # inherited by the forked workers
        if any("kills its worker" in str(r.fields.get("text")) for r in batch):
            os._exit(1)
        return call(self, batch)

    monkeypatch.setattr(stream.BatchWorker, "__call__", dying)
    with pytest.raises(UserError, match="worker process died"):
        prepare(str(src), tmp_path / "o", streaming=True, workers=2)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tunelab-*"))


def test_streaming_refuses_an_input_without_usable_rows_like_in_memory(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("text,label\n,positive\nno label,\n")
    messages = []
    for streaming in (False, True):
        with pytest.raises(UserError) as err:
            prepare(str(src), tmp_path / f"o{streaming}", streaming=streaming, workers=2)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "no usable rows" in messages[0]


# Pinned outputs of the dict-based split and the stable-sort band pairs these replaced (the equality tests above run
# the same code on both sides, so they would not notice a change here).
SPLIT_ROWS = [["c", None], [None, None], ["a", None], ["a", 0], ["b", 6], [None, 1], [None, 9], ["a", None],
              ["a", None], [None, 3], ["a", None], ["b", 2], ["a", None], ["b", 9], ["b", 8], ["a", None], ["b", None],
              [None, None], [None, None], [None, 3], ["b", None], ["b", 4], [None, None], [None, 1], ["a", None],
              ["b", None], ["b", None], [None, 10], ["a", None], ["c", 5], [None, None], [None, 1], ["c", None],
              ["a", 11], ["c", None], [None, 6], ["c", 7], ["c", 1], [None, 4], ["b", None]]
SPLIT_EXPECTED = {"train": [39, 28, 0, 22, 33, 35, 30, 14, 9, 7, 34, 18, 15, 19, 4, 11, 36, 24, 3, 26, 17],
                  "validation": [37, 2, 13, 6, 23, 8, 31, 5, 16, 20, 32], "test": [27, 12, 29, 10, 38, 1, 25, 21]}
PAIRS_EXPECTED = [[0, 11], [0, 19], [0, 28], [1, 2], [1, 4], [1, 9], [1, 10], [1, 17], [1, 21], [1, 24], [2, 6],
                  [2, 10], [2, 12], [2, 13], [2, 24], [2, 27], [2, 29], [4, 8], [4, 18], [4, 22], [5, 11], [5, 13],
                  [5, 15], [5, 24], [5, 27], [6, 7], [6, 16], [6, 17], [6, 21], [6, 23], [7, 8], [7, 9], [7, 10],
                  [7, 16], [7, 27], [8, 23], [9, 18], [9, 23], [9, 28], [10, 20], [11, 12], [11, 14], [11, 16],
                  [11, 18], [11, 19], [11, 26], [12, 22], [13, 20], [13, 26], [13, 29], [15, 16], [17, 21], [17, 25],
                  [18, 19], [20, 25], [20, 26], [21, 26], [22, 25], [25, 28], [25, 29]]


def test_split_and_band_pairs_give_what_the_earlier_implementations_gave():
    from tunelab.data.neardup import candidate_pairs
    from tunelab.data.split import group_split

    rows = [{"label": label, **({"_group": g} if g is not None else {}), "i": i}
            for i, (label, g) in enumerate(SPLIT_ROWS)]
    out = group_split(rows, "label", 0.2, 0.2, 3)
    assert {name: [r["i"] for r in part] for name, part in out.items()} == SPLIT_EXPECTED
    sig = np.random.default_rng(0).integers(0, 4, size=(30, 8)).astype(np.uint32)
    sig[3] = 0xFFFFFFFF  # no shingles: left out
    assert candidate_pairs(sig, 4, 2).tolist() == PAIRS_EXPECTED
