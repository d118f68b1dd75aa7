"""`tunelab cv CONFIG --folds K`: k-fold cross-validation of a run config on its train split.

The train split (the config's `data.max_train_examples` subset when set) is cut into K folds that keep
near-duplicate groups together, as `data prepare` keeps them within one split: the groups are found again on these
rows with the dataset's own de-duplication settings (MinHash LSH, `data.neardup`), so a near-copy of a held-out row
is never trained on. Each fold trains the config on the other K-1 folds (picking its best step on the dataset's
validation split, as every run does) and is scored on the fold it did not see; the result is per-fold scores and
their mean ± standard deviation. The test split is not touched.

The CV folder (kind `cv`): `folds/N/` (each fold's dataset dir), `fold-N/` (its run dir, model kept: the K models
make an ensemble with `tunelab ensemble`), `cv.json` and `tunelab.json` (the summary). Folds already trained with
the same config and rows are kept when the command runs again (a stopped CV continues); `--overwrite` retrains
them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from tunelab.artifacts import META_FILE, check_target, kind_of, write_file, write_folder
from tunelab.config import DedupConfig, EvalConfig, RunConfig
from tunelab.data.dataset import DATASET_FILE, SPLITS, fingerprint, load_meta, load_split, write_jsonl
from tunelab.data.neardup import near_duplicates
from tunelab.data.split import group_kfold, seeded_subset
from tunelab.errors import UserError
from tunelab.evaluate.leakage import row_text
from tunelab.evaluate.report import evaluate
from tunelab.models import library_versions, read_meta
from tunelab.tasks import task_spec
from tunelab.terminal import make_console, plain
from tunelab.train.loop import ensure_dataset, resolve_task
from tunelab.train.members import train_or_keep

# the scores summarised per fold, by report (the task's headline score first)
SCORES = {"classes": ("macro_f1", "accuracy", "macro_precision", "macro_recall"),
          "entities": ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")}


def cross_validate(cfg: RunConfig, folds: int, out: str | Path, overwrite: bool = False,
                   console: Console | None = None, show_progress: bool = False) -> dict:
    """Run `folds`-fold cross-validation of `cfg` into the CV folder `out` (see the module docstring) -> the
    summary written to `cv.json`."""
    console = console or make_console(stderr=True)
    out = Path(out)
    if folds < 2:
        raise UserError(f"--folds must be 2 or more (got {folds})")
    check_target(out, "cv", overwrite=True)  # a file, a foreign folder or another artifact is refused
    data_dir, _ = ensure_dataset(cfg, console)
    meta = load_meta(data_dir)
    spec = task_spec(resolve_task(cfg, meta, data_dir))
    if spec.report not in SCORES:
        raise UserError(f"cross-validation scores classification and NER runs; this config trains {spec.name}")
    rows = seeded_subset(load_split(data_dir, "train"), cfg.data.max_train_examples, seed=cfg.train.seed,
                         stratify=spec.stratify)
    if len(rows) < folds:
        raise UserError(f"{data_dir}: {len(rows)} train rows cannot make {folds} folds")
    groups = near_groups(rows, meta, cfg.train.seed)
    fold_of = group_kfold(rows, folds, cfg.train.seed, groups, spec.stratify)
    multi = _multi_groups(groups)
    console.print(f"[bold]cv[/] {folds} folds of {len(rows):,} train rows of {plain(data_dir)} · {multi:,} "
                  "near-duplicate groups, each kept in one fold · scored on the held-out fold")
    out.mkdir(parents=True, exist_ok=True)
    _write_meta(out, {"kind": "cv", "status": "running", "folds": folds, "data": str(Path(data_dir).resolve())})
    validation = load_split(data_dir, "validation")
    results = []
    for k in range(folds):
        train_rows = [r for r, f in zip(rows, fold_of) if f != k]
        held_out = [r for r, f in zip(rows, fold_of) if f == k]
        fold_dir = _fold_dataset(out / "folds" / str(k), meta, train_rows, validation, held_out, k, folds)
        results.append(_run_fold(cfg, k, fold_dir, out / f"fold-{k}", spec, overwrite, console, show_progress))
    summary = _summary(cfg, folds, data_dir, meta, spec, rows, multi, results)
    write_file(out / "cv.json", json.dumps(summary, indent=2, ensure_ascii=False), "cv", overwrite=True,
               checked=True)
    _write_meta(out, {**{k: v for k, v in summary.items() if k != "per_fold"}, "status": "done"})
    return summary


def near_groups(rows: list[dict], meta: dict, seed: int) -> list[int]:
    """The near-duplicate group of each row (its smallest member's index), found with the dataset's own settings
    (`options.dedup`; the defaults when it has none)."""
    saved = (meta.get("options") or {}).get("dedup") or {}
    d = DedupConfig(**{k: v for k, v in saved.items() if k in DedupConfig.model_fields})
    return near_duplicates([row_text(r) for r in rows], d.threshold, d.ngram, d.num_perm, seed + 1).group.tolist()


def _multi_groups(groups: list[int]) -> int:
    """How many groups have more than one row."""
    _, counts = np.unique(np.asarray(groups), return_counts=True)
    return int((counts > 1).sum())


def _fold_dataset(d: Path, meta: dict, train_rows: list[dict], validation: list[dict], held_out: list[dict],
                  k: int, folds: int) -> Path:
    """Fold `k`'s dataset dir: train = the other folds, validation = the dataset's, test = the held-out fold;
    rewritten only when its rows changed."""
    splits = {"train": train_rows, "validation": validation, "test": held_out}
    fp = fingerprint({name: [{**r, "text": row_text(r), "label": r.get("label")} for r in splits[name]]
                      for name in SPLITS})
    if kind_of(d) == "dataset" and load_meta(d).get("fingerprint") == fp:
        return d
    labelled = bool(meta.get("class_balance"))
    record = {**{k2: meta[k2] for k2 in ("kind", "task", "fields", "labels") if k2 in meta},
              "splits": {name: len(splits[name]) for name in SPLITS},
              "class_balance": {name: _balance(splits[name]) for name in SPLITS} if labelled else {},
              "fingerprint": fp, "source": {"cv_fold": k, "folds": folds, "of": meta.get("source")},
              "options": meta.get("options", {}), "report": {}, "warnings": []}
    with write_folder(d, "dataset", overwrite=True) as tmp:
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", splits[name])
        (tmp / DATASET_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2))
    return d


def _balance(rows: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return dict(sorted(counts.items()))


def _run_fold(cfg: RunConfig, k: int, fold_dir: Path, run_dir: Path, spec, overwrite: bool, console: Console,
              show_progress: bool) -> dict:
    """Train fold `k` (or keep / continue it, `members.train_or_keep`) and score it on the held-out fold -> its
    scores."""
    raw = cfg.model_dump(mode="json")
    raw["data"] = {**raw["data"], "dir": str(fold_dir.resolve()), "prepare": None, "max_train_examples": None}
    fold_cfg = RunConfig.model_validate(raw)
    fold_meta = load_meta(fold_dir)
    model_dir = run_dir / "model"
    started = time.perf_counter()
    console.print(f"[bold]fold {k}[/]: {fold_meta['splits']['train']:,} train rows, "
                  f"{fold_meta['splits']['test']:,} held out")
    train_or_keep(fold_cfg, run_dir, f"fold {k}", overwrite, console, show_progress, fold_meta["fingerprint"])
    report = evaluate(model_dir, fold_dir, "test", eval_cfg=EvalConfig(baselines=[], batch_size=cfg.eval.batch_size))
    model_meta = read_meta(model_dir)
    scores = {key: report[key] for key in SCORES[spec.report] if isinstance(report.get(key), (int, float))}
    console.print(f"fold {k}: " + " · ".join(f"{key} {v:.4f}" for key, v in scores.items()))
    return {"fold": k, "train_rows": fold_meta["splits"]["train"], "held_out_rows": fold_meta["splits"]["test"],
            "scores": scores, "best_step": model_meta.get("best_step"),
            "validation": model_meta["metrics"]["validation"], "model_dir": str(model_dir),
            "seconds": round(time.perf_counter() - started, 1)}


def _summary(cfg: RunConfig, folds: int, data_dir: Path, meta: dict, spec, rows: list[dict], multi: int,
             results: list[dict]) -> dict:
    keys = [key for key in SCORES[spec.report] if all(key in r["scores"] for r in results)]
    stats = {key: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "min": float(np.min(v)),
                   "max": float(np.max(v))}
             for key in keys for v in [[r["scores"][key] for r in results]]}
    return {"kind": "cv", "task": spec.name, "folds": folds, "config_name": cfg.name,
            "data": {"dir": str(Path(data_dir).resolve()), "fingerprint": meta["fingerprint"], "train_rows": len(rows),
                     "near_duplicate_groups": multi},
            "score": spec.score[0], "scores": stats, "per_fold": results,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": library_versions()}


def _write_meta(out: Path, record: dict) -> None:
    write_file(out / META_FILE, json.dumps(record, indent=2, ensure_ascii=False, default=str), "cv",
               overwrite=True, checked=True)


def print_cv(summary: dict, console: Console) -> None:
    """Per-fold scores and their mean ± std."""
    keys = list(summary["scores"])
    table = Table("fold", "train rows", "held out", *keys, title=f"{summary['folds']}-fold cross-validation")
    for r in summary["per_fold"]:
        table.add_row(str(r["fold"]), f"{r['train_rows']:,}", f"{r['held_out_rows']:,}",
                      *[f"{r['scores'][k]:.4f}" for k in keys])
    table.add_row("mean ± std", "", "", *[f"{s['mean']:.4f} ± {s['std']:.4f}" for s in summary["scores"].values()],
                  style="bold")
    console.print(table)
