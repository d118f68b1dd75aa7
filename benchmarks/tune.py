"""Hyperparameter search on the built-in tweets: TPE with median pruning against random search without pruning.

Setup: MiniLM-L6 (full fine-tune, bf16 where the CPU has it) on `--train` rows of the tweets' train split,
scored on `--val` rows of the validation split (macro-F1), evaluated twice per epoch (`train.evals_per_epoch: 2`:
each evaluation is a point where a trial can be pruned). Space: train.lr (log 1e-6..1e-3), train.epochs (1..4),
train.warmup_ratio (0..0.3), train.weight_decay (0..0.1), train.batch_size {8, 16, 32, 64}.

Arms, each with the same number of trials (`--trials`) and sampler seeds `--seeds`:
- random: Optuna's RandomSampler, no pruning (the baseline a user scripting a grid or random search gets);
- tpe_median: TPE (multivariate, constant liar, `--startup-trials` random trials first) with the median pruner
  (`--pruner-startup` completed trials before it prunes);
- tpe_hyperband: the same TPE with Optuna's Hyperband pruner (min resource 1 evaluation, max resource from the
  first completed trial, reduction factor 3).
The cost of a search is its trial-epochs: the epochs every trial trained, a pruned trial up to where it stopped.
Target: over the seeds, the median share of the random search's trial-epochs that TPE + pruning spends before its
best-so-far reaches the random search's best score (of the same seed) is <= 40% (a seed where it never does
counts as infinite).

Parallelism: the same study (`--parallel-trials` trials of 1 epoch, only the learning rate varying, no pruning)
with 1 worker of 2 threads and with 2 workers of 1 thread each; wall seconds as measured (2 cores: no target).

The anchor, the Hugging Face Trainer's `hyperparameter_search(backend="optuna")`, is described in the results (its
pruning reports at the global step, so trials with other batch sizes never share a step and the median pruner
compares a trial only with trials of the same batch size; its default study is in memory: no resume, no heartbeat,
one process).

Run alone (2 cores): `python benchmarks/tune.py` (~90 min; `--reuse` reads the studies an earlier run left in
runs/tune-bench/studies and runs only the missing arms) -> benchmarks/results/tune.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_result  # noqa: E402

from tunelab.config import PrepareOptions  # noqa: E402
from tunelab.data.prepare import prepare  # noqa: E402
from tunelab.tune.search import TuneOptions, tune  # noqa: E402

ROOT = Path(__file__).parent.parent / "runs" / "tune-bench"
SPACE = {
    "train.lr": {"low": 1.0e-6, "high": 1.0e-3, "log": True},
    "train.epochs": {"type": "int", "low": 1, "high": 4},
    "train.warmup_ratio": {"low": 0.0, "high": 0.3},
    "train.weight_decay": {"low": 0.0, "high": 0.1},
    "train.batch_size": {"choices": [8, 16, 32, 64]},
}


def config(data: Path, train: int, val: int) -> dict:
    return {"task": "classification", "name": "tweets-tune",
            "model": {"base": "builtin:minilm-l6", "max_length": 64},
            "data": {"dir": str(data), "max_train_examples": train, "max_eval_examples": val},
            "method": {"name": "full"},
            "train": {"epochs": 2, "batch_size": 32, "lr": 5e-5, "eval_every": 0, "evals_per_epoch": 2,
                      "seed": 0, "log_every": 50}}


def read_trials(study_dir: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO((study_dir / "trials.csv").read_text())))
    for r in rows:
        r["value"] = float(r["value"]) if r["value"] else None
        r["epochs"] = float(r["epochs"]) if r["epochs"] else 0.0
    return rows


def search_stats(rows: list[dict]) -> dict:
    """Best score (complete trials), total trial-epochs, and the best-so-far curve against cumulative epochs."""
    best, spent, curve = None, 0.0, []
    for r in rows:
        spent += r["epochs"]
        if r["state"] == "complete" and r["value"] is not None and (best is None or r["value"] > best):
            best = r["value"]
        curve.append((round(spent, 3), best))
    return {"best": best, "trial_epochs": round(spent, 3), "curve": curve,
            "states": {s: sum(r["state"] == s for r in rows) for s in {r["state"] for r in rows}}}


def epochs_to_reach(curve: list, target: float) -> float | None:
    for spent, best in curve:
        if best is not None and best >= target - 1e-12:
            return spent
    return None


ARMS = ("random", "tpe_median", "tpe_hyperband")


def arm_options(arm: str, args) -> dict:
    if arm == "random":
        return dict(sampler="random", pruner="none")
    return dict(sampler="tpe", pruner=arm.split("_")[1], startup_trials=args.startup_trials,
                pruner_startup=args.pruner_startup)


def _arm_summary(per_seed: dict, arm: str, seeds: list[int]) -> dict:
    return {"best": [per_seed[s][arm]["best"] for s in seeds],
            "trial_epochs": [per_seed[s][arm]["trial_epochs"] for s in seeds],
            "wall_s": [per_seed[s][arm]["wall_s"] for s in seeds],
            "states": [per_seed[s][arm]["states"] for s in seeds]}


def run_arm(cfg_path: Path, space_path: Path, out: Path, opts: TuneOptions, log: Path) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        tune(cfg_path, space_path, out, opts, console=Console(file=f, width=160))
    return read_trials(out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--startup-trials", type=int, default=4)
    ap.add_argument("--pruner-startup", type=int, default=3)
    ap.add_argument("--parallel-trials", type=int, default=4)
    ap.add_argument("--skip-parallel", action="store_true")
    ap.add_argument("--arms", nargs="+", default=["random", "tpe_median", "tpe_hyperband"], choices=ARMS)
    ap.add_argument("--reuse", action="store_true", help="read the studies an earlier run left in runs/tune-bench "
                    "instead of running them again (arms and seeds with a trials.csv)")
    ap.add_argument("--name", default="tune")
    args = ap.parse_args()

    ROOT.mkdir(parents=True, exist_ok=True)
    data = ROOT / "tweets"
    if not (data / "dataset.json").is_file():
        prepare("builtin:tweets-sentiment", data, PrepareOptions(seed=0))
    cfg_path, space_path = ROOT / "config.yaml", ROOT / "space.yaml"
    cfg_path.write_text(yaml.safe_dump(config(data.resolve(), args.train, args.val), sort_keys=False))
    space_path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    studies = ROOT / "studies"
    if studies.exists() and not args.reuse:
        import shutil

        shutil.rmtree(studies)
    studies.mkdir(exist_ok=True)
    previous = json.loads((RESULTS / f"{args.name}.json").read_text()) if args.reuse and (
        RESULTS / f"{args.name}.json").is_file() else {}

    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = {}
        for arm in ["random", *[a for a in args.arms if a != "random"]]:
            kw = arm_options(arm, args)
            out = studies / f"{arm}-{seed}"
            if args.reuse and (out / "trials.csv").is_file():
                rows = read_trials(out)
                wall = previous.get("per_seed", {}).get(str(seed), {}).get(arm, {}).get("wall_s", float("nan"))
            else:
                rows, wall = run_arm(cfg_path, space_path, out, TuneOptions(trials=args.trials, seed=seed, **kw),
                                     studies / f"{arm}-{seed}.log")
            stats = search_stats(rows)
            per_seed[seed][arm] = {**stats, "wall_s": round(wall, 1),
                                   "trials": [{k: r[k] for k in ("number", "state", "value", "epochs")}
                                              | {"params": {k.split(":", 1)[1]: v for k, v in r.items()
                                                            if k.startswith("param:")}} for r in rows]}
            print(f"seed {seed} {arm}: best {stats['best']:.4f} · {stats['trial_epochs']:.1f} trial-epochs · "
                  f"{wall:.0f} s · {stats['states']}", flush=True)
        rnd = per_seed[seed]["random"]
        for arm in args.arms:
            if arm == "random":
                continue
            reach = epochs_to_reach(per_seed[seed][arm]["curve"], rnd["best"])
            per_seed[seed][arm]["reaches_random_best_at_epochs"] = reach
            per_seed[seed][arm]["share_of_random_epochs"] = None if reach is None else round(
                reach / rnd["trial_epochs"], 4)
            print(f"seed {seed}: {arm} reaches random's best {rnd['best']:.4f} after "
                  f"{reach if reach is not None else 'never'} of random's {rnd['trial_epochs']:.1f} trial-epochs",
                  flush=True)

    summary = {"target_share": 0.4, "random": _arm_summary(per_seed, "random", args.seeds)}
    for arm in args.arms:
        if arm != "random":
            shares = [per_seed[s][arm]["share_of_random_epochs"] for s in args.seeds]
            median = statistics.median([x if x is not None else float("inf") for x in shares])
            summary[arm] = {**_arm_summary(per_seed, arm, args.seeds), "share_of_random_epochs": shares,
                            "median_share_of_random_epochs": median, "met": median <= 0.4}
    print(json.dumps(summary), flush=True)

    parallel = previous.get("parallel")
    if not args.skip_parallel:
        pspace = ROOT / "space-parallel.yaml"
        pspace.write_text(yaml.safe_dump({"train.lr": {"low": 3.0e-5, "high": 1.0e-4, "log": True}}))
        pcfg = ROOT / "config-parallel.yaml"
        raw = config(data.resolve(), args.train, args.val)
        raw["train"].update(epochs=1, batch_size=32)
        pcfg.write_text(yaml.safe_dump(raw, sort_keys=False))
        parallel = {}
        for label, workers in (("1_worker_x_2_threads", 1), ("2_workers_x_1_thread", 2)):
            out = studies / f"parallel-{workers}"
            rows, wall = run_arm(pcfg, pspace, out, TuneOptions(trials=args.parallel_trials, workers=workers,
                                                                sampler="random", pruner="none"),
                                 studies / f"parallel-{workers}.log")
            parallel[label] = {"wall_s": round(wall, 1), "trials": len(rows),
                               "complete": sum(r["state"] == "complete" for r in rows),
                               "trials_per_hour": round(3600 * len(rows) / wall, 1)}
            print(label, parallel[label], flush=True)
        parallel["ratio_2x1_over_1x2_wall"] = round(parallel["2_workers_x_1_thread"]["wall_s"]
                                                    / parallel["1_worker_x_2_threads"]["wall_s"], 3)

    write_result(args.name, {
        "setup": {"model": "builtin:minilm-l6", "max_length": 64, "train_rows": args.train, "validation_rows":
                  args.val, "evals_per_epoch": 2, "trials": args.trials, "seeds": args.seeds, "space": SPACE,
                  "tpe": {"startup_trials": args.startup_trials, "multivariate": True, "constant_liar": True},
                  "median_pruner": {"n_startup_trials": args.pruner_startup, "reported": "best so far, at "
                                    "round(epochs x evals_per_epoch)"}},
        "summary": summary, "per_seed": {str(k): v for k, v in per_seed.items()}, "parallel": parallel,
        "anchor": {"name": "transformers Trainer.hyperparameter_search(backend='optuna')",
                   "measured": False,
                   "behaviour": "optuna.create_study(direction, **kwargs) then study.optimize(n_trials, timeout, "
                   "n_jobs); create_study's default pruner is MedianPruner; each Trainer evaluation reports the "
                   "objective at state.global_step and raises TrialPruned when should_prune() (only with an "
                   "evaluation strategy set); global steps differ with the batch size, so the pruner compares "
                   "a trial only with finished trials that reported at the same global step; storage in memory "
                   "unless one is passed (no resume across processes), no heartbeat, n_jobs threads in one "
                   "process"}})


if __name__ == "__main__":
    main()
