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
    """`metric` (accuracy, or macro-F1 over the labels present in either) of each resample `idx[j]` of the rows,
    from one confusion matrix per resample (vectorised)."""
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"unknown metric {metric}")
    n = len(idx)
    codes = y_true[idx] * k + y_pred[idx] + (np.arange(n) * k * k)[:, None]
    cm = np.bincount(codes.ravel(), minlength=n * k * k).reshape(n, k, k).astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    if metric == "accuracy":
        return tp.sum(1) / idx.shape[1]
    denom = cm.sum(1) + cm.sum(2)  # 2tp + fp + fn
    present = denom > 0
    f1 = np.where(present, 2 * tp / np.where(present, denom, 1), 0.0)
    return f1.sum(1) / np.maximum(present.sum(1), 1)


def _resamples(y_true, preds: list, n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, int]:
    y_true = np.asarray(y_true, dtype=np.int64)
    preds = [np.asarray(p, dtype=np.int64) for p in preds]
    k = int(max([y_true.max(initial=0)] + [p.max(initial=0) for p in preds])) + 1
    idx = np.random.default_rng(seed).integers(0, len(y_true), size=(n, len(y_true)))
    return y_true, preds, idx, k


def bootstrap_interval(y_true, y_pred, metric: str = "macro_f1", n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> list[float]:
    """The percentile bootstrap interval of `metric` (accuracy or macro_f1) over resampled rows (seeded)."""
    y_true, (y_pred,), idx, k = _resamples(y_true, [y_pred], n, seed)
    values = _resampled_scores(metric, y_true, y_pred, idx, k)
    return [float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, (1 + level) / 2))]


def paired_bootstrap(y_true, pred_a, pred_b, metric: str = "macro_f1", n: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """`metric`(a) - `metric`(b) on the same rows, with its percentile interval over resamples that draw the same
    rows for both; `better` when the interval lies above zero, `worse` below it, else `no clear difference`."""
    y_true, (pred_a, pred_b), idx, k = _resamples(y_true, [pred_a, pred_b], n, seed)
    diffs = _resampled_scores(metric, y_true, pred_a, idx, k) - _resampled_scores(metric, y_true, pred_b, idx, k)
    whole = np.arange(len(y_true))[None]
    difference = float((_resampled_scores(metric, y_true, pred_a, whole, k)
                        - _resampled_scores(metric, y_true, pred_b, whole, k))[0])
    low, high = float(np.quantile(diffs, (1 - level) / 2)), float(np.quantile(diffs, (1 + level) / 2))
    return {"difference": difference, "interval": [low, high],
            "verdict": "better" if low > 0 else "worse" if high < 0 else "no clear difference"}
