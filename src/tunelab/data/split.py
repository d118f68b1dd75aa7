"""Seeded stratified train/validation/test split."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


SPLIT_ORDER = ("train", "validation", "test")


def group_split(rows: list[dict], label_field: str, val_ratio: float, test_ratio: float,
                seed: int) -> dict[str, list[dict]]:
    """Seeded stratified split that never separates rows sharing a `_group` value (`split_units` on rows)."""
    units: dict[object, int] = {}
    unit = np.fromiter((units.setdefault(r.get("_group", ("row", i)), len(units)) for i, r in enumerate(rows)),
                       dtype=np.int64, count=len(rows))
    firsts = np.unique(unit, return_index=True)[1]
    names = sorted({rows[i][label_field] or "" for i in firsts.tolist()})
    code = {name: c for c, name in enumerate(names)}
    unit_label = np.array([code[rows[i][label_field] or ""] for i in firsts.tolist()], dtype=np.int64)
    order = split_units(unit, unit_label, val_ratio, test_ratio, seed)
    return {name: [rows[i] for i in order[name].tolist()] for name in SPLIT_ORDER}


def split_units(unit: np.ndarray, unit_label: np.ndarray, val_ratio: float, test_ratio: float,
                seed: int) -> dict[str, np.ndarray]:
    """Row indices of each split, in the order the split is written.

    `unit[i]` is row i's unit (a near-duplicate group, or the row alone), units numbered 0.. in order of first
    appearance; `unit_label[u]` the label of unit u's first row, as its rank among the sorted label names. Each
    label's units are shuffled and cut by the ratios (rounded per label); labels too rare for every split keep their
    units in train first, then test. Rows keep the source order in their split, then each split is shuffled, so
    files are not ordered by label. The same units, ratios and seed always give the same split."""
    rng = np.random.default_rng(seed)
    unit_split = np.zeros(len(unit_label), dtype=np.int8)  # 0 train, 1 validation, 2 test
    for label in range(int(unit_label.max()) + 1 if len(unit_label) else 0):
        keys = np.flatnonzero(unit_label == label)
        n = len(keys)
        if n == 0:
            continue
        order = rng.permutation(n)
        n_test = int(round(n * test_ratio)) if n >= 3 else (1 if n == 2 and test_ratio > 0 else 0)
        n_val = int(round(n * val_ratio)) if n >= 3 else 0
        position = np.arange(n)
        unit_split[keys[order]] = np.where(position < n_test, 2, np.where(position < n_test + n_val, 1, 0))
    row_split = unit_split[unit]
    out = {}
    for code, name in enumerate(SPLIT_ORDER):
        idx = np.flatnonzero(row_split == code)
        out[name] = idx[rng.permutation(len(idx))]
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


def seeded_subset(rows: list[dict], n: int | None, seed: int, stratify: str | None = None) -> list[dict]:
    """At most `n` of `rows` (all of them when `n` is None), chosen by `seed`, in their original order:
    stratified by the field `stratify` when given (`sample_rows`), else uniformly. Training draws its
    `max_train_examples` / `max_eval_examples` subsets with it, and evaluation rebuilds them with it."""
    if n is None:
        return rows
    if stratify is not None:
        return sample_rows(rows, n, stratify, seed)[0]
    if n >= len(rows):
        return rows
    keep = sorted(np.random.default_rng(seed).choice(len(rows), n, replace=False).tolist())
    return [rows[i] for i in keep]



def group_kfold(rows: list[dict], k: int, seed: int, groups: list[int], label_field: str | None = None
                ) -> list[int]:
    """Seeded k-fold assignment -> the fold (0..k-1) of each row; rows sharing a `groups` value share a fold.

    Units are groups, stratified by the label of their first row when `label_field` is given: each label's units
    are shuffled and each goes to the fold holding the fewest rows so far (ties: the next fold in turn), so folds
    get each label's share and sizes within a group's size of each other."""
    rng = np.random.default_rng(seed)
    units: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        units.setdefault(int(g), []).append(i)
    by_label: dict[str, list[int]] = defaultdict(list)
    for key, members in units.items():
        by_label[str(rows[members[0]].get(label_field) or "") if label_field else ""].append(key)
    fold = [0] * len(rows)
    sizes, turn = [0] * k, 0
    for label in sorted(by_label):
        keys = by_label[label]
        for j in rng.permutation(len(keys)):
            members = units[keys[j]]
            target = min(range(k), key=lambda f: (sizes[f], (f - turn) % k))
            for i in members:
                fold[i] = target
            sizes[target] += len(members)
            turn = (target + 1) % k
    return fold
