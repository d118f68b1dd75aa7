"""`tunelab eval` for NER, causal_lm and sft model dirs; the generation metrics; the CLI commands."""

import json
import subprocess
import sys

import pytest

from tunelab.config import EvalConfig
from tunelab.evaluate.language import exact_match, rouge_l
from tunelab.evaluate.report import evaluate
from tunelab.generate import StopTrimmer

from tunelab.train.loop import train

from conftest import task_config as _cfg


def test_rouge_l_and_exact_match():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("", "something") == 0.0 and rouge_l("", "") == 1.0
    # LCS "the cat the mat" = 4 of 6 and 4 of 5 words
    p, r = 4 / 6, 4 / 5
    assert abs(rouge_l("the cat sat on the mat", "the black cat the mat") - 2 * p * r / (p + r)) < 1e-9
    assert exact_match("Paris.", " paris ") and not exact_match("Paris", "Lyon")


def test_stop_trimmer_never_shows_a_stop_string():
    t = StopTrimmer(["<|im_end|>", "###"])
    shown = "".join(t.push(p) for p in ["Hello", " wor", "ld<|im", "_end|>", " more"])
    assert shown == "Hello world" and t.done and t.text == "Hello world"
    t = StopTrimmer(["###"])
    shown = "".join(t.push(p) for p in ["a #", "# b"]) + t.flush()
    assert shown == "a ## b" and not t.done


def test_ner_report_has_entity_scores_and_baseline(tmp_path, ner_data):
    train(_cfg(ner_data, "tiny-bert", epochs=1), tmp_path / "run", show_progress=False)
    rep = evaluate(tmp_path / "run" / "model", out=tmp_path / "rep.json")
    assert rep["task"] == "token_classification" and 0 <= rep["entity_f1"] <= 1
    assert 0.2 < rep["baselines"]["lookup"]["entity_f1"] < 0.9  # finds seen names, misses composed new ones
    assert json.loads((tmp_path / "rep.json").read_text())["per_type"]
    # intervals by sentence, and the paired comparison with the lookup on the same sentences
    assert rep["statistics"]["unit"] == "sentence" and "predictions" not in rep
    for m in (rep, rep["baselines"]["lookup"]):
        lo, hi = m["intervals"]["entity_f1"]
        assert lo <= m["entity_f1"] <= hi
    c = rep["comparisons"]["lookup"]
    assert c["rows"] == rep["n"]
    assert c["entity_f1"]["difference"] == pytest.approx(rep["entity_f1"] - rep["baselines"]["lookup"]["entity_f1"])


def test_sft_report_has_before_after_generation_and_forgetting(tmp_path, chat_data):
    train(_cfg(chat_data, "tiny-llama", "lora", lr=1e-2, epochs=1), tmp_path / "run", show_progress=False)
    general = tmp_path / "general.txt"
    general.write_text("the weather is nice today.\n\nstocks rose on monday.\n\nI like tea.")
    rep = evaluate(tmp_path / "run" / "model", split="validation",
                   eval_cfg=EvalConfig(generation_samples=3, max_new_tokens=8, general_text=str(general)))
    assert rep["task"] == "sft"
    assert rep["after"]["tokens"] == rep["before"]["tokens"] > 0
    assert rep["after"]["generation"]["n"] == 3 and len(rep["after"]["generation"]["samples"]) == 3
    f = rep["forgetting"]
    assert f["rows"] == 3 and f["perplexity_before"] > 1 and f["perplexity_after"] > 1
    for side in ("after", "before"):  # per-block values are used, then dropped
        lo, hi = rep[side]["intervals"]["perplexity"]
        assert lo <= rep[side]["perplexity"] <= hi and "blocks" not in rep[side]
        assert len(rep[side]["intervals"]["rouge_l"]) == 2 and "rouge_l_values" not in rep[side]["generation"]
    c = rep["comparisons"]["before"]
    assert c["perplexity"]["difference"] == pytest.approx(rep["after"]["perplexity"] - rep["before"]["perplexity"],
                                                          rel=1e-4)
    assert c["rouge_l"]["rows"] == 3


def test_causal_lm_report(tmp_path, text_data):
    train(_cfg(text_data, "tiny-llama", "lora", lr=1e-2, epochs=1), tmp_path / "run", show_progress=False)
    general = tmp_path / "general.txt"
    general.write_text("the weather is nice today.\n\nI like tea.")
    rep = evaluate(tmp_path / "run" / "model", eval_cfg=EvalConfig(general_text=str(general)))
    # trained on this kind of text: lower perplexity than the (random) base, clearly
    assert rep["after"]["perplexity"] < rep["before"]["perplexity"]
    assert rep["comparisons"]["before"]["perplexity"]["verdict"] == "better"
    plain = evaluate(tmp_path / "run" / "model", eval_cfg=EvalConfig(general_text=str(general), bootstrap=0))
    assert plain["after"]["perplexity"] == pytest.approx(rep["after"]["perplexity"], rel=1e-5)  # per block or not
    assert "intervals" not in plain["after"] and "comparisons" not in plain


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=300)


def test_generate_and_chat_commands():
    r = _cli("generate", "tiny-llama", "hello", "--raw", "--max-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["completion_tokens"] <= 4 and out["finish_reason"] in ("stop", "length")
    r = _cli("generate", "tiny-llama", "hello", "--top-p", "0")
    assert r.returncode == 2 and "top-p" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "tunelab", "chat", "tiny-llama", "--max-tokens", "3"],
                       input="hi\n/reset\nhello again\n/exit\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model> ") == 2
