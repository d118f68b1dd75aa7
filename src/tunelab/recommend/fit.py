"""`tunelab recommend train`: search a model's settings on the validation split, refit the best on train +
validation, write the recommender dir.

Every searched model gets the same budget (`trials` settings: its defaults first, then seeded random draws from its
space), fitted on train and scored by NDCG@10 on validation. A hybrid searches each member that is named (a member
given as a recommender dir keeps its settings), then the blend weights on a 0.1 grid. The final model is refitted
with the chosen settings on train + validation, which is what the tests are scored after.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from tunelab.artifacts import check_target, kind_of
from tunelab.errors import UserError
from tunelab.recommend import store
from tunelab.recommend.data import Interactions
from tunelab.recommend.data import load as load_data
from tunelab.recommend.hybrid import Hybrid, choose_weights
from tunelab.recommend.metrics import candidates, evaluate, history_splits
from tunelab.recommend.models import SIMPLE, Catalogue, Recommender, simple

K = 10
FINAL = ("train", "validation")

# name → {param: ("choice", values) | ("log", low, high) | ("float", low, high)}
SPACES: dict[str, dict[str, tuple]] = {
    "itemknn": {"neighbors": ("choice", [20, 50, 100, 200, 400]), "shrink": ("choice", [0.0, 10.0, 50.0, 100.0]),
                "decay": ("choice", [0.0, 0.05, 0.1, 0.2, 0.3, 0.5])},
    "als": {"factors": ("choice", [16, 32, 64, 128]), "regularization": ("log", 1e-3, 1.0),
            "alpha": ("choice", [0.5, 1.0, 2.0, 5.0, 10.0, 20.0]), "iterations": ("choice", [10, 15, 30])},
    "bpr": {"factors": ("choice", [16, 32, 64, 128]), "learning_rate": ("log", 3e-3, 0.1),
            "regularization": ("log", 1e-4, 0.1), "iterations": ("choice", [50, 100, 200])},
    "text": {"decay": ("choice", [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]), "prior": ("choice", [0.0, 0.5, 1.0, 2.0]),
             "prior_l2": ("choice", [1.0, 10.0])},
}


def draw(name: str, rng: np.random.Generator) -> dict:
    params = {}
    for key, (how, *args) in SPACES.get(name, {}).items():
        if how == "choice":
            params[key] = args[0][int(rng.integers(len(args[0])))]
        elif how == "log":
            params[key] = float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
        else:
            params[key] = float(rng.uniform(*args))
    return params


def search(name: str, data: Interactions, trials: int, seed: int, log=print) -> tuple[dict, list[dict]]:
    """(the best params, every trial's {params, ndcg, seconds}) of `name` on the validation split."""
    rng = np.random.default_rng(seed)
    catalogue = Catalogue.of(data.items)
    train = data.histories(*history_splits("validation"))
    n = trials if name in SPACES else 1
    tried, seen = [], set()
    for t in range(n):
        params = simple(name).params if t == 0 else draw(name, rng)
        key = repr(sorted(params.items()))
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        model = simple(name, params)
        model.fit(train, catalogue)
        ndcg = float(evaluate(model, data, "validation", K).values["ndcg"].mean())
        tried.append({"params": model.params, "ndcg@10": ndcg, "seconds": round(time.perf_counter() - start, 2)})
        log(f"  {name} trial {len(tried)}: NDCG@10 {ndcg:.4f}  {_short(params)}")
    best = max(tried, key=lambda r: r["ndcg@10"])
    return best["params"], tried


def _short(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
                    if k not in ("encoder", "seed"))


def member(ref: str, data: Interactions, trials: int, seed: int, log) -> tuple[Recommender, list[dict]]:
    """A hybrid member or a ranker's first stage: a recommender dir's settings, or a model name searched."""
    if kind_of(Path(ref)) == store.KIND:
        meta = store.read_meta(ref)
        if meta["model"] == "ranker":
            raise UserError(f"{ref} is a two-stage ranker; use its first stage or another model here")
        return store.build(meta["model"], meta["params"]), []
    if ref not in SIMPLE:
        raise UserError(f"hybrid member '{ref}' is neither a model name ({', '.join(SIMPLE)}) nor a recommender dir")
    params, tried = search(ref, data, trials, seed, log)
    return simple(ref, params), tried


def fit_hybrid(data: Interactions, members: list[str], trials: int, seed: int, log=print) -> tuple[Hybrid, dict]:
    """Members searched (or taken from their dirs), fitted on train; weights chosen on validation."""
    if len(members) < 2:
        raise UserError("a hybrid needs at least two members (--members itemknn,als,text)")
    chosen, searches = [], {}
    for ref in members:
        model, tried = member(ref, data, trials, seed, log)
        chosen.append(model)
        searches[model.name] = tried
    catalogue = Catalogue.of(data.items)
    train, targets = data.histories("train"), data.targets("validation")
    users = np.array(sorted(targets), dtype=np.int64)
    allowed = candidates(~data.cold, [train[u] for u in users])
    scores = []
    for model in chosen:
        model.fit(train, catalogue)
        scores.append(model.score([train[u] for u in users], users, allowed))
    weights, ndcg = choose_weights(scores, allowed, [targets[u] for u in users], K)
    log(f"  hybrid weights {dict(zip([m.name for m in chosen], weights))}: NDCG@10 {ndcg:.4f}")
    return Hybrid(chosen, list(weights)), {"searches": searches, "validation_ndcg@10": ndcg}


def train_recommender(data_dir: str | Path, name: str, out: str | Path, trials: int = 8, seed: int = 0,
                      members: list[str] | None = None, ranker: dict | None = None, overwrite: bool = False,
                      log=print) -> dict:
    """Search, refit on train + validation, save. Returns the recommender dir's `tunelab.json`."""
    data = load_data(data_dir)
    check_target(Path(os.path.abspath(out)), store.KIND, overwrite)  # before the work, not after it
    if name not in SIMPLE and name not in ("hybrid", "ranker"):
        raise UserError(f"unknown recommender '{name}'; choose one of {', '.join(SIMPLE)}, hybrid, ranker")
    if not data.targets("validation"):
        raise UserError(f"{data_dir} has no validation interactions to choose settings on (every user has fewer "
                        "than three warm interactions, or the validation share is 0); prepare it again")
    start = time.perf_counter()
    extra, work = None, None
    try:
        if name == "hybrid":
            model, record = fit_hybrid(data, members or ["itemknn", "als", "text"], trials, seed, log)
        elif name == "ranker":
            from tunelab.recommend.ranker import fit_ranker  # imported inside: it loads torch and the training loop

            opts = ranker or {}
            stage1, tried = member(str(opts.get("stage1") or "itemknn"), data, trials, seed, log)
            model, record, extra, work = fit_ranker(data, opts, lambda: store.build(stage1.name, stage1.params),
                                                    seed, log)
            record["searches"] = {stage1.name: tried}
        else:
            params, tried = search(name, data, trials, seed, log)
            model, record = simple(name, params), {"searches": {name: tried},
                                                   "validation_ndcg@10": max(t["ndcg@10"] for t in tried)}
        model.fit(data.histories(*FINAL), Catalogue.of(data.items))
        record["seconds"] = round(time.perf_counter() - start, 1)
        return store.save(model, out, data, FINAL, record, overwrite, extra)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
