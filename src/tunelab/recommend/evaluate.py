"""`tunelab recommend eval`: recommender dirs side by side on the warm test split and the cold-start split.

Each model is scored over the full candidate set (see `metrics`); every metric carries a 95% bootstrap interval
over users, and each model is compared with the reference (the first model given, or `--against`) on the same
users by a paired bootstrap of NDCG@10. A model fitted on other data than this interactions dir is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

from tunelab.errors import UserError
from tunelab.recommend import store
from tunelab.recommend.data import load as load_data
from tunelab.recommend.metrics import compare, evaluate, history_splits

SPLITS = ("test", "cold_test")


def evaluate_models(data_dir: str | Path, model_dirs: list[str | Path], splits: tuple[str, ...] = SPLITS,
                    k: int = 10, n_boot: int = 1000, seed: int = 0, against: str | None = None) -> dict:
    data = load_data(data_dir)
    loaded = []
    for d in model_dirs:  # every model checked before any is loaded
        meta = store.read_meta(d)
        if meta["data"]["fingerprint"] != data.meta.get("fingerprint"):
            raise UserError(f"{d} was fitted on other data ({meta['data']['path']}); evaluate it on that "
                            "interactions dir, or train it on this one")
    for d in model_dirs:
        loaded.append(store.load(d))
    names = _names(loaded)
    if against is not None and against not in names:
        raise UserError(f"--against {against}: no such model; the models are {', '.join(names)}")
    ref = names.index(against) if against is not None else 0
    report = {"kind": "recommend-report", "data": str(Path(data_dir).resolve()), "k": k, "splits": {}}
    for split in splits:
        if not len(data.splits[split]["user"]):
            continue
        scored, section = [], {}
        for name, rec in zip(names, loaded):
            fit_on = tuple(rec.meta["data"]["fit_on"])
            if fit_on != history_splits(split):
                raise UserError(f"{rec.path} was fitted on {'+'.join(fit_on)}; scoring {split} needs a model "
                                f"fitted on {'+'.join(history_splits(split))}")
            start = time.perf_counter()
            result = evaluate(rec.model, data, split, k)
            seconds = time.perf_counter() - start
            scored.append(result)
            section[name] = {"model": rec.meta["model"], "path": str(rec.path), **result.summary(k, n_boot, seed),
                             "ms_per_user": round(1000 * seconds / max(1, len(result.values["ndcg"])), 3)}
        for name, result in zip(names, scored):
            if name != names[ref]:
                section[name]["vs_" + names[ref]] = compare(result, scored[ref], "ndcg", n_boot, seed)
        report["splits"][split] = section
    report["reference"] = names[ref]
    return report


def _names(loaded) -> list[str]:
    """Each model's label: its folder name (made unique)."""
    names = []
    for rec in loaded:
        name, n = rec.path.name, 2
        while name in names:
            name, n = f"{rec.path.name}-{n}", n + 1
        names.append(name)
    return names
