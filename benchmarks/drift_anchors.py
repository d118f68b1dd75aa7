"""Anchors of the drift benchmark: Evidently's and alibi-detect's default drift detection on precomputed features.

Run in the anchors' own venv (`bash benchmarks/drift_anchors_env.sh` creates it and prints its python):
`ANCHOR_PY benchmarks/drift_anchors.py FEATURES.npz OUT.json`. FEATURES.npz is written by `benchmarks/drift.py`
(`ref_*` arrays for the reference sample, `win_*` arrays for W windows of n requests, `win_name` naming each window's
condition); OUT.json gets, per anchor, whether it could run (else the error), the defaults it ran with, and per window
its decision, scores and wall time, plus the package versions.

Anchors, each with the installed package's defaults (paths relative to the venv's site-packages, Evidently 0.7.23,
alibi-detect 0.13.0):

1. `evidently`: `Report([DataDriftPreset()], include_tests=True)` on `Dataset.from_pandas` with a `DataDefinition`
   over confidence, length, fragmentation (numerical) and label (categorical). `include_tests` only attaches the
   preset's own pass/fail verdicts; every detection setting is the preset's default.
   - Test per column, `evidently/legacy/calculations/stattests/registry.py` `_get_default_stattest`: reference of
     <= 1000 rows: numerical -> KS (`ks_stattest.py`, drift when p <= 0.05), or chi-squared / Z-test when the column
     has <= 5 distinct values; categorical -> chi-squared (`chisquare_stattest.py`, p <= 0.05; threshold default
     0.05 in `registry.py` `StatTest.default_threshold`), or a proportion Z-test (`z_stattest.py`) when binary.
     Reference > 1000 rows: numerical -> normed Wasserstein (`wasserstein_distance_norm.py`, >= 0.1), categorical and
     numerical with <= 5 values -> Jensen-Shannon (`jensenshannon.py`, >= 0.1).
   - Dataset drift: share of drifted columns >= `drift_share` = 0.5 (`evidently/presets/drift.py` `DataDriftPreset`,
     `evidently/legacy/calculations/data_drift.py` `get_dataset_drift`); read from the preset's test on
     `DriftedColumnsCount` (`evidently/metrics/column_statistics.py`: fails unless share < drift_share).
2. `evidently_embeddings`: `Report([EmbeddingsDrift(embeddings_name="embedding")])` (`evidently/metrics/embeddings.py`)
   with `DataDefinition(embeddings={"embedding": [the d columns]})`, no drift method given. Default,
   `evidently/legacy/metrics/data_drift/embeddings_drift.py` `EmbeddingsDriftMetric.calculate`:
   `model(bootstrap=reference rows < 1000)`, i.e. `ModelDriftMethod` (`embedding_drift_methods.py`): a domain
   classifier (`SGDClassifier(loss="log_loss", random_state=42)`, 50/50 train/test split, random_state=42); the score
   is its test ROC AUC; drift when ROC AUC > 0.55 (reference of >= 1000 rows) or, with bootstrap (fewer rows), when
   it exceeds the 95th percentile of 100 random-guess ROC AUCs. The metric's value is only the score, so the verdict
   is read from the report's computed `EmbeddingsDriftMetricResults.drift_detected`. The metric also fits a t-SNE of
   the samples for its plot: that, not the test, is most of its time per window.
3. `alibi_mmd`: `MMDDrift(x_ref=ref_embedding, backend="pytorch", p_val=0.05)` (`alibi_detect/cd/mmd.py`), defaults:
   kernel `GaussianRBF` (`alibi_detect/cd/pytorch/mmd.py`) with its bandwidth set once from the reference by the
   median heuristic (`configure_kernel_from_x_ref=True`; `sigma_median` in `alibi_detect/utils/pytorch/kernels.py`),
   `n_permutations=100`; `predict(window)` flags drift when the permutation p-value < 0.05
   (`alibi_detect/cd/base.py` `BaseMMDDrift.predict`). numpy and torch are seeded with `--seed` before each window,
   so each window's result does not depend on which windows ran before it.

A package that fails to import or to run is reported as unavailable with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np

TABULAR_NUMERICAL = ["confidence", "length", "fragmentation"]
TABULAR_CATEGORICAL = ["label"]
PACKAGES = ["evidently", "alibi-detect", "torch", "numpy", "pandas", "scipy", "scikit-learn"]

EVIDENTLY_DEFAULTS = (
    "Report([DataDriftPreset()], include_tests=True) over confidence, length, fragmentation (numerical) and label "
    "(categorical); per-column test chosen by Evidently: reference <= 1000 rows -> KS (numerical) / chi-squared "
    "(categorical; Z-test when binary) at p <= 0.05, else normed Wasserstein / Jensen-Shannon at >= 0.1; dataset "
    "drift when share of drifted columns >= 0.5"
)
EVIDENTLY_EMB_DEFAULTS = (
    "Report([EmbeddingsDrift(embeddings_name='embedding')]), default method model(bootstrap=reference rows < 1000): "
    "SGDClassifier domain classifier, 50/50 split; drift when test ROC AUC > 0.55 (or, with bootstrap, > the 95th "
    "percentile of 100 random ROC AUCs)"
)
ALIBI_DEFAULTS = (
    "MMDDrift(x_ref=ref_embedding, backend='pytorch', p_val=0.05): GaussianRBF kernel, bandwidth by the median "
    "heuristic on the reference, n_permutations=100; drift when permutation p-value < 0.05"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("features", type=Path, help=".npz written by benchmarks/drift.py")
    p.add_argument("out", type=Path, help="JSON of per-window decisions")
    p.add_argument("--seed", type=int, default=0, help="numpy/torch seed, set before each window")
    p.add_argument("--skip", action="append", default=[], choices=["evidently", "evidently_embeddings", "alibi_mmd"],
                   help="leave an anchor out (repeatable)")
    return p.parse_args(argv)


def load_features(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    w, n = data["win_confidence"].shape
    names = data.get("win_name")
    data["win_name"] = [str(s) for s in names] if names is not None else [f"window_{i}" for i in range(w)]
    log(f"features: R={len(data['ref_confidence'])} d={data['ref_embedding'].shape[1]} W={w} n={n}")
    return data


def log(msg: str) -> None:
    print(f"[drift-anchors] {msg}", file=sys.stderr, flush=True)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def error_text(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{at}"


def run_arm(name: str, defaults: str, setup, per_window, data: dict) -> dict:
    """Run one anchor: `setup(data)` returns its state, `per_window(state, i, data)` one window's record."""
    arm = {"available": True, "error": None, "defaults": defaults, "windows": []}
    try:
        t0 = time.perf_counter()
        state = setup(data)
        arm["setup_seconds"] = round(time.perf_counter() - t0, 4)
        for i, win_name in enumerate(data["win_name"]):
            t0 = time.perf_counter()
            record = per_window(state, i, data)
            seconds = time.perf_counter() - t0
            arm["windows"].append({"name": win_name, **record, "seconds": round(seconds, 4)})
            log(f"{name} window {i} ({win_name}): drift={record['drift']} {seconds:.2f}s")
    except Exception as exc:  # an anchor that cannot run is reported, not fatal
        arm.update(available=False, error=error_text(exc))
        log(f"{name} unavailable: {arm['error']}")
    return arm


def tabular_frame(data: dict, prefix: str, i: int | None = None):
    import pandas as pd

    def col(name):
        arr = data[f"{prefix}_{name}"]
        return arr if i is None else arr[i]

    frame = {c: np.asarray(col(c), dtype=np.float64) for c in TABULAR_NUMERICAL}
    frame.update({c: np.asarray(col(c), dtype=np.int64) for c in TABULAR_CATEGORICAL})
    return pd.DataFrame(frame)


def evidently_setup(data: dict) -> dict:
    from evidently import DataDefinition, Dataset

    definition = DataDefinition(numerical_columns=TABULAR_NUMERICAL, categorical_columns=TABULAR_CATEGORICAL)
    ref = Dataset.from_pandas(tabular_frame(data, "ref"), data_definition=definition)
    return {"definition": definition, "ref": ref}


def evidently_window(state: dict, i: int, data: dict) -> dict:
    from evidently import Dataset, Report
    from evidently.presets import DataDriftPreset

    cur = Dataset.from_pandas(tabular_frame(data, "win", i), data_definition=state["definition"])
    snapshot = Report([DataDriftPreset()], include_tests=True).run(cur, state["ref"])
    return evidently_record(snapshot.dict())


def evidently_record(result: dict) -> dict:
    """Dataset verdict, share and per-column test/score/verdict from a DataDriftPreset snapshot's dict."""
    share, columns = None, {}
    for metric in result["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":DriftedColumnsCount"):
            share = float(metric["value"]["share"])
        elif config["type"].endswith(":ValueDrift"):
            columns[config["column"]] = {"test": config["method"], "threshold": config["threshold"],
                                         "score": float(metric["value"]), "drift": None}
    drift = None
    for test in result["tests"]:
        params = test["metric_config"]["params"]
        failed = test["status"] == "FAIL"
        if params["type"].endswith(":DriftedColumnsCount"):
            drift = failed
        elif params["type"].endswith(":ValueDrift"):
            columns[params["column"]]["drift"] = failed
    if drift is None or share is None or any(c["drift"] is None for c in columns.values()):
        raise RuntimeError(f"unexpected DataDriftPreset result layout: {json.dumps(result)[:500]}")
    return {"drift": drift, "share": share, "columns": columns}


def embedding_columns(d: int) -> list[str]:
    return [f"emb_{j}" for j in range(d)]


def embedding_dataset(matrix: np.ndarray, definition):
    import pandas as pd
    from evidently import Dataset

    frame = pd.DataFrame(np.asarray(matrix, dtype=np.float64), columns=embedding_columns(matrix.shape[1]))
    return Dataset.from_pandas(frame, data_definition=definition)


def evidently_emb_setup(data: dict) -> dict:
    from evidently import DataDefinition
    from evidently.metrics import EmbeddingsDrift  # noqa: F401  (0.7 has it: fail here, not per window)

    cols = embedding_columns(data["ref_embedding"].shape[1])
    definition = DataDefinition(numerical_columns=cols, embeddings={"embedding": cols})
    return {"definition": definition, "ref": embedding_dataset(data["ref_embedding"], definition)}


def evidently_emb_window(state: dict, i: int, data: dict) -> dict:
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift

    np.random.seed(state.get("seed", 0))
    cur = embedding_dataset(data["win_embedding"][i], state["definition"])
    snapshot = Report([EmbeddingsDrift(embeddings_name="embedding")]).run(cur, state["ref"])
    legacy = embeddings_result(snapshot)
    score = float(snapshot.dict()["metrics"][0]["value"])
    return {"drift": bool(legacy.drift_detected), "score": score, "method": legacy.method_name}


def embeddings_result(snapshot):
    """The EmbeddingsDriftMetricResults the report computed (its verdict is not part of the metric's value)."""
    from evidently.legacy.metrics.data_drift.embeddings_drift import EmbeddingsDriftMetricResults

    found = [r for r, _ in snapshot.context._legacy_metrics.values() if isinstance(r, EmbeddingsDriftMetricResults)]
    if len(found) != 1:
        raise RuntimeError(f"expected one EmbeddingsDriftMetricResults in the report, found {len(found)}")
    return found[0]


def alibi_setup(data: dict, seed: int = 0) -> dict:
    import torch
    from alibi_detect.cd import MMDDrift

    np.random.seed(seed)
    torch.manual_seed(seed)
    ref = np.ascontiguousarray(data["ref_embedding"], dtype=np.float32)
    return {"detector": MMDDrift(x_ref=ref, backend="pytorch", p_val=0.05), "seed": seed}


def alibi_window(state: dict, i: int, data: dict) -> dict:
    import torch

    np.random.seed(state["seed"])
    torch.manual_seed(state["seed"])
    x = np.ascontiguousarray(data["win_embedding"][i], dtype=np.float32)
    pred = state["detector"].predict(x)["data"]
    return {"p_value": float(pred["p_val"]), "distance": float(pred["distance"]),
            "distance_threshold": float(pred["distance_threshold"]), "drift": bool(pred["is_drift"])}


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


def skipped(defaults: str) -> dict:
    return {"available": False, "error": "skipped (--skip)", "defaults": defaults, "windows": []}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_features(args.features)
    result = {"versions": versions(), "features": str(args.features), "seed": args.seed,
              "windows": len(data["win_name"])}
    arms = [
        ("evidently", EVIDENTLY_DEFAULTS, evidently_setup, evidently_window),
        ("evidently_embeddings", EVIDENTLY_EMB_DEFAULTS,
         lambda d: {**evidently_emb_setup(d), "seed": args.seed}, evidently_emb_window),
        ("alibi_mmd", ALIBI_DEFAULTS, lambda d: alibi_setup(d, args.seed), alibi_window),
    ]
    for name, defaults, setup, per_window in arms:
        if name in args.skip:
            result[name] = skipped(defaults)
            continue
        result[name] = run_arm(name, defaults, setup, per_window, data)
        write(args.out, result)
    write(args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
