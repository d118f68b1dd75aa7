import numpy as np

from tunelab.config import EvalConfig
from tunelab.evaluate import baselines as bl
from tunelab.evaluate.report import evaluate, print_report
from tunelab.models import load_tokenizer

from conftest import make_rows

LABELS = ["negative", "neutral", "positive"]


def test_tfidf_learns_the_label_words():
    rows = make_rows(300)
    out = bl.tfidf_logreg(rows[:240], rows[240:], LABELS)
    assert out["macro_f1"] > 0.9 and out["train_examples"] == 240 and out["n"] == 60


def test_label_tokens_cover_spellings():
    tok = load_tokenizer("tiny-llama")
    ids = bl._label_token_ids(tok, "positive")
    assert tok("positive", add_special_tokens=False)["input_ids"][0] in ids
    assert tok(" Positive", add_special_tokens=False)["input_ids"][0] in ids


def test_zero_shot_samples_and_scores_every_row():
    rows = make_rows(40)
    out = bl.zero_shot("tiny-llama", rows, LABELS, samples=25, batch_size=8)
    assert out["sample_size"] == out["n"] == 25 and out["population"] == 40
    assert sum(map(sum, out["confusion_matrix"]["matrix"])) == 25
    assert 0 <= out["macro_f1"] <= 1 and "prompt" in out


def test_zero_shot_batching_does_not_change_scores(monkeypatch):
    # zero_shot returns only aggregates, and tiny-llama predicts one class for every row, so equal confusion
    # matrices prove little: capture the per-row predictions and probabilities it hands to the metrics.
    seen, metrics = [], bl.classification_metrics

    def spy(y, pred, labels, probs=None):
        seen.append((np.asarray(pred), np.asarray(probs)))
        return metrics(y, pred, labels, probs)

    monkeypatch.setattr(bl, "classification_metrics", spy)
    rows = make_rows(12)
    a = bl.zero_shot("tiny-llama", rows, LABELS, samples=None, batch_size=1)
    b = bl.zero_shot("tiny-llama", rows, LABELS, samples=None, batch_size=12)
    (pred_a, probs_a), (pred_b, probs_b) = seen
    assert probs_a.shape == (12, 3)
    assert np.allclose(probs_a, probs_b, atol=1e-5), np.abs(probs_a - probs_b).max()
    assert (pred_a == pred_b).all()
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert np.isclose(a["ece"], b["ece"], atol=1e-4)


def test_report_keys_and_table(tmp_path, small_dataset, capsys):
    from tunelab.config import validate
    from tunelab.train.loop import train

    from conftest import tiny_config

    summary = train(validate(tiny_config(small_dataset, max_steps=4)), tmp_path / "run", show_progress=False)
    report = evaluate(summary["model_dir"], None, "test", tmp_path / "r.json",
                      EvalConfig(baselines=["tfidf", "zero_shot"], zero_shot_model="tiny-llama", zero_shot_samples=10))
    assert set(report["baselines"]) == {"tfidf_logreg", "zero_shot"}
    assert report["baselines"]["zero_shot"]["sample_size"] == 10
    assert report["data"]["same_data_as_training"] is True
    assert (tmp_path / "r.json").is_file() and (tmp_path / "r.confusion.png").is_file()
    print_report(report)
    printed = capsys.readouterr().out
    assert "TF-IDF + LR" in printed and "fine-tuned tiny-bert" in printed and "10 of 30" in printed


def test_eval_reads_the_run_configs_eval_section_and_flags_win(tmp_path, small_dataset):
    import pytest

    from tunelab.config import validate
    from tunelab.errors import UserError
    from tunelab.train.loop import train

    from conftest import tiny_config

    cfg = tiny_config(small_dataset, max_steps=2)
    cfg["eval"] = {"baselines": ["zero_shot"], "zero_shot_model": "tiny-llama", "zero_shot_samples": 7,
                   "batch_size": 4}
    summary = train(validate(cfg), tmp_path / "run", show_progress=False)
    report = evaluate(summary["model_dir"])
    assert set(report["baselines"]) == {"zero_shot"} and report["baselines"]["zero_shot"]["sample_size"] == 7
    assert report["eval"]["batch_size"] == 4
    report = evaluate(summary["model_dir"], overrides={"zero_shot_samples": 5, "baselines": ["tfidf", "zero_shot"]})
    assert report["baselines"]["zero_shot"]["sample_size"] == 5 and "tfidf_logreg" in report["baselines"]
    with pytest.raises(UserError, match="invalid eval options: 'zero_shot_samples'"):
        evaluate(summary["model_dir"], overrides={"zero_shot_samples": -1})
