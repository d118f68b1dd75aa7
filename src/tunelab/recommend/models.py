"""The recommenders. Each scores the whole catalogue for a batch of users from their histories (item indices in
time order, most recent last); higher is better. The evaluation and the server then drop what is not a candidate.

- `popularity`: interactions per item in the data it was fitted on.
- `genre-popularity`: an item scored by how much the user picks its categories (smoothed by their overall
  popularity); it scores items nobody has seen, so it is the cold-start baseline.
- `random`: seeded random scores (the floor).
- `itemknn`: item-item cosine over co-interactions (shrunk, each item's `neighbors` best kept), a user's score the
  sum of the similarities of their history items, the most recent ones weighted most (`decay` per step back).
- `als`, `bpr`: the `implicit` library's alternating least squares and Bayesian personalised ranking. A known user
  is scored with the factors learnt for them; a new history is folded in by one least-squares solve against the
  item factors (exact for ALS, an approximation for BPR).
- `text`: item embeddings from a sentence encoder over the item text (MiniLM or a fine-tuned retrieval model dir);
  a user is the recency-weighted mean of their history's embeddings, scored by cosine, plus (weight `prior`) the
  popularity a ridge regression reads from an item's embedding. It scores cold items.

`hybrid.py` blends them; `ranker.py` re-ranks one's top candidates with a fine-tuned language model. Every model
returns `arrays()` (what it saves); `store.build(name, params)` + `load_arrays` rebuild it with identical scores.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from tunelab.errors import UserError


@dataclass
class Catalogue:
    """What models may read about the items: their text and categories (catalogue order)."""

    texts: list[str]
    categories: list[list[str]]
    titles: list[str]  # short names (a ranker's history is rendered from them)

    @property
    def n_items(self) -> int:
        return len(self.texts)

    @classmethod
    def of(cls, items: list[dict]) -> Catalogue:
        """From the catalogue rows (`items.jsonl`): text (else title, else id), categories, title (else text)."""
        return cls([row.get("text") or row.get("title") or str(row["item"]) for row in items],
                   [list(row.get("categories") or []) for row in items],
                   [row.get("title") or row.get("text") or str(row["item"]) for row in items])


def interaction_matrix(histories: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    """users × items, 1 where the user interacted (float32)."""
    lengths = np.array([len(h) for h in histories])
    rows = np.repeat(np.arange(len(histories)), lengths)
    cols = np.concatenate(histories) if len(histories) else np.zeros(0, dtype=np.int64)
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(histories), n_items))
    m.data[:] = 1.0  # a repeated item counts once
    return m


def recency_weights(histories: list[np.ndarray], n_items: int, decay: float) -> sp.csr_matrix:
    """users × items, weight exp(-decay × steps back) of each history item (the latest 1), summed over repeats."""
    rows, cols, vals = [], [], []
    for u, h in enumerate(histories):
        rows.append(np.full(len(h), u))
        cols.append(h)
        vals.append(np.exp(-decay * np.arange(len(h))[::-1]))
    if not rows:
        return sp.csr_matrix((0, n_items), dtype=np.float32)
    return sp.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(len(histories), n_items))


def standardise(scores: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Per row, (s − mean) / std over the allowed entries (all when None); a constant row becomes 0."""
    s = scores.astype(np.float32)
    mask = np.ones_like(s, bool) if allowed is None else allowed
    n = np.maximum(mask.sum(1, keepdims=True), 1)
    mean = np.where(mask, s, 0).sum(1, keepdims=True) / n
    var = np.where(mask, (s - mean) ** 2, 0).sum(1, keepdims=True) / n
    std = np.sqrt(var)
    return np.divide(s - mean, std, out=np.zeros_like(s), where=std > 1e-12)


class Recommender:
    """The interface. `users`: the index of each history's user in the data the model was fitted on, -1 for a
    history given explicitly (a model with per-user state falls back to the history)."""

    name = ""
    params: dict

    def fit(self, histories: list[np.ndarray], catalogue: Catalogue) -> None:
        raise NotImplementedError

    def score(self, histories: list[np.ndarray], users: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(histories), n_items]; `allowed` (bool, same shape) marks the candidates (only a two-stage
        model needs it)."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def warm(self) -> None:
        """Load now whatever scoring loads lazily (a server warms a model before it says it is ready)."""

    def load_arrays(self, arrays: dict[str, np.ndarray], catalogue: Catalogue) -> None:
        raise NotImplementedError


class Popularity(Recommender):
    name = "popularity"

    def __init__(self, params: dict | None = None):
        self.params = dict(params or {})

    def fit(self, histories, catalogue):
        self.counts = np.asarray(interaction_matrix(histories, catalogue.n_items).sum(0), np.float32).ravel()

    def score(self, histories, users, allowed=None):
        return np.broadcast_to(self.counts, (len(histories), len(self.counts))).copy()

    def arrays(self):
        return {"counts": self.counts}

    def load_arrays(self, arrays, catalogue):
        self.counts = arrays["counts"]


class GenrePopularity(Recommender):
    """How much a user picks an item's categories: the mean, over the item's categories, of their share in the
    user's history, smoothed by their share of all training interactions (one pseudo-interaction spread by it; a
    user with no history gets the global shares). Items with the same categories tie: a fixed seeded jitter, below
    half the row's smallest score gap, breaks the ties at random (the metrics would otherwise count each tie
    against it) and reorders nothing else."""

    name = "genre-popularity"

    def __init__(self, params: dict | None = None):
        self.params = {"seed": 0, **(params or {})}

    def fit(self, histories, catalogue):
        names = sorted({g for cats in catalogue.categories for g in cats})
        index = {g: k for k, g in enumerate(names)}
        member = np.zeros((catalogue.n_items, max(1, len(names))), np.float32)
        for i, cats in enumerate(catalogue.categories):
            for g in set(cats):
                member[i, index[g]] = 1.0
        counts = np.asarray(interaction_matrix(histories, catalogue.n_items).sum(0)).ravel()
        total = counts @ member
        self.member = member
        self.global_share = (total / max(total.sum(), 1e-12)).astype(np.float32)
        self.jitter = np.random.default_rng(int(self.params["seed"])).random(catalogue.n_items).astype(np.float32)

    def score(self, histories, users, allowed=None):
        picked = interaction_matrix(histories, len(self.member)) @ self.member  # users × categories
        share = (picked + self.global_share) / (picked.sum(1, keepdims=True) + 1.0)
        per_item = np.maximum(self.member.sum(1), 1.0)
        s = (share @ self.member.T / per_item).astype(np.float64)
        for row in s:
            levels = np.unique(row)
            gap = np.diff(levels).min() if len(levels) > 1 else 1.0
            row += 0.5 * gap * self.jitter
        return s

    def arrays(self):
        return {"member": self.member, "global_share": self.global_share, "jitter": self.jitter}

    def load_arrays(self, arrays, catalogue):
        self.member, self.global_share, self.jitter = arrays["member"], arrays["global_share"], arrays["jitter"]


class Random(Popularity):
    name = "random"

    def fit(self, histories, catalogue):
        self.counts = np.zeros(catalogue.n_items, np.float32)

    def score(self, histories, users, allowed=None):
        rng = np.random.default_rng(int(self.params.get("seed", 0)))
        return rng.random((len(histories), len(self.counts)), dtype=np.float32)


class ItemKNN(Recommender):
    name = "itemknn"
    defaults = {"neighbors": 100, "shrink": 10.0, "decay": 0.0}

    def __init__(self, params: dict | None = None):
        self.params = {**self.defaults, **(params or {})}

    def fit(self, histories, catalogue):
        x = interaction_matrix(histories, catalogue.n_items).tocsc()
        counts = np.asarray(x.sum(0)).ravel()
        co = (x.T @ x).tocsr().astype(np.float32)
        co.setdiag(0)
        co.eliminate_zeros()
        norm = np.sqrt(counts)
        rows = np.repeat(np.arange(co.shape[0]), np.diff(co.indptr))
        co.data = co.data / (norm[rows] * norm[co.indices] + float(self.params["shrink"]))
        self.sim = _top_per_row(co, int(self.params["neighbors"]))

    def score(self, histories, users, allowed=None):
        w = recency_weights(histories, self.sim.shape[0], float(self.params["decay"]))
        return np.asarray((w @ self.sim).todense(), dtype=np.float32)

    def arrays(self):
        return {"indptr": self.sim.indptr, "indices": self.sim.indices, "data": self.sim.data}

    def load_arrays(self, arrays, catalogue):
        n = catalogue.n_items
        self.sim = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=(n, n))


def _top_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Each row's k largest entries (rows are the history item, columns the item scored)."""
    indptr, indices, data = [0], [], []
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        vals, cols = m.data[lo:hi], m.indices[lo:hi]
        if len(vals) > k:
            keep = np.argpartition(-vals, k)[:k]
            vals, cols = vals[keep], cols[keep]
        indices.append(cols)
        data.append(vals)
        indptr.append(indptr[-1] + len(vals))
    return sp.csr_matrix((np.concatenate(data).astype(np.float32), np.concatenate(indices), np.array(indptr)),
                         shape=m.shape)


class _Factors(Recommender):
    """Matrix factorisation through `implicit` (CPU). One thread: deterministic (BPR needs it) and no BLAS
    oversubscription."""

    defaults: dict = {}

    def __init__(self, params: dict | None = None):
        self.params = {**self.defaults, **(params or {})}

    def _model(self):
        raise NotImplementedError

    def fit(self, histories, catalogue):
        from threadpoolctl import threadpool_limits  # imported inside: only fitting needs it

        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            # implicit reads OpenBLAS's configured pool, not the limit in force here
            warnings.filterwarnings("ignore", message="OpenBLAS is configured", category=RuntimeWarning)
            model = self._model()
            model.fit(interaction_matrix(histories, catalogue.n_items), show_progress=False)
        self.user_factors = np.asarray(model.user_factors, np.float32)
        self.item_factors = np.asarray(model.item_factors, np.float32)

    def score(self, histories, users, allowed=None):
        users = np.asarray(users)
        known = (users >= 0) & (users < len(self.user_factors))
        u = np.zeros((len(histories), self.item_factors.shape[1]), np.float32)
        u[known] = self.user_factors[users[known]]
        for row in np.flatnonzero(~known):
            u[row] = self.fold_in(histories[row])
        return u @ self.item_factors.T

    def fold_in(self, history: np.ndarray) -> np.ndarray:
        """The user factors that best explain `history` given the item factors: implicit's ALS user step
        (confidence alpha on each history item, 1 elsewhere): (YᵀY + reg·I + (alpha − 1)·YₕᵀYₕ) x = alpha·Σ yₕ."""
        y = self.item_factors.astype(np.float64)
        alpha, reg = float(self.params.get("alpha", 1.0)), float(self.params.get("regularization", 0.01))
        if len(history) == 0:
            return np.zeros(y.shape[1], np.float32)
        yh = y[np.unique(history)]
        a = y.T @ y + reg * np.eye(y.shape[1]) + (alpha - 1) * yh.T @ yh
        return np.linalg.solve(a, alpha * yh.sum(0)).astype(np.float32)

    def arrays(self):
        return {"user_factors": self.user_factors, "item_factors": self.item_factors}

    def load_arrays(self, arrays, catalogue):
        self.user_factors, self.item_factors = arrays["user_factors"], arrays["item_factors"]


class ALS(_Factors):
    name = "als"
    defaults = {"factors": 64, "regularization": 0.05, "alpha": 1.0, "iterations": 15, "seed": 0}

    def _model(self):
        from implicit.cpu.als import AlternatingLeastSquares  # imported inside: only fitting needs it

        p = self.params
        return AlternatingLeastSquares(factors=int(p["factors"]), regularization=float(p["regularization"]),
                                       alpha=float(p["alpha"]), iterations=int(p["iterations"]),
                                       random_state=int(p["seed"]), num_threads=1)


class BPR(_Factors):
    name = "bpr"
    defaults = {"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "iterations": 100, "seed": 0}

    def _model(self):
        from implicit.cpu.bpr import BayesianPersonalizedRanking  # imported inside: only fitting needs it

        p = self.params
        return BayesianPersonalizedRanking(factors=int(p["factors"]), learning_rate=float(p["learning_rate"]),
                                           regularization=float(p["regularization"]), iterations=int(p["iterations"]),
                                           random_state=int(p["seed"]), num_threads=1)


_EMBEDDED: dict[tuple, np.ndarray] = {}  # the last catalogue's embeddings


class Text(Recommender):
    """Content-based: the user's recency-weighted mean embedding, by cosine; plus, with weight `prior`, how popular
    an item's text says it is (a ridge regression from the embeddings of the items with interactions to their
    log count, `prior_l2` its penalty), which ranks items nobody has picked yet (each part standardised)."""

    name = "text"
    defaults = {"encoder": "builtin:minilm-l6", "decay": 0.1, "max_length": 64, "prior": 0.0, "prior_l2": 1.0}

    def __init__(self, params: dict | None = None):
        self.params = {**self.defaults, **(params or {})}
        if Path(self.params["encoder"]).is_dir():  # a folder is recorded absolute: the model dir loads anywhere
            self.params["encoder"] = str(Path(self.params["encoder"]).resolve())
        self._encoder = None
        self._lock = threading.Lock()  # one load, however many request threads ask at once

    def encoder(self):
        with self._lock:
            if self._encoder is None:
                from tunelab.rag.index import Encoder  # imported inside: loads torch and transformers

                self._encoder = Encoder(self.params["encoder"], max_length=int(self.params["max_length"]))
        return self._encoder

    def fit(self, histories, catalogue):
        key = (self.params["encoder"], int(self.params["max_length"]), hash(tuple(catalogue.texts)))
        if key not in _EMBEDDED:  # a search refits with other weights only: embed the catalogue once
            _EMBEDDED.clear()
            _EMBEDDED[key] = self.encoder()(catalogue.texts)
        self.embeddings = _EMBEDDED[key]
        counts = np.asarray(interaction_matrix(histories, catalogue.n_items).sum(0)).ravel()
        seen = counts > 0  # an item nobody picked is unknown, not unpopular: it stays out of the fit
        x, y = self.embeddings[seen].astype(np.float64), np.log1p(counts[seen])
        self.prior_scores = np.zeros(catalogue.n_items, np.float32)
        if seen.sum() > 1:
            a = x.T @ x + float(self.params["prior_l2"]) * np.eye(x.shape[1])
            self.prior_scores = (self.embeddings @ np.linalg.solve(a, x.T @ (y - y.mean()))).astype(np.float32)

    def profiles(self, histories: list[np.ndarray]) -> np.ndarray:
        w = recency_weights(histories, len(self.embeddings), float(self.params["decay"]))
        prof = np.asarray(w @ self.embeddings, np.float32)
        norm = np.linalg.norm(prof, axis=1, keepdims=True)
        return np.divide(prof, norm, out=np.zeros_like(prof), where=norm > 0)

    def score(self, histories, users, allowed=None):
        return self._with_prior(self.profiles(histories) @ self.embeddings.T, allowed)

    def _with_prior(self, cosine: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        w = float(self.params["prior"])
        if not w:
            return cosine
        prior = np.broadcast_to(self.prior_scores, cosine.shape)
        return standardise(cosine, allowed) + w * standardise(prior, allowed)

    def score_texts(self, texts: list[str]) -> np.ndarray:
        """A history given as texts (items the catalogue may not have), the latest last → scores [n_items]."""
        emb = self.encoder()(texts)
        w = np.exp(-float(self.params["decay"]) * np.arange(len(texts))[::-1]).astype(np.float32)
        prof = w @ emb
        return self._with_prior((self.embeddings @ (prof / max(float(np.linalg.norm(prof)), 1e-12)))[None], None)[0]

    def arrays(self):
        return {"embeddings": self.embeddings, "prior_scores": self.prior_scores}

    def load_arrays(self, arrays, catalogue):
        self.embeddings = arrays["embeddings"]
        self.prior_scores = arrays.get("prior_scores", np.zeros(len(self.embeddings), np.float32))

    def warm(self):
        self.encoder()


SIMPLE = {cls.name: cls for cls in (Popularity, GenrePopularity, Random, ItemKNN, ALS, BPR, Text)}


def simple(name: str, params: dict | None = None) -> Recommender:
    if name not in SIMPLE:
        raise UserError(f"unknown recommender '{name}'; choose one of {', '.join(SIMPLE)}, hybrid, ranker")
    return SIMPLE[name](params)
