"""`train()` end to end for the tasks beyond classification (tiny models): layout, loss falls, reload."""

import json
from pathlib import Path

import pytest

from tunelab.errors import UserError
from tunelab.models import load_model_dir
from tunelab.train.loop import train

from conftest import task_config as _cfg


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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
