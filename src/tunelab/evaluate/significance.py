"""Intervals and paired tests for reports: is the fine-tuned model really better than a baseline?

Every interval is a seeded percentile bootstrap (95%) over the evaluated units: rows for classification,
sentences for NER, blocks of tokens for perplexity, answers for ROUGE-L. A comparison is paired: each resample
draws the same units for both sides, and only the rows both were scored on take part (the zero-shot baseline
scores a seeded sample of the split). A comparison says `better` only when the interval of the difference
excludes zero on the good side; for accuracy, McNemar's exact test is given too.
"""

from __future__ import annotations

import math

import numpy as np

from tunelab.evaluate.metrics import bootstrap_interval, mcnemar, paired_bootstrap, paired_ratio, ratio_interval

LEVEL = 0.95


def settings(resamples: int, seed: int, unit: str) -> dict:
    """What the report's intervals are, in its `statistics` field."""
    return {"method": "percentile bootstrap", "level": LEVEL, "resamples": resamples, "seed": seed, "unit": unit}


def class_intervals(y, pred, resamples: int, seed: int, n_labels: int | None = None) -> dict:
    """{accuracy, macro_f1: [low, high]} of label ids `pred` against `y` (macro-F1 over `n_labels` labels)."""
    return {m: bootstrap_interval(y, pred, m, resamples, seed, LEVEL, n_labels) for m in ("accuracy", "macro_f1")}


def compare_classes(y, model_pred, base_pred, rows, resamples: int, seed: int, n_labels: int | None = None) -> dict:
    """The model minus a baseline on the rows the baseline scored (`rows`: their positions in `y`; None = all):
    paired intervals of the macro-F1 (over `n_labels` labels) and accuracy differences, and McNemar's test (a = the
    model)."""
    y, model_pred, base_pred = np.asarray(y), np.asarray(model_pred), np.asarray(base_pred)
    if rows is not None:
        y, model_pred = y[np.asarray(rows, dtype=np.int64)], model_pred[np.asarray(rows, dtype=np.int64)]
    if len(y) != len(base_pred):
        raise ValueError(f"{len(base_pred)} baseline predictions for {len(y)} rows")
    return {"rows": int(len(y)),
            **{m: paired_bootstrap(y, model_pred, base_pred, m, resamples, seed, LEVEL, n_labels)
               for m in ("macro_f1", "accuracy")},
            "mcnemar": mcnemar(y, model_pred, base_pred)}


def entity_counts(gold: list[list[str]], pred: list[list[str]]) -> np.ndarray:
    """Per sentence (true positives, false positives, false negatives) of entities (type and span both match),
    found as seqeval's default mode finds them: summed over sentences they give its micro P/R/F1."""
    from seqeval.metrics.sequence_labeling import get_entities  # seqeval pulls in sklearn; only NER needs it

    out = np.zeros((len(gold), 3), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold, pred)):
        true, found = set(get_entities(list(g))), set(get_entities(list(p)))
        out[i] = len(true & found), len(found - true), len(true - found)
    return out


def _f1_parts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tp, fp, fn = counts.T
    return 2 * tp, 2 * tp + fp + fn


def entity_intervals(counts: np.ndarray, resamples: int, seed: int) -> dict:
    """{entity_f1, entity_precision, entity_recall: [low, high]} over resampled sentences."""
    tp, fp, fn = counts.T
    return {"entity_f1": ratio_interval(*_f1_parts(counts), resamples, seed, LEVEL),
            "entity_precision": ratio_interval(tp, tp + fp, resamples, seed, LEVEL),
            "entity_recall": ratio_interval(tp, tp + fn, resamples, seed, LEVEL)}


def compare_entities(model_counts: np.ndarray, base_counts: np.ndarray, resamples: int, seed: int) -> dict:
    """The model's entity F1 minus a baseline's on the same sentences, paired."""
    return {"rows": int(len(model_counts)),
            "entity_f1": paired_ratio(_f1_parts(model_counts), _f1_parts(base_counts), resamples, seed, LEVEL)}


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(np.minimum(x, 50.0))  # as the reports cap a diverged loss's perplexity


def perplexity_interval(blocks: list[tuple[float, int]], resamples: int, seed: int) -> list[float]:
    """The perplexity's interval over resampled blocks ((loss sum, tokens) each)."""
    loss, tokens = np.asarray(blocks, dtype=np.float64).reshape(-1, 2).T
    return ratio_interval(loss, tokens, resamples, seed, LEVEL, _exp)


def compare_perplexity(after: list[tuple[float, int]], before: list[tuple[float, int]], resamples: int,
                       seed: int) -> dict | None:
    """After minus before perplexity on the same blocks (lower is better), paired; None when the two were not
    scored on the same blocks (another tokenizer cuts other blocks: compare their intervals instead)."""
    a, b = (np.asarray(x, dtype=np.float64).reshape(-1, 2) for x in (after, before))
    if a.shape != b.shape or not np.array_equal(a[:, 1], b[:, 1]):
        return None
    return {"rows": int(len(a)), "perplexity": paired_ratio((a[:, 0], a[:, 1]), (b[:, 0], b[:, 1]), resamples, seed,
                                                            LEVEL, _exp, higher_is_better=False)}


def mean_interval(values: list[float], resamples: int, seed: int) -> list[float]:
    """A mean's interval over resampled values (ROUGE-L per answer, say)."""
    return ratio_interval(values, np.ones(len(values)), resamples, seed, LEVEL) if values else [math.nan] * 2


def compare_means(a: list[float], b: list[float], resamples: int, seed: int) -> dict:
    """mean(a) - mean(b) over the same items, paired."""
    ones = np.ones(len(a))
    return {"rows": len(a), **paired_ratio((np.asarray(a), ones), (np.asarray(b), ones), resamples, seed, LEVEL)}
