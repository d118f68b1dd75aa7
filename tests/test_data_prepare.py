import json

import pytest

from tunelab.config import PrepareOptions
from tunelab.data.dataset import load_meta, load_split
from tunelab.data.prepare import prepare
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


def _prep(tmp_path, rows, name="ds", **opts):
    src = write_csv(tmp_path / f"{name}.csv", rows, columns=tuple(rows[0].keys()))
    return prepare(str(src), tmp_path / name, PrepareOptions(**opts))


def test_near_duplicates_are_dropped_or_kept_in_one_split(tmp_path):
    rows = make_rows(90)
    base = "the flight to albuquerque was late again and the crew at the gate was rude to everyone"
    rows += [{"text": base + suffix, "label": "negative"} for suffix in ("", " today", " !!", " really")]
    meta = _prep(tmp_path, rows, "drop")
    assert meta["report"]["dropped"]["near_duplicate"] == 3
    groups = [json.loads(x) for x in (tmp_path / "drop" / "near_duplicates.jsonl").read_text().splitlines()]
    assert any(len(g["lines"]) == 4 for g in groups)
    meta = _prep(tmp_path, rows, "group", dedup={"near_action": "group"})
    assert "near_duplicate" not in meta["report"]["dropped"]
    where = {s for s, split_rows in _all(tmp_path / "group").items() for r in split_rows if "albuquerque" in r["text"]}
    assert len(where) == 1  # the whole group sits in one split


def test_near_duplicates_with_conflicting_labels_stay_together(tmp_path):
    rows = make_rows(60)
    base = "the flight to albuquerque was late again and the crew at the gate was rude to everyone"
    rows += [{"text": base, "label": "negative"}, {"text": base + " lol", "label": "positive"},
             {"text": base + " ok", "label": "neutral"}]
    meta = _prep(tmp_path, rows)
    assert meta["report"]["duplicates"]["near_conflicting_groups"] == 1
    where = {s for s, split_rows in _all(tmp_path / "ds").items() for r in split_rows if "albuquerque" in r["text"]}
    assert len(where) == 1


def test_strict_names_file_and_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine", "label": "a"}\n{"text": "broken\n{"text": "", "label": "a"}\n')
    with pytest.raises(UserError, match=r"in.jsonl:2: bad_json"):
        prepare(str(src), tmp_path / "ds", PrepareOptions(strict=True))


def test_drop_rate_limit_names_top_reasons(tmp_path):
    rows = make_rows(20) + [{"text": "", "label": "positive"}] * 10
    with pytest.raises(UserError, match=r"33.3% of 30 rows.*empty_text=10"):
        _prep(tmp_path, rows)
    meta = _prep(tmp_path, rows, max_drop_rate=0.5)
    assert meta["report"]["dropped"]["empty_text"] == 10


def test_existing_split_column_and_unknown_split(tmp_path):
    rows = [dict(r, split=["train", "dev", "test"][i % 3]) for i, r in enumerate(make_rows(30))]
    rows.append({"text": "where do i go", "label": "neutral", "split": "holdout"})
    meta = _prep(tmp_path, rows, split_column="split")
    assert meta["splits"] == {"train": 10, "validation": 10, "test": 10}
    assert meta["report"]["dropped"] == {"unknown_split": 1}
    with pytest.raises(UserError, match="no split column 'fold'"):
        _prep(tmp_path, rows, "x", split_column="fold")


def test_labels_normalised_mapped_and_checked(tmp_path):
    rows = [{"text": r["text"], "label": {"positive": " POS ", "negative": "Negative"}.get(r["label"], "meh")}
            for r in make_rows(30)]
    meta = _prep(tmp_path, rows, max_drop_rate=0.5,
                 clean={"lowercase_labels": True, "label_map": {"pos": "positive"},
                        "labels": ["positive", "negative"]})
    assert meta["labels"] == ["negative", "positive"]
    assert meta["report"]["dropped"] == {"unknown_label": 10}


def test_pii_is_redacted_and_counted(tmp_path):
    rows = make_rows(30)
    rows[0] = {"text": "mail jane@example.com or call +1 415 555 0132", "label": rows[0]["label"]}
    meta = _prep(tmp_path, rows)
    assert meta["report"]["pii"] == {"email": 1, "phone": 1}
    texts = {r["text"] for s in _all(tmp_path / "ds").values() for r in s}
    assert "mail <EMAIL> or call <PHONE>" in texts
    meta = _prep(tmp_path, rows, "raw", pii={"enabled": False})
    assert meta["report"]["pii"] == {}


def test_nasty_files_count_every_row(tmp_path):
    good = make_rows(40)
    # a NUL byte inside a CSV row, a stray quote, a 10 MB row, an all-empty label column elsewhere
    lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in good]
    lines.insert(5, "bad\x00row,positive")
    lines.insert(9, 'a "stray quote,negative')
    lines.append("x" * 10_000_000 + ",positive")
    src = tmp_path / "nasty.csv"
    src.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    meta = prepare(str(src), tmp_path / "ds", PrepareOptions(clean={"max_chars": 100_000}))
    rep = meta["report"]
    assert rep["rows_read"] == rep["rows_kept"] + sum(rep["dropped"].values())
    assert rep["dropped"]["too_long"] == 1
    assert (tmp_path / "ds" / "rejected.jsonl").stat().st_size < 10_000
    assert rep["rows_kept"] >= 40
    empty_labels = tmp_path / "nolabels.csv"
    write_csv(empty_labels, [{"text": r["text"], "label": ""} for r in good])
    with pytest.raises(UserError, match="no usable rows.*missing_label=40"):
        prepare(str(empty_labels), tmp_path / "e")
    truncated = tmp_path / "cut.jsonl"
    truncated.write_text("\n".join(json.dumps(r) for r in good) + '\n{"text": "cut off mid-')
    meta = prepare(str(truncated), tmp_path / "t")
    assert meta["report"]["dropped"] == {"bad_json": 1} and meta["report"]["rows_kept"] == 40


def test_semicolon_csv_is_sniffed(tmp_path):
    src = tmp_path / "semi.csv"
    src.write_text("text;label\n" + "\n".join(f"{r['text']}, with a comma;{r['label']}" for r in make_rows(30)))
    meta = prepare(str(src), tmp_path / "ds")
    assert meta["report"]["rows_kept"] == 30 and meta["labels"] == ["negative", "neutral", "positive"]


def test_saved_datasets_dir_with_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = make_rows(60)
    dd = DatasetDict({"train": Dataset.from_list(rows[:40]), "test": Dataset.from_list(rows[40:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    meta = prepare(str(tmp_path / "saved"), tmp_path / "ds", PrepareOptions(split_column="split"))
    assert meta["splits"] == {"train": 40, "validation": 0, "test": 20}
    with pytest.raises(UserError, match="not a saved `datasets` dataset"):
        prepare(str(tmp_path), tmp_path / "x")


def test_sft_from_chatterbot_sharegpt_alpaca_and_messages(tmp_path):
    meta = prepare("builtin:chatterbot", tmp_path / "chat", PrepareOptions(task="sft", max_drop_rate=0.7))
    assert meta["task"] == "sft" and meta["fields"] == ["messages"] and meta["labels"] == []
    row = load_split(tmp_path / "chat", "train")[0]
    assert row["messages"][0]["role"] == "user" and row["messages"][1]["role"] == "assistant"
    assert meta["report"]["rows_read"] == meta["report"]["rows_kept"] + sum(meta["report"]["dropped"].values())
    rows = [
        {"conversations": [{"from": "human", "value": "hi there, how do I reset my router?"},
                           {"from": "gpt", "value": "Hold the reset button\n\nfor ten seconds."}]},
        {"instruction": "Summarise the ticket", "input": "My bill doubled this month.", "output": "Billing issue."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "wizard", "content": "?"}, {"role": "assistant", "content": "!"}]},
        {"text": "no conversation at all"},
    ] * 1
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    meta = prepare(str(src), tmp_path / "mixed", PrepareOptions(task="sft", max_drop_rate=0.6, val_ratio=0,
                                                                test_ratio=0))
    assert meta["report"]["dropped"] == {"no_assistant_turn": 1, "unknown_role": 1, "no_conversation": 1}
    train = load_split(tmp_path / "mixed", "train")
    assert len(train) == 3
    router = next(r for r in train if "router" in r["messages"][0]["content"])
    assert router["messages"][1] == {"role": "assistant", "content": "Hold the reset button\n\nfor ten seconds."}
    alpaca = next(r for r in train if "Summarise" in r["messages"][0]["content"])
    assert alpaca["messages"][0]["content"] == "Summarise the ticket\n\nMy bill doubled this month."


def test_text_task_from_txt_file_and_folder(tmp_path):
    (tmp_path / "corpus.txt").write_text("First doc line one.\nline two.\n\nSecond document.\n\n\n\nThird one\n")
    meta = prepare(str(tmp_path / "corpus.txt"), tmp_path / "t", PrepareOptions(task="text", val_ratio=0.3,
                                                                               test_ratio=0.3))
    assert meta["task"] == "text" and meta["report"]["rows_kept"] == 3 and meta["class_balance"] == {}
    docs = {r["text"] for s in _all(tmp_path / "t").values() for r in s}
    assert "First doc line one.\nline two." in docs
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(5):
        (folder / f"d{i}.txt").write_text(f"document number {i} about topic {i * 7}\nwith two lines")
    meta = prepare(str(folder), tmp_path / "f", PrepareOptions(task="text", dedup={"near": False}))
    assert meta["report"]["rows_kept"] == 5


def test_ner_from_conll_and_spans(tmp_path):
    conll = tmp_path / "news.conll"
    conll.write_text("-DOCSTART- O\n\nApple B-ORG\nrose O\n3% O\n\nTim B-PER\nCook I-PER\nsaid O\n\n"
                     "broken\n\nshares O\nof O\nMSFT I-TICKER\n")
    meta = prepare(str(conll), tmp_path / "c", PrepareOptions(task="ner", val_ratio=0, test_ratio=0,
                                                              max_drop_rate=0.5))
    assert meta["report"]["dropped"] == {"bad_conll_line": 1}
    assert meta["labels"] == ["O", "B-ORG", "B-PER", "I-PER", "B-TICKER"]
    rows = {" ".join(r["tokens"]): r["tags"] for r in load_split(tmp_path / "c", "train")}
    assert rows["Tim Cook said"] == ["B-PER", "I-PER", "O"]
    assert rows["shares of MSFT"] == ["O", "O", "B-TICKER"]  # a dangling I- starts an entity
    assert meta["report"]["steps"]["clean.bio_repaired"] == 1

    spans = tmp_path / "spans.jsonl"
    spans.write_text("\n".join(json.dumps(r) for r in [
        {"text": "Nvidia paid $5 million to Jane Doe.", "entities": [
            {"start": 0, "end": 6, "label": "ORG"}, {"start": 12, "end": 22, "label": "MONEY"},
            {"start": 26, "end": 34, "label": "PER"}]},
        {"text": "Misaligned spans here", "entities": [{"start": 2, "end": 5, "label": "X"}]},
        {"tokens": ["a", "b"], "tags": ["O"]},
    ]))
    meta = prepare(str(spans), tmp_path / "s", PrepareOptions(task="ner", val_ratio=0, test_ratio=0,
                                                              max_drop_rate=0.9))
    assert meta["report"]["dropped"] == {"misaligned_span": 1, "tag_count_mismatch": 1}
    row = load_split(tmp_path / "s", "train")[0]
    assert row["tokens"][:6] == ["Nvidia", "paid", "$", "5", "million", "to"]
    assert row["tags"] == ["B-ORG", "O", "B-MONEY", "I-MONEY", "I-MONEY", "O", "B-PER", "I-PER", "O"]


def test_token_length_limits_use_the_tokenizer(tmp_path):
    from tunelab.models import load_tokenizer

    rows = make_rows(40)
    tok = load_tokenizer("tiny-bert")
    counts = [len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
    lo, hi = sorted(counts)[5], sorted(counts)[-5]
    meta = _prep(tmp_path, rows, max_drop_rate=0.9, dedup={"near": False},
                 clean={"min_tokens": lo, "max_tokens": hi, "tokenizer": "tiny-bert"})
    dropped = meta["report"]["dropped"]
    assert dropped.get("too_short_tokens", 0) == sum(n < lo for n in counts)
    assert dropped.get("too_long_tokens", 0) == sum(n > hi for n in counts)
    assert meta["report"]["rows_kept"] == sum(lo <= n <= hi for n in counts)
