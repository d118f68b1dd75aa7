"""`hybrid`: a weighted sum of member recommenders' scores, each standardised per user over the candidates
(mean 0, std 1), so members on different scales blend; the weights are chosen on the validation split."""

from __future__ import annotations

import itertools

import numpy as np

from tunelab.recommend.metrics import rank_metrics
from tunelab.recommend.models import Recommender, standardise


class Hybrid(Recommender):
    name = "hybrid"

    def __init__(self, members: list[Recommender], weights: list[float]):
        self.members, self.weights = members, [float(w) for w in weights]
        self.params = {"members": [{"name": m.name, "params": m.params} for m in members], "weights": self.weights}

    def fit(self, histories, catalogue):
        for m in self.members:
            m.fit(histories, catalogue)

    def score(self, histories, users, allowed=None):
        total = np.zeros((len(histories), 0), np.float32)
        for m, w in zip(self.members, self.weights):
            if w:
                part = w * standardise(m.score(histories, users, allowed), allowed)
                total = part if total.shape[1] == 0 else total + part
        return total if total.shape[1] else np.zeros((len(histories), 1), np.float32)

    def warm(self):
        for m in self.members:
            m.warm()

    def arrays(self):
        return {f"{k}.{name}": arr for k, m in enumerate(self.members) for name, arr in m.arrays().items()}

    def load_arrays(self, arrays, catalogue):
        for k, m in enumerate(self.members):
            m.load_arrays({name.split(".", 1)[1]: arr for name, arr in arrays.items()
                           if name.split(".", 1)[0] == str(k)}, catalogue)


def weight_grid(n: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """Every weight vector of `n` members on a `step` grid summing to 1."""
    units = int(round(1 / step))
    return [tuple(c / units for c in combo) for combo in itertools.product(range(units + 1), repeat=n)
            if sum(combo) == units]


def choose_weights(member_scores: list[np.ndarray], allowed: np.ndarray, relevant: list[np.ndarray],
                   k: int) -> tuple[tuple[float, ...], float]:
    """The weights (on a 0.1 grid) whose blend of the standardised `member_scores` has the best mean NDCG@k;
    ties go to the earlier grid point."""
    z = [standardise(s, allowed) for s in member_scores]
    best, best_score = None, -1.0
    for weights in weight_grid(len(z)):
        blend = sum(w * s for w, s in zip(weights, z) if w)
        score = float(rank_metrics(blend, allowed, relevant, k)["ndcg"].mean())
        if score > best_score + 1e-12:
            best, best_score = weights, score
    return best, best_score
