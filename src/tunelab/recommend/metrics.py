"""Top-k ranking metrics over the full candidate set, per user (no sampled negatives).

A user's candidates are the split's catalogue (warm items for the warm splits, cold items for `cold_test`) minus
the items in the history the model saw. Per user: precision@k (hits / k), recall@k (hits / relevant), NDCG@k
(binary gains, ideal = min(relevant, k) hits on top), reciprocal rank of the first relevant item over the whole
ranking (MRR). Coverage: distinct items in all top-k lists / candidate items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunelab.evaluate.metrics import paired_ratio, ratio_interval

METRICS = ("precision", "recall", "ndcg", "mrr")


@dataclass
class UserScores:
    """Per evaluated user, each metric; `top` = the union of top-k lists (for coverage)."""

    values: dict[str, np.ndarray]
    covered: int
    candidates: int

    def summary(self, k: int, n_boot: int = 1000, seed: int = 0) -> dict:
        out = {}
        for m in METRICS:
            v = self.values[m]
            name = m if m == "mrr" else f"{m}@{k}"
            out[name] = {"value": float(v.mean()) if len(v) else 0.0,
                         "interval": ratio_interval(v, np.ones_like(v), n=n_boot, seed=seed) if len(v) else [0, 0]}
        out["coverage"] = self.covered / max(1, self.candidates)
        out["users"] = int(len(self.values["ndcg"]))
        return out


def rank_metrics(scores: np.ndarray, allowed: np.ndarray, relevant: list[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Per row of `scores` [users, items]: the metrics of ranking the `allowed` items by score against `relevant`
    item indices (those not allowed are ignored; a row with none scores 0). Ties count against the model: a
    relevant item ranks after every non-relevant item with an equal score (a constant scorer gets no credit for
    the catalogue's order); relevant items with equal scores take consecutive places; a NaN score ranks last."""
    n = len(scores)
    out = {m: np.zeros(n) for m in METRICS}
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for row in range(n):
        ok = allowed[row]
        rel = np.unique(relevant[row][ok[relevant[row]]])
        if len(rel) == 0:
            continue
        s = np.nan_to_num(scores[row].astype(np.float64), nan=-np.inf)
        other = np.where(ok, s, np.nan)  # NaN compares false: neither counted ahead nor behind
        other[rel] = np.nan
        rs = s[rel]
        place = np.empty(len(rs), np.int64)  # among the relevant: by score, ties in item order
        place[np.argsort(-rs, kind="stable")] = np.arange(len(rs))
        # 1 + non-relevant allowed items scored ≥ it + relevant items placed before it
        ranks = 1 + (other[None, :] >= rs[:, None]).sum(1) + place
        top = ranks[ranks <= k]
        out["precision"][row] = len(top) / k
        out["recall"][row] = len(top) / len(rel)
        out["ndcg"][row] = (1.0 / np.log2(top + 1)).sum() / discounts[:min(len(rel), k)].sum()
        out["mrr"][row] = 1.0 / ranks.min()
    return out


def ranking(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """[users, items] item indices, best first: allowed items by score (equal scores in item order), then the rest."""
    s = np.where(allowed, -scores.astype(np.float64), np.inf)
    return np.argsort(s, axis=1, kind="stable")


def top_k(scores: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """[users, k] item indices, best first; -1 where a user has fewer than k allowed items."""
    order = ranking(scores, allowed)[:, :k]
    return np.where(np.take_along_axis(allowed, order, 1), order, -1)


def compare(a: UserScores, b: UserScores, metric: str = "ndcg", n_boot: int = 1000, seed: int = 0) -> dict:
    """a − b on the same users, with the paired bootstrap interval and verdict."""
    va, vb = a.values[metric], b.values[metric]
    ones = np.ones_like(va)
    return paired_ratio((va, ones), (vb, ones), n=n_boot, seed=seed)


def candidates(pool: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """[len(histories), items] bool: the `pool` items (warm or cold) minus each history's items."""
    allowed = np.tile(pool, (len(histories), 1))
    for row, h in enumerate(histories):
        allowed[row, h] = False
    return allowed


def history_splits(split: str) -> tuple[str, ...]:
    """What a model has seen when `split` is scored: train for validation; train and validation for the tests."""
    return ("train",) if split == "validation" else ("train", "validation")


def evaluate(model, data, split: str, k: int = 10, batch: int = 256) -> UserScores:
    """`model` (fitted on `history_splits(split)` of `data`) on `split`: every user with a target there, over the
    full candidate set (warm items, or cold items for `cold_test`) minus their history. `cold_test` is scored
    from each user's history before their targets (`Interactions.cold_cases`), as a new history (no per-user state
    is used; what a model learnt about items from train + validation still is: the cold items are in neither)."""
    if split == "cold_test":
        histories, targets, earlier = data.cold_cases()
    else:
        earlier = {}
        histories, targets = data.histories(*history_splits(split)), data.targets(split)
    users = np.array(sorted(targets), dtype=np.int64)
    known = split != "cold_test"
    pool = data.cold if split == "cold_test" else ~data.cold
    values = {m: [] for m in METRICS}
    covered = np.zeros(data.n_items, bool)
    for start in range(0, len(users), batch):
        chunk = users[start:start + batch]
        hist = [histories[u] for u in chunk]
        allowed = candidates(pool, hist)
        for row, u in enumerate(chunk.tolist()):
            allowed[row, earlier.get(u, [])] = False  # cold items picked before: neither a target nor a miss
        scores = model.score(hist, chunk if known else np.full(len(chunk), -1), allowed)
        for m, v in rank_metrics(scores, allowed, [targets[u] for u in chunk], k).items():
            values[m].append(v)
        top = top_k(scores, allowed, k)
        covered[top[top >= 0]] = True
    return UserScores({m: np.concatenate(v) if v else np.zeros(0) for m, v in values.items()},
                      int(covered.sum()), int(pool.sum()))
