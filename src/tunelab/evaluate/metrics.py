"""Classification metrics on label ids and probabilities (scikit-learn for the standard numbers)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence: sum over equal-width bins of |accuracy - confidence| * bin share."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def classification_metrics(y_true, y_pred, labels: list[str], probs: np.ndarray | None = None) -> dict:
    """accuracy, macro_f1, macro_recall, macro_precision, per_class, confusion_matrix (rows = true),
    and `ece` when probabilities are given."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    out = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f.mean()),
        "macro_recall": float(r.mean()),
        "macro_precision": float(p.mean()),
        "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                  "support": int(s[i])} for i in ids},
        "confusion_matrix": {"labels": labels,
                             "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()},
    }
    if probs is not None:
        out["ece"] = expected_calibration_error(probs, y_true)
    return out


def _resampled_scores(metric: str, y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """`metric` of each resample `idx[j]` of the rows (vectorised): accuracy, or macro-F1 over all `k` labels, a
    label with no true and no predicted row scoring 0 — as `classification_metrics` averages it. Per-label counts
    only (resamples x k), never a confusion matrix per resample."""
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"unknown metric {metric}")
    t, p = y_true[idx], y_pred[idx]
    hit = t == p
    if metric == "accuracy":
        return hit.mean(1)
    n = len(idx)
    offsets = (np.arange(n) * k)[:, None]

    def counts(codes: np.ndarray) -> np.ndarray:
        return np.bincount(codes, minlength=n * k).reshape(n, k).astype(np.float64)

    tp, denom = counts((t + offsets)[hit]), counts((t + offsets).ravel()) + counts((p + offsets).ravel())
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)  # denom = 2tp + fp + fn
    return f1.sum(1) / k


CHUNK = 4_000_000  # resampled unit draws held at once: 1,000 resamples of 100,000 rows stay under ~100 MB


def _draws(units: int, n: int, seed: int):
    """`n` resamples of `units` positions (seeded), in chunks of at most CHUNK draws."""
    rng, per = np.random.default_rng(seed), max(1, CHUNK // max(1, units))
    for start in range(0, n, per):
        yield rng.integers(0, units, size=(min(per, n - start), units))


def _labels(y_true, preds: list, n_labels: int | None) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Label ids as arrays, and the number of labels (`n_labels`, else the largest id seen + 1)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    preds = [np.asarray(p, dtype=np.int64) for p in preds]
    k = int(max([y_true.max(initial=0)] + [p.max(initial=0) for p in preds])) + 1
    return y_true, preds, max(k, n_labels or 0)


def _interval(values: np.ndarray, level: float) -> list[float]:
    return [float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, (1 + level) / 2))]


def _difference(point: float, diffs: np.ndarray, level: float, higher_is_better: bool = True) -> dict:
    """{difference, interval, verdict}: `better` when the interval of a - b lies on the good side of zero
    (above it when higher is better), `worse` when on the other side, else `no clear difference`."""
    low, high = _interval(diffs, level)
    good, bad = (low > 0, high < 0) if higher_is_better else (high < 0, low > 0)
    return {"difference": float(point), "interval": [low, high],
            "verdict": "better" if good else "worse" if bad else "no clear difference"}


def bootstrap_interval(y_true, y_pred, metric: str = "macro_f1", n: int = 1000, seed: int = 0,
                       level: float = 0.95, n_labels: int | None = None) -> list[float]:
    """The percentile bootstrap interval of `metric` (accuracy or macro_f1 over `n_labels` labels, default the
    largest id + 1) over resampled rows (seeded)."""
    y_true, (y_pred,), k = _labels(y_true, [y_pred], n_labels)
    return _interval(np.concatenate([_resampled_scores(metric, y_true, y_pred, idx, k)
                                     for idx in _draws(len(y_true), n, seed)]), level)


def paired_bootstrap(y_true, pred_a, pred_b, metric: str = "macro_f1", n: int = 1000, seed: int = 0,
                     level: float = 0.95, n_labels: int | None = None) -> dict:
    """`metric`(a) - `metric`(b) on the same rows, with its percentile interval over resamples that draw the same
    rows for both; `better` when the interval lies above zero, `worse` below it, else `no clear difference`."""
    y_true, (pred_a, pred_b), k = _labels(y_true, [pred_a, pred_b], n_labels)

    def diff(idx):
        return _resampled_scores(metric, y_true, pred_a, idx, k) - _resampled_scores(metric, y_true, pred_b, idx, k)

    diffs = np.concatenate([diff(idx) for idx in _draws(len(y_true), n, seed)])
    return _difference(diff(np.arange(len(y_true))[None])[0], diffs, level)


def _ratios(num, den, idx: np.ndarray, transform) -> np.ndarray:
    """transform(sum num / sum den) over each resample's units (rows of `idx`)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    a, b = num[idx].sum(1), den[idx].sum(1)
    ratio = np.divide(a, b, out=np.zeros_like(a), where=b > 0)
    return transform(ratio) if transform else ratio


def ratio_interval(num, den, n: int = 1000, seed: int = 0, level: float = 0.95, transform=None) -> list[float]:
    """The percentile bootstrap interval of transform(sum(num) / sum(den)) over resampled units (rows, blocks):
    a mean (den = 1 each), entity F1 (num = 2tp, den = 2tp + fp + fn), perplexity (loss sums over token counts,
    transform = exp). Units are what is resampled, so they should be independent of each other."""
    return _interval(np.concatenate([_ratios(num, den, idx, transform) for idx in _draws(len(num), n, seed)]),
                     level)


def paired_ratio(a: tuple, b: tuple, n: int = 1000, seed: int = 0, level: float = 0.95, transform=None,
                 higher_is_better: bool = True) -> dict:
    """`ratio_interval`'s statistic of a (num, den) minus b's on the same units (each resample draws the same units
    for both), as `paired_bootstrap` reports it."""
    def diff(idx):
        return _ratios(*a, idx, transform) - _ratios(*b, idx, transform)

    diffs = np.concatenate([diff(idx) for idx in _draws(len(a[0]), n, seed)])
    return _difference(diff(np.arange(len(a[0]))[None])[0], diffs, level, higher_is_better)


def mcnemar(y_true, pred_a, pred_b) -> dict:
    """McNemar's exact test of equal accuracy on paired rows: of the rows exactly one of a and b gets right
    (`a_only`, `b_only`), a two-sided binomial test of an even split. `p_value` 1.0 when there are none."""
    from scipy.stats import binomtest  # scipy.stats takes ~0.3 s to import; only the tests need it

    y_true, pred_a, pred_b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    right_a, right_b = pred_a == y_true, pred_b == y_true
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": float(p)}


RANK_CUTOFFS = (1, 5, 10)  # recall@k of a retrieval report
MRR_DEPTH = 10  # a relevant passage ranked below this counts as not found (reciprocal rank 0)


def top_indices(scores: np.ndarray, k: int) -> list[int]:
    """The indices of the `k` highest `scores`, best first; ties in index order (deterministic)."""
    k = min(k, len(scores))
    if k <= 0:
        return []
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return sorted(top.tolist(), key=lambda j: (-scores[j], j))


def ranking_metrics(scores: np.ndarray, relevant: list[set[int]]) -> dict:
    """Retrieval scores of a [queries, passages] score matrix, `relevant[i]` the passages (columns) relevant to
    query i -> {"scores": {"mrr@10", "recall@1", "recall@5", "recall@10"}, "reciprocal_ranks": per query}.
    recall@k: the share of a query's relevant passages among its top k, averaged over queries."""
    depth = max(MRR_DEPTH, *RANK_CUTOFFS)
    rr, hits = [], {k: [] for k in RANK_CUTOFFS}
    for row, rel in zip(scores, relevant):
        top = top_indices(row, depth)
        first = next((rank for rank, j in enumerate(top[:MRR_DEPTH]) if j in rel), None)
        rr.append(0.0 if first is None else 1.0 / (first + 1))
        for k in RANK_CUTOFFS:
            hits[k].append(len(rel.intersection(top[:k])) / max(1, len(rel)))
    mean = (lambda v: float(np.mean(v)) if v else 0.0)
    return {"scores": {f"mrr@{MRR_DEPTH}": mean(rr), **{f"recall@{k}": mean(hits[k]) for k in RANK_CUTOFFS}},
            "reciprocal_ranks": rr}
