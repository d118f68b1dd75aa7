"""A base model that cannot read the data is named before training and in every report: the unknown-token
rate, tokens per character and character coverage of its tokenizer on the data."""

from __future__ import annotations

import io
import json
import random

import pytest
from rich.console import Console

from conftest import task_config, write_csv
from tunelab.evaluate.base_fit import advice, measure
from tunelab.models import load_tokenizer

GOOD, BAD = "好棒赞优秀满意喜欢推荐", "差烂坏失望糟糕退货难用"
FILLER = "这个东西手机酒店服务质量物流价格屏幕电池"
ENGLISH = ["the flight was late again, thanks a lot", "landed safely, great crew!", "what a lovely morning flight",
           "my bag never arrived and nobody answered the phone"] * 10
RUSSIAN = ["Отличный товар, быстрая доставка, рекомендую всем", "Ужасное качество, вернул продавцу"] * 10


def chinese_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label, pool = ("positive", GOOD) if i % 2 else ("negative", BAD)
        chars = rng.sample(FILLER, 5) + rng.sample(pool, 3)
        rng.shuffle(chars)
        rows.append({"text": "".join(chars) + f"，第{i}号", "label": label})
    return rows


@pytest.fixture(scope="module")
def minilm_tok():
    return load_tokenizer("builtin:minilm-l6")


def test_english_encoder_fits_english_and_not_chinese_or_russian(minilm_tok):
    assert measure(minilm_tok, ENGLISH)["warnings"] == []
    zh = measure(minilm_tok, [r["text"] for r in chinese_rows(40)])
    assert zh["script"] == "Han" and zh["unk_rate"] > 0.3 and zh["coverage"] < 0.5
    assert any("unknown token" in w for w in zh["warnings"]) and any("Han characters" in w for w in zh["warnings"])
    msg = advice(zh, "builtin:minilm-l6")
    assert "poor fit" in msg and "model.base" in msg
    ru = measure(minilm_tok, RUSSIAN)
    assert ru["script"] == "Cyrillic" and any("letter by letter" in w for w in ru["warnings"])


def test_a_byte_level_tokenizer_on_chinese_is_named():
    fit = measure(load_tokenizer("builtin:smollm2-135m-instruct"), [r["text"] for r in chinese_rows(40)])
    assert fit["unk_rate"] == 0 and fit["tokens_per_char"] > 1.3
    assert any("tokens per character" in w for w in fit["warnings"])


def test_a_tokenizer_built_for_chinese_fits():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rows = chinese_rows(40)
    chars = sorted({c for r in rows for c in r["text"]})  # a character-level WordPiece, as Chinese BERTs have
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", *chars, *(f"##{d}" for d in "0123456789")])}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.normalizer, wordpiece.pre_tokenizer = normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]")
    fit = measure(tok, [r["text"] for r in rows])
    assert fit["unk_rate"] == 0 and fit["coverage"] == 1.0 and fit["warnings"] == []
    assert advice(fit, "zh-bert") is None


def test_train_warns_up_front_and_eval_reports_it(tmp_path):
    from tunelab.data.prepare import prepare
    from tunelab.evaluate.report import evaluate
    from tunelab.train.loop import train

    write_csv(tmp_path / "zh.csv", chinese_rows(80))
    prepare(str(tmp_path / "zh.csv"), tmp_path / "ds")
    buf = io.StringIO()
    train(task_config(tmp_path / "ds", "tiny-bert", epochs=1), tmp_path / "run",
          console=Console(file=buf, width=400), show_progress=False)
    out = buf.getvalue()
    assert "poor fit" in out and "unknown token" in out
    assert out.index("poor fit") < out.index("saved")  # said before training, not after
    meta = json.loads((tmp_path / "run" / "model" / "tunelab.json").read_text())
    assert meta["base_fit"]["script"] == "Han" and meta["base_fit"]["warnings"]
    report = evaluate(tmp_path / "run" / "model", overrides={"baselines": []})
    assert report["base_fit"]["warnings"]
