"""`train()` end to end for the tasks beyond classification (tiny models): layout, loss falls, reload."""

import json
from pathlib import Path

import pytest

from tunelab.config import validate
from tunelab.data.prepare import prepare
from tunelab.config import PrepareOptions
from tunelab.errors import UserError
from tunelab.models import load_model_dir
from tunelab.train.loop import train

EXAMPLES = Path(__file__).parent.parent / "examples"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cfg(data_dir, base, method="full", **train_kw):
    return validate({"model": {"base": base, "max_length": 64}, "data": {"dir": str(data_dir)},
                     "method": {"name": method},
                     "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "log_every": 1, "seed": 0, **train_kw}})


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ner") / "ds"
    prepare(str(EXAMPLES / "data" / "finance_ner.conll"), d, PrepareOptions(task="ner", max_rows=200))
    return d


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    docs = [f"report {i}: the market opened higher and shares of company {i % 7} rose on strong demand."
            for i in range(120)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    prepare(str(root / "corpus.txt"), root / "ds", PrepareOptions(task="text", dedup={"near": False}))
    return root / "ds"


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(80)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prepare(str(root / "chat.jsonl"), root / "ds", PrepareOptions(task="sft", dedup={"near": False}))
    return root / "ds"


def test_ner_trains_and_reports_entity_f1(tmp_path, ner_data):
    out = train(_cfg(ner_data, "tiny-bert", epochs=3), tmp_path / "run", show_progress=False)
    assert out["task"] == "token_classification"
    assert {"entity_f1", "entity_precision", "entity_recall", "token_accuracy"} <= set(out["validation"])
    losses = [m["train_loss"] for m in _metrics(tmp_path / "run") if "train_loss" in m]
    assert losses[-1] < losses[0]
    model, tok, meta = load_model_dir(tmp_path / "run" / "model")
    assert meta["task"] == "token_classification" and meta["labels"][0] == "O"


def test_causal_lm_lora_packs_and_reports_perplexity(tmp_path, text_data):
    out = train(_cfg(text_data, "tiny-llama", "lora", lr=1e-2), tmp_path / "run", show_progress=False)
    assert out["task"] == "causal_lm" and out["validation"]["perplexity"] > 1
    evals = [m["eval_perplexity"] for m in _metrics(tmp_path / "run") if "eval_perplexity" in m]
    assert evals[-1] < evals[0] or len(evals) == 1
    d = tmp_path / "run" / "model"
    assert (d / "adapter_config.json").is_file() and json.loads((d / "tunelab.json").read_text())["stop"]


def test_causal_lm_from_scratch_trains_its_tokenizer(tmp_path, text_data):
    cfg = _cfg(text_data, "scratch", epochs=3)
    cfg.model.scratch.vocab_size, cfg.model.scratch.hidden_size, cfg.model.scratch.layers = 400, 32, 1
    cfg.model.scratch.heads = 2
    out = train(cfg, tmp_path / "run", show_progress=False)
    model, tok, meta = load_model_dir(tmp_path / "run" / "model")
    assert len(tok) <= 400 and model.config.vocab_size == len(tok)
    first = [m["train_loss"] for m in _metrics(tmp_path / "run") if "train_loss" in m]
    assert first[-1] < first[0] and out["validation"]["perplexity"] < 400


def test_sft_trains_and_saves_the_chat_template(tmp_path, chat_data):
    out = train(_cfg(chat_data, "tiny-llama", "lora", lr=1e-2, epochs=3), tmp_path / "run", show_progress=False)
    assert out["task"] == "sft"
    model, tok, meta = load_model_dir(tmp_path / "run" / "model")
    assert tok.chat_template and "<|im_end|>" in meta["stop"]


def test_task_mismatch_is_a_clear_error(tmp_path, chat_data):
    cfg = _cfg(chat_data, "tiny-llama")
    cfg.task = "classification"
    with pytest.raises(UserError, match="'sft' dataset"):
        train(cfg, tmp_path / "run", show_progress=False)
