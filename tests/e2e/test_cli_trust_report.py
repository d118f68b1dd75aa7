"""A CLI a newcomer trusts: a `warning:` line when the fine-tuned model scores below a baseline or the data
cannot support the task, both training sizes when the model saw a subset (and TF-IDF + LR on those same rows),
and a verdict in plain words. CLI runs are subprocesses in a folder outside the repository."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from conftest import make_rows, tiny_config, write_csv


def tl(cwd: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def warning_lines(out: str) -> list[str]:
    return [line.removeprefix("warning: ") for line in out.splitlines() if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def subset_model(tmp_path_factory, small_dataset) -> Path:
    """A tiny-bert trained on a seeded 60 of the 240 train rows for 2 steps: far below TF-IDF + LR (~1 s)."""
    from tunelab.config import validate
    from tunelab.train.loop import train

    cfg = tiny_config(small_dataset, max_steps=2)
    cfg["data"]["max_train_examples"] = 60
    run = tmp_path_factory.mktemp("subset") / "run"
    train(validate(cfg), run, show_progress=False)
    return run / "model"


# ---- B: data prepare says when the dataset can't support the task ------------------------------------------

def test_prepare_warns_about_a_single_label_and_few_rows(tmp_path):
    write_csv(tmp_path / "single_label.csv", [{"text": f"great flight number {i}", "label": "positive"}
                                              for i in range(40)])
    proc = tl(tmp_path, "data", "prepare", "single_label.csv", "--out", "d")
    assert proc.returncode == 0, proc.stderr
    lines = warning_lines(proc.stdout)
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert lines == meta["warnings"] and len(lines) == 2, proc.stdout
    assert lines[0].startswith("only one label ('positive'): a classifier needs at least two")
    assert lines[1].startswith("only 40 rows in all: too few")


def test_prepare_warns_about_empty_splits_and_a_rare_label(tmp_path):
    rows = make_rows(150) + [{"text": "i lost my bag at the airport", "label": "complaint"}]
    write_csv(tmp_path / "rare.csv", rows)
    proc = tl(tmp_path, "data", "prepare", "rare.csv", "--out", "d", "--val-ratio", "0", "--test-ratio", "0")
    assert proc.returncode == 0, proc.stderr
    lines = warning_lines(proc.stdout)
    assert lines == json.loads((tmp_path / "d" / "dataset.json").read_text())["warnings"], proc.stdout
    assert lines == [
        "too few train rows (fewer than 2) for 1 label(s): 'complaint' (1): a model cannot learn a label from that; "
        "add rows of it, or drop it",
        "the validation split is empty (--val-ratio 0): `tunelab train` needs validation rows to choose its best "
        "step; raise --val-ratio (e.g. 0.1)",
        "the test split is empty (--test-ratio 0): `tunelab eval` has nothing to score (it would need --split "
        "validation, which chose the model); raise --test-ratio (e.g. 0.1)",
    ], proc.stdout


def test_a_dataset_that_supports_its_task_has_no_warnings(small_dataset):
    assert json.loads((small_dataset / "dataset.json").read_text())["warnings"] == []


def test_training_on_a_single_label_is_refused(tmp_path):
    write_csv(tmp_path / "single_label.csv", [{"text": f"great flight number {i}", "label": "positive"}
                                              for i in range(40)])
    assert tl(tmp_path, "data", "prepare", "single_label.csv", "--out", "d").returncode == 0
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_config(Path("d"), max_steps=1)))
    proc = tl(tmp_path, "train", "cfg.yaml", "--out", "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: classification needs at least two labels, and the only label is "
                                  "'positive'"), proc.stderr
    assert not (tmp_path / "run").exists()  # refused before a run dir is made


# ---- A, C, D: eval of a model below the baseline, trained on a subset ---------------------------------------

def test_eval_below_the_baseline_warns_states_both_sizes_and_says_it_plainly(tmp_path, subset_model, small_dataset):
    from tunelab.data.dataset import load_split
    from tunelab.data.split import sample_rows
    from tunelab.evaluate import baselines as bl
    from tunelab.evaluate.report import model_train_subset

    cache = tmp_path / "cache"
    proc = tl(tmp_path, "eval", subset_model, "--out", "report.json", env={"TUNELAB_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    out, report = proc.stdout, json.loads((tmp_path / "report.json").read_text())
    whole, same = report["baselines"]["tfidf_logreg"], report["baselines"]["tfidf_logreg_same_rows"]

    # C: both sizes, in the JSON and in words; TF-IDF + LR again on the rows the model saw
    assert report["model"]["train_examples"] == 60 and whole["train_examples"] == 240 and same["train_examples"] == 60
    assert report["train_rows"] == {"model": 60, "model_rows": "a seeded subset of the train split, seed 0",
                                    "train_split": 240,
                                    "baselines": {"tfidf_logreg": 240, "tfidf_logreg_same_rows": 60}}
    assert same["name"] == f"{whole['name']} on the same 60 rows"
    assert (f"train rows: the fine-tuned model saw 60 (a seeded subset of the train split, seed 0); {whole['name']} "
            "trained on 240 (the whole train split), and again on the same 60 rows as the model") in out
    assert re.search(rf"^│ {re.escape(same['name'])} +│ +60 │ +30 │", out, re.M), out
    # the same rows: the training loop's seeded sample, and the cached TF-IDF choice is keyed by exactly them
    train, validation = load_split(small_dataset, "train"), load_split(small_dataset, "validation")
    subset = model_train_subset(json.loads((subset_model / "tunelab.json").read_text()), train)
    assert subset == sample_rows(train, 60, "label", 0)[0]
    labels = ["negative", "neutral", "positive"]
    keys = {bl._cache_key(rows, validation, labels, 0) for rows in (train, subset)}
    entries = {p.name for p in (cache / "baselines").iterdir() if p.is_dir()}
    assert entries == {f"tfidf-{k}" for k in keys} and len(keys) == 2

    # D: the verdicts in plain words: the paired difference on the rows both scored, and its interval
    for key, b in (("tfidf_logreg", whole), ("tfidf_logreg_same_rows", same)):
        gap = round(b["macro_f1"] - report["macro_f1"], 4)
        assert gap > 0.3  # far below: the model saw 2 steps
        c = report["comparisons"][key]["macro_f1"]
        assert c["verdict"] == "worse" and c["interval"][1] < 0
        assert (f"fine-tuned model scores {gap:.4f} macro-F1 below {b['name']} (95% interval [{c['interval'][0]:+.4f}, "
                f"{c['interval'][1]:+.4f}], paired on 30 rows)") in out.splitlines(), out
    assert "does not beat" not in out

    # A: one warning line naming both baselines and what to try, the same sentence in the report JSON
    assert warning_lines(out) == report["warnings"] and len(report["warnings"]) == 1, out
    warning = report["warnings"][0]
    assert warning.startswith(f"the fine-tuned model scores below {whole['name']} ({report['macro_f1']:.4f} vs "
                              f"{whole['macro_f1']:.4f} macro-F1) and {same['name']} (")
    assert "train on more rows (it saw 60 of 240) or for more epochs, and see the baselines above" in warning


def test_quickstart_ends_with_what_to_change_when_below_a_baseline(tmp_path, monkeypatch, subset_model,
                                                                  small_dataset):
    """The quickstart's stages replaced by the tiny ones (no MiniLM here); its evaluation and printing are real."""
    import io

    from tunelab import quickstart
    from tunelab.data.dataset import load_meta

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quickstart, "prepare", lambda *a, **k: load_meta(small_dataset))
    monkeypatch.setattr(quickstart, "train", lambda *a, **k: {"model_dir": str(subset_model)})
    buf = io.StringIO()
    report = quickstart.run_quickstart(tmp_path / "run", small_dataset, 60, 1.0, Console(file=buf, width=120))
    lines = warning_lines(buf.getvalue())
    assert lines[:-1] == report["warnings"] and report["warnings"], buf.getvalue()
    assert lines[-1] == ("this model scores below a baseline (see the warnings above): run the quickstart again with "
                         "--train-examples above 60 (or without it: all 240 rows) or --epochs 2, and --overwrite")


# ---- the wording, on numbers -----------------------------------------------------------------------------------

def test_verdict_wording():
    from tunelab.evaluate.report import verdict

    def plain(line: str) -> str:
        console = Console(file=(buf := __import__("io").StringIO()), width=200)
        console.print(line, highlight=False)
        return buf.getvalue().strip()

    assert plain(verdict(0.31, 0.7714, "TF-IDF + LR", "macro-F1")) == \
        "fine-tuned model scores 0.4614 below TF-IDF + LR (0.3100 vs 0.7714 macro-F1)"
    assert plain(verdict(0.81, 0.77, "TF-IDF + LR", "macro-F1")) == \
        "fine-tuned model beats TF-IDF + LR by +0.0400 (0.8100 vs 0.7700 macro-F1)"
    assert plain(verdict(0.77001, 0.77, "the word-lookup baseline", "entity F1")) == \
        "fine-tuned model ties with the word-lookup baseline (0.7700 entity F1 each)"
    # with a paired comparison: "beats" / "below" only when its interval excludes zero
    c = {"difference": 0.004, "interval": [-0.011, 0.019], "verdict": "no clear difference", "rows": 3665}
    assert plain(verdict(0.7742, 0.77, "TF-IDF + LR", "macro-F1", comparison=c)) == (
        "fine-tuned model shows no clear difference from TF-IDF + LR: +0.0040 macro-F1 (95% interval [-0.0110, "
        "+0.0190], paired on 3,665 rows; it includes zero)")
    c = {"difference": 0.0415, "interval": [0.0281, 0.0552], "verdict": "better", "rows": 3665}
    assert plain(verdict(0.7835, 0.742, "TF-IDF + LR", "macro-F1", comparison=c)) == (
        "fine-tuned model beats TF-IDF + LR by +0.0415 macro-F1 (95% interval [+0.0281, +0.0552], paired on 3,665 "
        "rows)")
    c = {"difference": -0.02, "interval": [-0.03, -0.01], "verdict": "worse", "rows": 40}
    assert plain(verdict(0.5, 0.52, "word lookup", "entity F1", comparison=c, unit="sentences")) == (
        "fine-tuned model scores 0.0200 entity F1 below word lookup (95% interval [-0.0300, -0.0100], paired on 40 "
        "sentences)")


def test_warnings_for_each_task_on_numbers():
    from tunelab.evaluate.report import below_baseline_warnings

    ner = {"task": "token_classification", "model": {"train_examples": 160}, "entity_f1": 0.41,
           "baselines": {"lookup": {"name": "word lookup", "entity_f1": 0.52}}}
    assert below_baseline_warnings(ner) == [
        "the fine-tuned model scores below word lookup (0.4100 vs 0.5200 entity F1): don't use it as is; train on "
        "more rows (it saw 160) or for more epochs, and see the baseline above (it may already be good enough)"]
    assert below_baseline_warnings({**ner, "entity_f1": 0.52}) == []  # a tie is not below
    clf = {"task": "classification", "model": {"train_examples": 500}, "macro_f1": 0.8,
           "train_rows": {"train_split": 30526},
           "baselines": {"zero_shot": {"name": "zero-shot smollm2", "macro_f1": 0.2},
                         "tfidf_logreg": {"name": "TF-IDF + LR", "macro_f1": 0.72}}}
    assert below_baseline_warnings(clf) == []
    assert "(it saw 500 of 30,526)" in below_baseline_warnings({**clf, "macro_f1": 0.5})[0]
    lm = {"task": "sft", "model": {"train_examples": 64}, "before": {"perplexity": 9.5}, "after": {"perplexity": 12.25}}
    assert below_baseline_warnings(lm) == [
        "the fine-tuned model is worse than its base on this split (perplexity 12.25 vs 9.50 before fine-tuning): "
        "don't use it as is; train on more rows or for more epochs, try a lower learning rate, and compare with the "
        "base model's row above"]
    assert below_baseline_warnings({**lm, "after": {"perplexity": 3.1}}) == []
    assert below_baseline_warnings({**lm, "before": None}) == []  # scratch models have no "before"
