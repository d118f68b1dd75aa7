"""Intervals and paired tests (evaluate/metrics.py, evaluate/significance.py): they cover the truth at about the
nominal rate on synthetic data, a paired comparison uses only the rows both sides scored, and the per-sentence
entity counts add up to seqeval's scores."""

import math

import numpy as np
import pytest

from tunelab.evaluate import metrics
from tunelab.evaluate import significance as sg
from tunelab.evaluate.metrics import (bootstrap_interval, classification_metrics, mcnemar, paired_bootstrap,
                                      paired_ratio, ratio_interval)

K = 3
CLASS_P = np.array([0.5, 0.3, 0.2])
RIGHT = 0.8  # each row is predicted right with this probability, else as one of the other classes at random


def _draw(rng, n, right=RIGHT):
    y = rng.choice(K, size=n, p=CLASS_P)
    wrong = (y + rng.integers(1, K, size=n)) % K
    return y, np.where(rng.random(n) < right, y, wrong)


def _population_macro_f1(right=RIGHT) -> float:
    """The macro-F1 of the expected confusion matrix (the value a sample's macro-F1 estimates)."""
    cm = np.zeros((K, K))
    for t in range(K):
        cm[t] = CLASS_P[t] * (1 - right) / (K - 1)
        cm[t, t] = CLASS_P[t] * right
    tp = np.diag(cm)
    return float((2 * tp / (cm.sum(0) + cm.sum(1))).mean())


def _coverage(intervals, truth) -> float:
    return float(np.mean([lo <= truth <= hi for lo, hi in intervals]))


def test_class_intervals_cover_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    truth = {"accuracy": RIGHT, "macro_f1": _population_macro_f1()}
    found = {m: [] for m in truth}
    for trial in range(200):
        y, pred = _draw(rng, 400)
        for m in truth:
            found[m].append(bootstrap_interval(y, pred, m, n=400, seed=trial))
    for m in truth:
        assert 0.88 <= _coverage(found[m], truth[m]) <= 0.99, m
        widths = [hi - lo for lo, hi in found[m]]
        assert 0.03 < np.mean(widths) < 0.15  # about 4 standard errors of a 400-row estimate


def test_ratio_intervals_cover_a_mean_an_f1_and_a_perplexity():
    rng = np.random.default_rng(1)
    tp_rate, fp_rate, fn_rate = 2.0, 0.6, 0.9  # Poisson entity counts per sentence
    f1_truth = 2 * tp_rate / (2 * tp_rate + fp_rate + fn_rate)
    ppl_truth = np.exp(3.0)  # token losses average 3.0 nats
    means, f1s, ppls = [], [], []
    for trial in range(200):
        x = rng.random(150) < 0.3
        means.append(ratio_interval(x, np.ones(150), n=400, seed=trial))
        tp, fp, fn = (rng.poisson(r, 120) for r in (tp_rate, fp_rate, fn_rate))
        f1s.append(ratio_interval(2 * tp, 2 * tp + fp + fn, n=400, seed=trial))
        tokens = rng.integers(20, 200, size=80)
        losses = np.array([rng.gamma(3.0, 1.0, t).sum() for t in tokens])  # mean 3 nats per token
        ppls.append(ratio_interval(losses, tokens, n=400, seed=trial, transform=np.exp))
    assert 0.88 <= _coverage(means, 0.3) <= 0.99
    assert 0.88 <= _coverage(f1s, f1_truth) <= 0.99
    assert 0.88 <= _coverage(ppls, ppl_truth) <= 0.99


def test_paired_test_finds_a_real_difference_and_rarely_one_that_is_not_there():
    rng = np.random.default_rng(2)
    y, better = _draw(rng, 1500, right=0.85)
    worse = np.where(np.random.default_rng(4).random(1500) < 0.75, y, (y + 1) % K)
    result = paired_bootstrap(y, better, worse, "macro_f1", n=500, seed=0)
    assert result["verdict"] == "better" and result["interval"][0] > 0
    assert paired_bootstrap(y, worse, better, "accuracy", n=500, seed=0)["verdict"] == "worse"
    claims = 0
    for trial in range(100):  # two predictors equally good: "better" or "worse" should be rare (~5%)
        y, a = _draw(rng, 300)
        b = np.where(rng.random(300) < RIGHT, y, (y + rng.integers(1, K, size=300)) % K)
        claims += paired_bootstrap(y, a, b, "accuracy", n=300, seed=trial)["verdict"] != "no clear difference"
    assert claims <= 15
    point = paired_bootstrap(y, a, b, "macro_f1", n=50, seed=0)["difference"]
    assert point == pytest.approx(classification_metrics(y, a, list("abc"))["macro_f1"]
                                  - classification_metrics(y, b, list("abc"))["macro_f1"])


def test_comparison_uses_only_the_rows_the_baseline_scored():
    rng = np.random.default_rng(5)
    y, model = _draw(rng, 200)
    rows = np.sort(rng.choice(200, 60, replace=False))
    base = _draw(rng, 60, right=0.5)[1]
    base = np.where(rng.random(60) < 0.5, y[rows], base)
    c = sg.compare_classes(y, model, base, rows.tolist(), resamples=200, seed=0)
    assert c["rows"] == 60
    on_rows = classification_metrics(y[rows], model[rows], list("abc"))["macro_f1"]
    assert c["macro_f1"]["difference"] == pytest.approx(on_rows - classification_metrics(y[rows], base,
                                                                                          list("abc"))["macro_f1"])
    assert c["mcnemar"] == mcnemar(y[rows], model[rows], base)
    whole = sg.compare_classes(y, model, model, None, resamples=200, seed=0)
    assert whole["rows"] == 200 and whole["accuracy"]["difference"] == 0.0
    assert whole["accuracy"]["verdict"] == "no clear difference"
    with pytest.raises(ValueError, match="60 baseline predictions for 200 rows"):
        sg.compare_classes(y, model, base, None, resamples=10, seed=0)


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_rows():
    y = np.zeros(40, dtype=int)
    a = np.array([0] * 30 + [1] * 10)       # right on rows 0-29
    b = np.array([1] * 12 + [0] * 20 + [1] * 8)  # right on rows 12-31
    m = mcnemar(y, a, b)
    assert (m["a_only"], m["b_only"]) == (12, 2)
    assert m["p_value"] == pytest.approx(2 * sum(math.comb(14, i) for i in range(3)) / 2 ** 14)
    assert mcnemar(y, a, a)["p_value"] == 1.0


def test_entity_counts_add_up_to_seqevals_scores():
    from tunelab.tasks.token_classification import entity_metrics

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"], ["B-LOC", "O"], ["O", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "O"], ["B-LOC", "B-PER"], ["O", "O"]]
    counts = sg.entity_counts(gold, pred)
    assert counts.tolist() == [[1, 1, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]]
    tp, fp, fn = counts.sum(0)
    m = entity_metrics(gold, pred)
    assert m["entity_precision"] == pytest.approx(tp / (tp + fp))
    assert m["entity_recall"] == pytest.approx(tp / (tp + fn))
    assert m["entity_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    lo, hi = sg.entity_intervals(counts, resamples=300, seed=0)["entity_f1"]
    assert lo <= m["entity_f1"] <= hi
    same = sg.compare_entities(counts, counts, resamples=100, seed=0)
    assert same["rows"] == 4 and same["entity_f1"]["difference"] == 0.0


def test_perplexity_comparison_is_paired_on_the_same_blocks_only():
    after = [(30.0, 10), (44.0, 20), (12.0, 5)]
    before = [(40.0, 10), (60.0, 20), (15.0, 5)]
    c = sg.compare_perplexity(after, before, resamples=200, seed=0)
    assert c["rows"] == 3
    assert c["perplexity"]["difference"] == pytest.approx(np.exp(86 / 35) - np.exp(115 / 35))
    assert c["perplexity"]["verdict"] == "better"  # lower on every block
    assert sg.compare_perplexity(after, before[:2], resamples=10, seed=0) is None
    assert sg.compare_perplexity(after, [(40.0, 11), (60.0, 20), (15.0, 5)], resamples=10, seed=0) is None
    lo, hi = sg.perplexity_interval(after, resamples=200, seed=0)
    assert lo <= np.exp(86 / 35) <= hi


def test_large_splits_are_resampled_in_chunks(monkeypatch):
    rng = np.random.default_rng(6)
    y, pred = _draw(rng, 5000)
    whole = bootstrap_interval(y, pred, "accuracy", n=300, seed=0)
    monkeypatch.setattr(metrics, "CHUNK", 12_000)  # two resamples per chunk
    chunked = bootstrap_interval(y, pred, "accuracy", n=300, seed=0)
    assert chunked == pytest.approx(whole, abs=0.01)
    assert paired_ratio((y == pred, np.ones(5000)), (y == pred, np.ones(5000)), n=20, seed=0)["difference"] == 0.0


def test_resampled_macro_f1_is_the_reports_over_every_label():
    rng = np.random.default_rng(7)
    y = rng.choice(2, size=40)  # label 2 never occurs and is never predicted: it scores 0, as in the table
    pred = np.where(rng.random(40) < 0.7, y, 1 - y)
    idx = rng.integers(0, 40, size=(25, 40))
    fast = metrics._resampled_scores("macro_f1", y, pred, idx, 3)
    slow = [classification_metrics(y[i], pred[i], list("abc"))["macro_f1"] for i in idx]
    assert fast == pytest.approx(slow)
    other = np.where(rng.random(40) < 0.6, y, 1 - y)
    c = sg.compare_classes(y, pred, other, None, resamples=200, seed=0, n_labels=3)
    assert c["macro_f1"]["difference"] == pytest.approx(classification_metrics(y, pred, list("abc"))["macro_f1"]
                                                        - classification_metrics(y, other, list("abc"))["macro_f1"])
    lo, hi = sg.class_intervals(y, pred, 300, 0, n_labels=3)["macro_f1"]
    assert hi < 0.7  # two of three labels at most: a mean over three, not over the two present
