"""What a study folder holds after each invocation: the trials table, the best config as a runnable YAML, the
optimisation-history and parameter-importance plots, its `tunelab.json`; the best model registered when a
registry is configured."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import time
import warnings
from pathlib import Path

import optuna
from optuna.importance import FanovaImportanceEvaluator, get_param_importances
from rich.console import Console
from rich.table import Table

from tunelab.artifacts import META_FILE, write_file
from tunelab.config import apply_overrides, dump_config, validate
from tunelab.errors import UserError
from tunelab.registry.registry import Registry
from tunelab.terminal import plain, print_warnings
from tunelab.tune.space import overrides

# matplotlib is imported inside each plot function (~0.7 s): only an invocation that draws pays it.

TRIALS_FILE, BEST_FILE, HISTORY_PNG, IMPORTANCE_PNG = "trials.csv", "best.yaml", "history.png", "importance.png"


def trial_rows(study) -> list[dict]:
    """One row per trial: number, state, value, epochs trained, seconds, evaluations reported, params, and
    where it ran; the cumulative trial-epochs in trial order."""
    rows, total = [], 0.0
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        epochs = t.user_attrs.get("epochs")
        total += epochs or 0.0
        took = (t.datetime_complete - t.datetime_start).total_seconds() if (
            t.datetime_complete and t.datetime_start) else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "epochs": epochs, "cumulative_epochs": round(total, 4),
                     "seconds": round(took, 1) if took is not None else None,
                     "evaluations": len(t.intermediate_values),
                     **{f"param:{k}": v for k, v in t.params.items()},
                     "duplicate_of": t.user_attrs.get("duplicate_of"), "worker": t.user_attrs.get("worker"),
                     "error": t.user_attrs.get("error")})
    return rows


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    return buf.getvalue()


def completed(study) -> list:
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None]


def best_trial(study):
    """The best completed trial (ties: the earliest), or None."""
    done = completed(study)
    if not done:
        return None
    maximize = study.direction.name == "MAXIMIZE"
    return max(done, key=lambda t: ((t.value if maximize else -t.value), -t.number))  # ties: the earliest


def best_model_dir(study, trial) -> Path | None:
    """The model dir holding the best trial's weights (a duplicate point's is its original's)."""
    if "duplicate_of" in trial.user_attrs:
        trial = study.trials[trial.user_attrs["duplicate_of"]]
    d = trial.user_attrs.get("model_dir")
    return Path(d) if d and Path(d).is_dir() else None


def history_png(rows: list[dict], maximize: bool, metric_name: str, path: Path) -> Path:
    """Left: each trial's score by trial number (pruned trials at their last reported score) and the best so
    far. Right: the best so far against the trial-epochs spent, the cost that pruning saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    best, xs, ys, cum = None, [], [], []
    for r in rows:
        if r["state"] == "complete" and r["value"] is not None:
            v = r["value"]
            best = v if best is None or (v > best if maximize else v < best) else best
        if best is not None:
            xs.append(r["number"])
            ys.append(best)
            cum.append(r["cumulative_epochs"])
    for state, marker, color in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:gray"),
                                 ("fail", "s", "tab:red")):
        pts = [(r["number"], r["last"]) for r in rows if r["state"] == state and r.get("last") is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=f"{state} ({len(pts)})", zorder=3)
    if xs:
        ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
        bx.step(cum, ys, where="post", color="tab:orange")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric_name}")
    ax.set_title("optimisation history")
    ax.legend(loc="best", fontsize=8)
    bx.set_xlabel("trial-epochs spent (all trials, pruned ones up to their stop)")
    bx.set_ylabel(f"best validation {metric_name}")
    bx.set_title("best so far against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", metadata={"Software": "tunelab"})
    plt.close(fig)
    return path


def importance_png(importances: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA share of the score's variance)")
    ax.set_title("parameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", metadata={"Software": "tunelab"})
    plt.close(fig)
    return path


def importances(study) -> dict | None:
    """fANOVA importances over the completed trials (seeded), or None when too few trials vary."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 3:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=0)).items()}
    except (RuntimeError, ValueError):  # e.g. every completed trial has the same parameters
        return None


def write(study, ctx, metric_name: str, console: Console, started: float, interrupted: bool,
          shown_storage: str) -> dict:
    """Write the study folder's outputs (each file replaced whole) and print the top trials -> the summary."""
    out = ctx.out
    rows = trial_rows(study)
    for r, t in zip(rows, sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)):
        r["last"] = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
    write_file(out / TRIALS_FILE, _csv([{k: v for k, v in r.items() if k != "last"} for r in rows]), "tune",
               overwrite=True, checked=True)
    states = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    best = best_trial(study)
    summary = {"kind": "tune", "study": ctx.study, "storage": shown_storage, "metric": ctx.metric,
               "direction": "maximize" if ctx.maximize else "minimize", "trials": len(rows), "states": states,
               "trial_epochs": round(sum(r["epochs"] or 0.0 for r in rows), 4),
               "space": json.loads(ctx.space.to_json()), "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
               "last_invocation": {"trials": ctx.opts.trials, "workers": ctx.opts.workers, "threads": ctx.threads,
                                   "cores": ctx.cores, "sampler": ctx.opts.sampler, "pruner": ctx.opts.pruner,
                                   "seconds": round(time.time() - started, 1), "interrupted": interrupted},
               "files": {"trials": TRIALS_FILE}}
    write_file(out / HISTORY_PNG, lambda tmp: history_png(rows, ctx.maximize, metric_name, tmp), "tune",
               overwrite=True, checked=True)
    summary["files"]["history"] = HISTORY_PNG
    imp = importances(study)
    if imp:
        write_file(out / IMPORTANCE_PNG, lambda tmp: importance_png(imp, tmp), "tune", overwrite=True, checked=True)
        summary["importance"] = {k: round(v, 4) for k, v in imp.items()}
        summary["files"]["importance"] = IMPORTANCE_PNG
    if best is not None:
        cfg = validate(apply_overrides(copy.deepcopy(ctx.base_raw), overrides(best.params)))
        header = (f"# The best trial of study {ctx.study}: trial {best.number}, validation {metric_name} "
                  f"{best.value:.4f}.\n# Train it: tunelab train {BEST_FILE} --out runs/{ctx.study}-best\n")
        write_file(out / BEST_FILE, header + dump_config(cfg), "tune", overwrite=True, checked=True)
        model_dir = best_model_dir(study, best)
        summary["best"] = {"trial": best.number, "value": best.value, "params": best.params,
                           "worker": best.user_attrs.get("worker"),
                           "epochs": best.user_attrs.get("epochs"), "model_dir": str(model_dir) if model_dir else None,
                           "config": BEST_FILE}
        summary["files"]["best"] = BEST_FILE
    write_file(out / META_FILE, json.dumps(summary, indent=2, ensure_ascii=False, default=str), "tune",
               overwrite=True, checked=True)
    _print(rows, best, summary, metric_name, console, ctx)
    if best is None:
        first = next((r["error"] for r in rows if r.get("error")), None)
        counts = ", ".join(f"{n} {s}" for s, n in states.items())
        raise UserError(f"no trial of study {ctx.study} has completed ({counts})"
                        + (f"; first error: {first}" if first else "") + f"; trial logs in {out / 'trials'}")
    registered = _register(summary, ctx, metric_name)
    if registered and "skipped" in registered:
        print_warnings([f"not registered: {registered['skipped']}"], console)
    elif registered:
        summary["registered"] = registered
        write_file(out / META_FILE, json.dumps(summary, indent=2, ensure_ascii=False, default=str), "tune",
                   overwrite=True, checked=True)
        console.print(f"registered {registered['name']}:{registered['version'][:12]} (best trial {best.number})",
                      highlight=False, soft_wrap=True)
    return summary


def _print(rows, best, summary, metric_name, console: Console, ctx) -> None:
    done = sorted((r for r in rows if r["state"] == "complete" and r["value"] is not None),
                  key=lambda r: r["value"], reverse=ctx.maximize)[:10]
    if done:
        t = Table(title=f"best trials of {ctx.study} ({summary['trials']} trials: "
                  + ", ".join(f"{n} {s}" for s, n in summary["states"].items()) + ")")
        for col in ("trial", metric_name, "epochs", "s"):
            t.add_column(col, justify="right")
        keys = [p.key for p in ctx.space.params]
        for k in keys:
            t.add_column(k, justify="right")
        for r in done:
            t.add_row(str(r["number"]), f"{r['value']:.4f}", _num(r["epochs"]), _num(r["seconds"], 0),
                      *[_show(r.get(f"param:{k}")) for k in keys])
        console.print(t)
    if best is not None:
        console.print(f"[bold green]best[/] trial {best.number} · validation {metric_name} {best.value:.4f} · "
                      f"{summary['trial_epochs']:.1f} trial-epochs in all · {plain(ctx.out / BEST_FILE)} · "
                      f"{plain(ctx.out / TRIALS_FILE)} · {plain(ctx.out / HISTORY_PNG)}"
                      + (f" · {plain(ctx.out / IMPORTANCE_PNG)}" if "importance" in summary else ""),
                      soft_wrap=True, highlight=False)


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _show(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4)) or not math.isfinite(v) else f"{v:.4g}"
    return plain(v)


def _register(summary: dict, ctx, metric_name: str) -> dict | None:
    """The best model into the registry, when one is configured (--registry, TUNELAB_REGISTRY or
    TUNELAB_REGISTRY_DB); registering the same weights again changes nothing."""
    opts = ctx.opts
    if not (opts.registry or opts.registry_db or os.environ.get("TUNELAB_REGISTRY")
            or os.environ.get("TUNELAB_REGISTRY_DB")):
        return None
    best = summary["best"]
    if not best.get("model_dir"):  # it ran on another machine sharing the storage: registered from there
        return {"skipped": f"the best trial ({best['trial']}) has no model dir on this machine (worker "
                           f"{best.get('worker')}); register it where it ran"}
    with Registry(opts.registry, opts.registry_db) as reg:
        rec = reg.register(best["model_dir"], opts.register_name or ctx.study,
                           f"tune {ctx.study}: best of {summary['trials']} trials (trial {best['trial']}, "
                           f"validation {metric_name} {best['value']:.4f})")
    return {"name": rec["name"], "version": rec["version"]}
