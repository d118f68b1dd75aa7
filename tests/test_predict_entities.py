"""NER applied to raw text: the word splitter, BIO decoding, `predict_texts` / `predict_file` on an NER model
dir, and `tunelab predict` on one."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.data.rows import to_bio
from tunelab.data.words import split_words
from tunelab.errors import UserError
from tunelab.predict import predict_file, predict_texts
from tunelab.tasks.token_classification import bio_entities

OLD_RULE = re.compile(r"\w+|[^\w\s]")  # the split NER data was prepared with before CJK awareness


def words(text):
    return [w for w, _, _ in split_words(text)]


# ---- the word splitter -----------------------------------------------------------------------------------
def test_split_words_english_keeps_words_and_splits_punctuation():
    text = "Falcon Rock's revenue: $5.2 billion (FRE)."
    assert words(text) == ["Falcon", "Rock", "'", "s", "revenue", ":", "$", "5", ".", "2", "billion", "(", "FRE",
                           ")", "."]


def test_split_words_chinese_is_one_word_per_character():
    text = "腾讯控股今天在香港上涨3%"
    assert words(text) == ["腾", "讯", "控", "股", "今", "天", "在", "香", "港", "上", "涨", "3", "%"]


def test_split_words_mixed_scripts_and_offsets():
    text = "  Apple与腾讯 rose 12.5%，トヨタ와 삼성전자가 fell\tlate\n"
    got = split_words(text)
    assert [w for w, _, _ in got] == ["Apple", "与", "腾", "讯", "rose", "12", ".", "5", "%", "，", "ト", "ヨ", "タ",
                                      "와", "삼", "성", "전", "자", "가", "fell", "late"]
    assert all(text[a:b] == w for w, a, b in got)
    assert [a for _, a, _ in got] == sorted(a for _, a, _ in got)
    assert split_words("") == [] and split_words(" \t\n") == []


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1_ .,$%-\t\n\u00e9\u0301") + list("腾讯港ト와삼々〇，")), max_size=30))
def test_split_words_is_finer_than_the_old_rule(text):
    new = split_words(text)
    assert all(text[a:b] == w and w.strip() == w and w for w, a, b in new)
    bounds = {a for _, a, _ in new} | {b for _, _, b in new}
    old = list(OLD_RULE.finditer(text))
    assert all(m.start() in bounds and m.end() in bounds for m in old)  # every old boundary stays one
    assert "".join(w for w, _, _ in new) == "".join(m.group(0) for m in old)  # the same characters covered


def test_to_bio_uses_the_splitter_so_chinese_spans_align():
    text = "腾讯控股今天在香港上涨3%"
    tokens, tags, spaced = to_bio(text, [{"start": 0, "end": 4, "label": "ORG"}, {"start": 7, "end": 9,
                                                                                  "label": "LOC"}])
    assert tokens == words(text) and not any(spaced)
    assert tags[:5] == ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "O"] and tags[7:9] == ["B-LOC", "I-LOC"]
    # spans on the old boundaries still align; a span inside a word still does not
    tokens, tags, spaced = to_bio("Acme Corp. rose", [{"start": 0, "end": 9, "label": "ORG"}])
    assert tags == ["B-ORG", "I-ORG", "O", "O"] and spaced == [False, True, False, True]
    assert to_bio("Acme Corp. rose", [{"start": 1, "end": 9, "label": "ORG"}]) == "misaligned_span"


# ---- BIO decoding -----------------------------------------------------------------------------------------
def spans(tags, probs=None):
    return [(e["type"], e["start"], e["end"]) for e in bio_entities(tags, probs or [1.0] * len(tags))]


def test_bio_decoding_basic_and_scores():
    found = bio_entities(["B-ORG", "I-ORG", "O", "B-PER"], [0.9, 0.6, 1.0, 0.3333333333])
    assert found == [{"type": "ORG", "start": 0, "end": 2, "score": 0.75},
                     {"type": "PER", "start": 3, "end": 4, "score": 0.333333}]
    assert spans([]) == [] and spans(["O", "O"]) == []


def test_bio_decoding_is_lenient_like_seqeval():
    assert spans(["I-ORG", "I-ORG", "O"]) == [("ORG", 0, 2)]  # I- without B- starts an entity
    assert spans(["O", "I-PER"]) == [("PER", 1, 2)]
    assert spans(["B-ORG", "I-PER", "I-PER"]) == [("ORG", 0, 1), ("PER", 1, 3)]  # a type change starts another
    assert spans(["B-ORG", "B-ORG", "I-ORG"]) == [("ORG", 0, 1), ("ORG", 1, 3)]  # B- always starts one
    assert spans(["O", "B-MONEY", "I-MONEY"]) == [("MONEY", 1, 3)]  # an entity at the end is closed
    assert spans(["B-GPE-LOC", "I-GPE-LOC"]) == [("GPE-LOC", 0, 2)]  # types may contain "-"


def test_bio_decoding_agrees_with_seqeval():
    from seqeval.metrics.sequence_labeling import get_entities

    for tags in (["I-A", "I-A", "B-A", "I-B", "O", "I-B"], ["B-A", "O", "I-A", "I-A", "B-B"], ["O", "I-A"]):
        assert spans(tags) == [(t, a, b + 1) for t, a, b in get_entities(tags)]


# ---- an NER model dir applied to text ---------------------------------------------------------------------
TEXTS = ["Shares of Silverspring Energy fell 4% after Tom Novak, its chief executive, resigned.",
         "Falcon Rock Energy (FRE) reported quarterly revenue of $5.2 billion.", "腾讯控股今天在香港上涨3%", "   "]


def check_entities(text, entities):
    for e in entities:
        assert set(e) == {"type", "text", "start", "end", "score"}
        assert text[e["start"]:e["end"]] == e["text"] and e["text"].strip() == e["text"] and e["text"]
        assert 0 < e["score"] <= 1 and e["score"] == round(e["score"], 6)
    assert [e["start"] for e in entities] == sorted(e["start"] for e in entities)
    assert all(a["end"] <= b["start"] for a, b in zip(entities, entities[1:]))  # no overlaps


def test_predict_texts_on_an_ner_model(tiny_ner):
    results = predict_texts(tiny_ner, TEXTS, batch_size=2)
    assert [r["text"] for r in results] == TEXTS and all(set(r) == {"text", "entities"} for r in results)
    for r in results:
        check_entities(r["text"], r["entities"])
    assert results[3]["entities"] == []  # no words, no entities
    found = {(e["type"], e["text"]) for r in results[:2] for e in r["entities"]}
    assert ("ORG", "Silverspring Energy") in found or ("ORG", "Falcon Rock Energy") in found, found
    # batching does not change the answer
    assert predict_texts(tiny_ner, TEXTS[:1], batch_size=64)[0] == results[0]


def test_predict_texts_truncated_words_are_outside_entities(tiny_ner):
    short, long = (f"Shares of Silverspring Energy fell. {filler}Tom Novak resigned." for filler in ("", "x " * 200))
    assert ("PER", "Tom Novak") in {(e["type"], e["text"]) for e in predict_texts(tiny_ner, [short])[0]["entities"]}
    (r,) = predict_texts(tiny_ner, [long])
    check_entities(long, r["entities"])
    # max_length 64 = [CLS] + 62 words + [SEP]: 6 words, then 56 "x " fit; nothing later is tagged
    assert all(e["end"] <= len("Shares of Silverspring Energy fell. ") + 2 * 56 for e in r["entities"])


def test_predict_file_adds_entities_per_row(tiny_ner, tmp_path):
    inp = tmp_path / "news.jsonl"
    inp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"id": 1, "text": TEXTS[0]}, {"id": 2, "text": ""}, {"id": 3, "text": TEXTS[2]}]) + "\n")
    res = predict_file(tiny_ner, inp, tmp_path / "out.jsonl")
    assert res["predicted"] == 2 and res["skipped"] == [{"line": 2, "reason": "empty_or_missing_text"}]
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 3] and all(set(r) == {"id", "text", "entities"} for r in rows)
    for r in rows:
        check_entities(r["text"], r["entities"])
    assert rows[0]["entities"] == predict_texts(tiny_ner, [TEXTS[0]])[0]["entities"]
    conll = tmp_path / "rows.csv"
    conll.write_text("tokens,tags\nAcme,B-ORG\n")
    with pytest.raises(UserError, match="pre-tokenised"):
        predict_file(tiny_ner, conll, tmp_path / "out2.jsonl")


def test_predict_refuses_other_tasks(sft_lora):
    with pytest.raises(UserError, match="classification or token_classification"):
        predict_texts(sft_lora, ["hi"])


def test_cli_predict_ner_table_and_json(tiny_ner):
    from typer.testing import CliRunner

    from tunelab.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(tiny_ner), TEXTS[0], "nothing here"])
    assert res.exit_code == 0, res.output
    assert "(no entities)" in res.output and "score" in res.output and "nothing here" in res.output
    expected = predict_texts(tiny_ner, [TEXTS[0]])[0]["entities"]
    assert expected and all(f"{e['start']}–{e['end']}" in res.output for e in expected)
    res = runner.invoke(app, ["predict", str(tiny_ner), TEXTS[0], TEXTS[2], "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.output.splitlines()]
    assert [x["text"] for x in lines] == [TEXTS[0], TEXTS[2]] and lines[0]["entities"] == expected
