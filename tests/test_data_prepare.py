import json

import pytest

from tunelab.config import PrepareOptions
from tunelab.data.prepare import load_meta, load_split, prepare
from tunelab.errors import UserError

from conftest import make_rows, write_csv


def _all(ds):
    return {s: load_split(ds, s) for s in ("train", "validation", "test")}


def test_accounting_adds_up_and_rejects_are_written(tmp_path):
    rows = make_rows(60)
    rows += [{"text": "   ", "label": "positive"}, {"text": "no label here", "label": ""},
             {"text": rows[0]["text"].upper(), "label": rows[0]["label"]},  # duplicate (case-insensitive)
             {"text": "same words", "label": "positive"}, {"text": "same  words", "label": "negative"}]
    src = write_csv(tmp_path / "in.csv", rows)
    meta = prepare(str(src), tmp_path / "ds")
    rep = meta["report"]
    assert rep["rows_read"] == 65
    assert rep["rows_read"] == rep["rows_kept"] + sum(rep["dropped"].values())
    assert rep["dropped"] == {"conflicting_label_duplicate": 2, "empty_text": 1, "missing_label": 1,
                              "duplicate": 1}
    rejected = [json.loads(line) for line in (tmp_path / "ds" / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 5
    assert {r["line"] for r in rejected} == {62, 63, 64, 65, 66}  # header is line 1
    assert sum(meta["splits"].values()) == rep["rows_kept"] == 60
    conflicts = json.loads((tmp_path / "ds" / "conflicts.json").read_text())
    assert conflicts[0]["labels"] == ["negative", "positive"]


def test_split_is_stratified_seeded_and_leak_free(tmp_path):
    rows = make_rows(300) + make_rows(30)  # the second copy duplicates 30 rows exactly
    src = write_csv(tmp_path / "in.csv", rows)
    a = prepare(str(src), tmp_path / "a", PrepareOptions(seed=3))
    b = prepare(str(src), tmp_path / "b", PrepareOptions(seed=3))
    c = prepare(str(src), tmp_path / "c", PrepareOptions(seed=4))
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]
    assert a["splits"] == {"train": 240, "validation": 30, "test": 30}
    for split in ("validation", "test"):
        assert a["class_balance"][split] == {"negative": 10, "neutral": 10, "positive": 10}
    texts = {s: {r["text"] for r in rows} for s, rows in _all(tmp_path / "a").items()}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])


def test_max_rows_samples_exactly(tmp_path):
    src = write_csv(tmp_path / "in.csv", make_rows(300))
    meta = prepare(str(src), tmp_path / "ds", PrepareOptions(max_rows=101))
    assert meta["report"]["rows_kept"] == 101
    assert meta["report"]["dropped"]["not_sampled"] == 199


def test_unknown_column_lists_the_columns(tmp_path):
    rows = [{"body": r["text"], "label": r["label"]} for r in make_rows(10)]
    src = write_csv(tmp_path / "in.csv", rows, columns=("body", "label"))
    with pytest.raises(UserError, match=r"no text column 'text'; columns are: body, label"):
        prepare(str(src), tmp_path / "ds")
    meta = prepare(str(src), tmp_path / "ds", PrepareOptions(text_column="body"))
    assert meta["report"]["rows_kept"] == 10 and meta["source"]["text_column"] == "body"


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        prepare(str(tmp_path / "missing.csv"), tmp_path / "ds")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        prepare(str(empty), tmp_path / "ds")
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(UserError, match="no usable rows"):
        prepare(str(header_only), tmp_path / "ds")
    (tmp_path / "x.xlsx").touch()
    with pytest.raises(UserError, match="unknown file type"):
        prepare(str(tmp_path / "x.xlsx"), tmp_path / "ds")
    with pytest.raises(UserError, match="not a dataset dir"):
        load_meta(tmp_path)


def test_jsonl_bad_lines_are_counted_with_line_numbers(tmp_path):
    good = [json.dumps(r) for r in make_rows(30)]
    lines = good[:10] + ['{"text": "truncated', "[1, 2]", '{"text": 5, "label": "positive"}',
                         '{"text": {"a": 1}, "label": "positive"}'] + good[10:]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    meta = prepare(str(src), tmp_path / "ds")
    assert meta["report"]["rows_read"] == 34
    assert meta["report"]["dropped"] == {"bad_json": 1, "not_an_object": 1, "text_wrong_type": 1}
    assert meta["report"]["rows_kept"] == 31  # the number 5 is kept as the text "5"
    rejected = [json.loads(x) for x in (tmp_path / "ds" / "rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [11, 12, 14]


def test_csv_quotes_newlines_bom_crlf_and_invalid_utf8(tmp_path):
    body = ('text,label\r\n"hello, ""world""\r\nsecond line",positive\r\n'
            "plain text,negative\r\n").encode("utf-8")
    src = tmp_path / "in.csv"
    src.write_bytes(b"\xef\xbb\xbf" + body + b"caf\xe9 broken,neutral\r\n")
    meta = prepare(str(src), tmp_path / "ds")
    assert meta["report"]["rows_read"] == 3 and meta["report"]["rows_kept"] == 3
    assert meta["report"]["repaired"]["invalid_utf8_replaced"] == 1
    texts = {r["text"] for s in _all(tmp_path / "ds").values() for r in s}
    assert 'hello, "world" second line' in texts
    assert "caf\ufffd broken" in texts


def test_tsv_and_parquet(tmp_path):
    import pandas as pd

    rows = make_rows(30)
    pd.DataFrame(rows).to_parquet(tmp_path / "in.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "in.tsv", sep="\t", index=False)
    a = prepare(str(tmp_path / "in.parquet"), tmp_path / "a")
    b = prepare(str(tmp_path / "in.tsv"), tmp_path / "b")
    assert a["fingerprint"] == b["fingerprint"]
    assert a["report"]["rows_kept"] == 30


def test_builtin_tweets_know_their_columns(tmp_path):
    meta = prepare("builtin:tweets-sentiment", tmp_path / "ds", PrepareOptions(max_rows=500))
    assert meta["labels"] == ["negative", "neutral", "positive"]
    assert meta["source"]["label_column"] == "sentiment"
    rep = meta["report"]
    assert rep["rows_read"] == 38158
    assert rep["rows_read"] == rep["rows_kept"] + sum(rep["dropped"].values())
    assert rep["dropped"]["duplicate"] > 0 and rep["repaired"]["invalid_utf8_replaced"] > 0
