"""Seeded stratified train/validation/test split."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def stratified_split(rows: list[dict], label_field: str, val_ratio: float, test_ratio: float,
                     seed: int) -> dict[str, list[dict]]:
    """Split each label's rows by the ratios (rounded per label), shuffled with `seed`.

    Labels too rare for every split keep their rows in train first, then test, then validation.
    The same rows, ratios and seed always give the same split.
    """
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_label[r[label_field]].append(i)
    assign: dict[int, str] = {}
    for label in sorted(by_label):
        idx = np.array(by_label[label])
        rng.shuffle(idx)
        n = len(idx)
        n_test = int(round(n * test_ratio)) if n >= 3 else (1 if n == 2 else 0)
        n_val = int(round(n * val_ratio)) if n >= 3 else 0
        for j, i in enumerate(idx):
            assign[int(i)] = "test" if j < n_test else "validation" if j < n_test + n_val else "train"
    out = {"train": [], "validation": [], "test": []}
    for i, r in enumerate(rows):
        out[assign[i]].append(r)
    # Shuffle within each split so files are not ordered by label.
    for name in out:
        order = rng.permutation(len(out[name]))
        out[name] = [out[name][k] for k in order]
    return out


def sample_rows(rows: list[dict], n: int, label_field: str, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded, label-stratified sample of `n` rows -> (sample, rest), each in the original order."""
    if n >= len(rows):
        return rows, []
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_label[r[label_field]].append(i)
    # Largest-remainder quotas: per-label shares that add up to exactly n.
    labels = sorted(by_label)
    exact = np.array([n * len(by_label[label]) / len(rows) for label in labels])
    quota = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:
        quota[k] += 1
    chosen: set[int] = set()
    for label, q in zip(labels, quota):
        chosen.update(int(i) for i in rng.choice(np.array(by_label[label]), size=int(q), replace=False))
    return ([r for i, r in enumerate(rows) if i in chosen], [r for i, r in enumerate(rows) if i not in chosen])
