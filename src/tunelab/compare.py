"""`tunelab compare RUN…`: runs side by side: which config keys differ, how they scored, how they learned.

A run is a run dir (kind "run": from `tunelab train`, a tune trial, a CV fold, an ensemble member) or the model dir
inside one. From each: its resolved config (`config.yaml`), its best validation scores (its model dir's
`tunelab.json`, else the best evaluation in `metrics.jsonl`), its training time and speed (the last record of
`metrics.jsonl`) and its curves: the train loss and the task's validation score against epochs (steps when the
log has no epochs). `compare_runs` returns one summary; `--out DIR` writes it as `compare.json` with the curves
overlaid in `curves.png` (one colour per run), an artifact of kind "comparison".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from tunelab.artifacts import META_FILE, kind_of, write_folder
from tunelab.config import flatten
from tunelab.errors import UserError
from tunelab.tasks import task_spec


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a torn last line (a run killed while writing) is skipped."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def run_dir_of(path: str | Path) -> Path:
    """The run dir `path` names: itself, or the run around a model dir; anything else is a `UserError`."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p} is not a folder; give run dirs written by `tunelab train`")
    kind = kind_of(p)
    if kind == "model" and kind_of(p.parent) == "run":
        return p.parent
    if kind != "run":
        found = f"a tunelab {kind}" if kind else "not a tunelab folder"
        raise UserError(f"{p} is {found}, not a run dir; give run dirs written by `tunelab train` (or their model "
                        "dirs)")
    return p


def read_run(path: str | Path) -> dict:
    """One run's summary: dir, name, task, config (flat), the validation score's key, name and direction, best
    scores and step, steps, elapsed seconds, examples/s and curves {"train": [(x, loss)], "eval": [(x, score)],
    "x": "epoch" | "step"}."""
    d = run_dir_of(path)
    meta = _read_json(d / META_FILE)
    try:
        config = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        config = {}
    task = meta.get("task") or config.get("task")
    key, name, higher = task_spec(task, str(d)).score
    records = _records(d / "metrics.jsonl")
    model = _read_json(d / "model" / META_FILE)
    evals = [r for r in records if f"eval_{key}" in r]
    best = (model.get("metrics") or {}).get("validation")
    best_step = model.get("best_step")
    if best is None and evals:
        pick = (max if higher else min)(evals, key=lambda r: r[f"eval_{key}"])
        best = {k.removeprefix("eval_"): v for k, v in pick.items() if k.startswith("eval_")}
        best_step = pick["step"]
    done = next((r for r in reversed(records) if "elapsed_s" in r), {})
    return {"dir": str(d), "name": d.name, "task": task, "config": flatten(config), "metric": key,
            "metric_name": name, "higher_is_better": higher, "best": best or {}, "best_step": best_step,
            "steps": model.get("steps") or (records[-1]["step"] if records else None),
            "elapsed_s": done.get("elapsed_s"), "examples_per_s": done.get("train_examples_per_s"),
            "finished": bool(done.get("done")), "curves": _curves(records, key)}


def _curves(records: list[dict], key: str) -> dict:
    """Train loss and validation score against epochs: each step's epoch is read from the train records (which
    log it), scaled linearly between them; steps when no record has one."""
    known = sorted((r["step"], r["epoch"]) for r in records if isinstance(r.get("epoch"), (int, float)))
    per_step = known[-1][1] / known[-1][0] if known and known[-1][0] else None

    def x(step: int) -> float:
        return round(step * per_step, 4) if per_step else step

    seen, evals = set(), []
    for r in records:  # the final evaluation is logged twice (the last eval, then the best one again)
        if f"eval_{key}" in r and r["step"] not in seen:
            seen.add(r["step"])
            evals.append((x(r["step"]), r[f"eval_{key}"]))
    return {"x": "epoch" if per_step else "step", "eval": evals,
            "train": [(x(r["step"]), r["train_loss"]) for r in records if "train_loss" in r]}


def differing_keys(configs: list[dict]) -> list[str]:
    """The dotted config keys whose values are not the same in every config (a key one lacks counts as None)."""
    keys = sorted(set().union(*configs))
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def compare_runs(paths: list[str | Path], out: str | Path | None = None, overwrite: bool = False) -> dict:
    """The runs' summaries side by side (see the module docstring): {"kind": "comparison", "runs": [...],
    "differing_keys": [...], "same_keys": n}; with `out`, written there with the curves PNG."""
    if len(paths) < 2:
        raise UserError("give at least two run dirs to compare")
    runs = [read_run(p) for p in paths]
    dirs = [r["dir"] for r in runs]
    if len(set(dirs)) < len(dirs):
        raise UserError("the same run is given twice; give different run dirs")
    configs = [r["config"] for r in runs]
    differ = differing_keys(configs)
    summary = {"kind": "comparison", "differing_keys": differ,
               "same_keys": len(set().union(*configs)) - len(differ),
               "runs": [{**{k: v for k, v in r.items() if k != "config"},
                         "differing": {k: r["config"].get(k) for k in differ}} for r in runs]}
    if out is not None:
        with write_folder(out, "comparison", overwrite) as tmp:
            curves_png(runs, tmp / "curves.png")
            summary["curves_png"] = str(Path(out).resolve() / "curves.png")
            (tmp / "compare.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str),
                                              encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps({"kind": "comparison", "runs": dirs}, indent=2),
                                         encoding="utf-8")
    return summary


def curves_png(runs: list[dict], path: Path) -> Path:
    """Two panels: train loss and the validation score, one line per run (names as in the table)."""
    import matplotlib  # ~0.7 s: only a comparison that draws pays it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, r in enumerate(runs):
        color, label = f"C{i % 10}", f"{i + 1}. {r['name']}"
        if r["curves"]["train"]:
            xs, ys = zip(*r["curves"]["train"])
            loss_ax.plot(xs, ys, color=color, label=label, linewidth=1.2)
        if r["curves"]["eval"]:
            xs, ys = zip(*r["curves"]["eval"])
            eval_ax.plot(xs, ys, color=color, label=label, marker="o", markersize=3)
    units = {r["curves"]["x"] for r in runs}
    xlabel = "epoch" if units == {"epoch"} else "step" if units == {"step"} else "epoch (step where no epochs)"
    loss_ax.set(xlabel=xlabel, ylabel="train loss", title="train loss")
    names = {r["metric_name"] for r in runs}
    eval_ax.set(xlabel=xlabel, ylabel=" / ".join(sorted(names)), title="validation " + " / ".join(sorted(names)))
    for ax in (loss_ax, eval_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", metadata={"Software": "tunelab"})
    plt.close(fig)
    return path


def cell(value) -> str:
    """A config value or score as a short table cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if not math.isnan(value) else "nan"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
