"""`tunelab tune`: an Optuna study over config keys, trials run by the training loop, pruned at its evaluations.

One invocation adds `trials` trials to a study kept in a database (SQLite in the study folder by default; a
PostgreSQL/MySQL URL lets invocations on several machines share one study). Workers are processes, each with
its share of the cores; a worker takes a ticket before each trial, so the invocation runs exactly `trials`
trials whatever the workers' speeds. Each trial is a run dir under `trials/` written by `train`, whose every
validation pass reports the best score so far to the trial (the step is the evaluation's position in epochs,
`round(epochs done × evals_per_epoch)`, so trials with other batch sizes compare at the same point) and asks
the pruner; a pruned trial stops there, without a model dir. A worker that dies leaves its trial RUNNING until
its heartbeat is older than the grace period; then the next trial start of any worker (or this invocation's
end) fails it. A resumed study (same storage and name) continues: the sampler sees every earlier trial.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import sqlite3
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from rich.console import Console
from sqlalchemy.engine import make_url

from tunelab.artifacts import META_FILE, check_target, kind_of, write_file
from tunelab.config import RunConfig, apply_overrides, read_yaml_mapping, resolve_paths, validate
from tunelab.data.dataset import load_meta
from tunelab.errors import UserError
from tunelab.tasks import task_spec
from tunelab.terminal import plain
from tunelab.train.loop import ensure_dataset, resolve_task, train
from tunelab.tune import report
from tunelab.tune.space import Space, load_space, overrides

SAMPLERS = ("tpe", "random", "gp")
PRUNERS = ("median", "hyperband", "none")


@dataclass
class TuneOptions:
    trials: int
    workers: int = 1
    storage: str | None = None  # default: sqlite:///OUT/study.db
    study: str | None = None  # default: the config's name, else its file name
    timeout: float | None = None  # seconds after which no new trial starts (the running ones finish)
    sampler: str = "tpe"
    pruner: str = "median"
    startup_trials: int = 10  # the sampler's random trials before it models the results
    pruner_startup: int = 3  # completed trials before the median pruner prunes
    seed: int = 0
    heartbeat_s: int = 10  # a running trial's heartbeat; it is failed once older than 3 heartbeats
    keep_models: str = "best"  # best: only the best trial keeps its model dir; all: every completed trial
    registry: str | None = None  # register the best model here (also when TUNELAB_REGISTRY(_DB) is set)
    registry_db: str | None = None
    register_name: str | None = None  # the registry's model line (default: the study name)
    force: bool = False  # resume a study that was started with another config or space


@dataclass
class Context:
    """What a worker process needs (picklable: it crosses a spawn)."""

    base_raw: dict
    space: Space
    out: Path
    storage_url: str
    study: str
    metric: str
    maximize: bool
    threads: int
    opts: TuneOptions
    cores: int = 1
    max_resource: int | None = None  # the most evaluations a trial can make (Hyperband's top rung)

    def trial_config(self, params: dict, threads: int | None = None) -> RunConfig:
        items = overrides(params) + ([f"train.num_threads={threads}"] if threads else [])
        return validate(apply_overrides(copy.deepcopy(self.base_raw), items))


# ---- storage, sampler, pruner -----------------------------------------------------------------------------

def shown_url(url: str) -> str:
    """A storage URL with its password hidden (for output and the study folder's record)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: shown as given, it holds no password it could find
        return url


def open_storage(url: str, heartbeat_s: int):
    """Optuna's RDB storage with heartbeats (the grace period is three heartbeats); SQLite in WAL mode with a
    long busy timeout, so worker processes wait for each other's writes instead of failing."""
    try:
        parsed = make_url(url)
    except Exception as err:
        raise UserError(f"--storage {url!r} is not a database URL (sqlite:///PATH, postgresql+psycopg://…, "
                        f"mysql+pymysql://…): {err}") from None
    engine = {}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise UserError("--storage: an in-memory SQLite database cannot be shared by workers or resumed; "
                            "give a file (sqlite:///PATH)")
        Path(db).parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(db, timeout=60) as con:  # WAL is a property of the file: set once, kept
            con.execute("PRAGMA journal_mode=WAL")
        engine = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                              grace_period=3 * heartbeat_s)
    except (ImportError, ModuleNotFoundError) as err:
        raise UserError(f"--storage {shown_url(url)}: its database driver is not installed ({err}); for "
                        "PostgreSQL: pip install 'tunelab[postgres]'") from None
    except Exception as err:
        if type(err).__module__.startswith("sqlalchemy"):
            raise UserError(f"--storage {shown_url(url)}: cannot open the database: "
                            f"{str(err).splitlines()[0]}") from None
        raise


def make_sampler(opts: TuneOptions, seed: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if opts.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if opts.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=opts.startup_trials)
        # constant_liar: a running trial counts as a poor result, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=opts.startup_trials, multivariate=True,
                                          constant_liar=True)


def make_pruner(opts: TuneOptions, max_resource: int | None = None):
    """Median: prune below the median of completed trials at the same evaluation. Hyperband: brackets of
    successive halving from one evaluation up to `max_resource` (the most evaluations a trial can make)."""
    if opts.pruner == "none":
        return optuna.pruners.NopPruner()
    if opts.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_resource or "auto",
                                              reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=opts.pruner_startup, n_warmup_steps=0)


def max_evaluations(cfg: RunConfig, space: Space) -> int | None:
    """The most evaluations a trial of this space can report: the largest epochs × evals_per_epoch (None when
    evaluations are counted in steps or training is bounded by max_steps: then Hyperband takes it from the first
    completed trial)."""
    if cfg.train.eval_every or cfg.train.max_steps or any(p.key in ("train.eval_every", "train.max_steps")
                                                          for p in space.params):
        return None
    most = {"train.epochs": cfg.train.epochs, "train.evals_per_epoch": cfg.train.evals_per_epoch}
    for p in space.params:
        if p.key in most:
            most[p.key] = max(p.choices) if p.type == "categorical" else p.high
    return max(1, math.ceil(most["train.epochs"] * most["train.evals_per_epoch"]))


def worker_seed(seed: int, worker: int, existing: int) -> int:
    """Each worker, and each resumption, draws its own random points (never the first invocation's again)."""
    return int(np.random.SeedSequence([seed, worker, existing]).generate_state(1)[0])


# ---- one trial ---------------------------------------------------------------------------------------------

def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


def _same_params(study, params: dict):
    """A completed trial with exactly these parameters (a small discrete space repeats points), or None."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.params == params:
            return t
    return None


def objective(ctx: Context, trial) -> float:
    """Train one trial's config; report each evaluation; stop when the pruner says so."""
    params = ctx.space.suggest(trial)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    same = _same_params(trial.study, params)
    if same is not None:  # its score is known: no training
        trial.set_user_attr("duplicate_of", same.number)
        trial.set_user_attr("epochs", 0.0)
        return same.value
    cfg = ctx.trial_config(params, ctx.threads)
    run_dir = trial_dir(ctx.out, trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    per_epoch = cfg.train.evals_per_epoch
    reported: set[int] = set()

    def on_eval(point) -> bool:
        trial.set_user_attr("epochs", round(point.epochs, 4))
        step = max(1, round(point.epochs * per_epoch))
        if step in reported:  # a last evaluation close to the previous one: reported once
            return False
        reported.add(step)
        trial.report(point.best, step)
        return trial.should_prune()

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_suffix(".log"), "w", encoding="utf-8") as log:
        console = Console(file=log, width=120, soft_wrap=True, emoji=False, highlight=False)
        try:
            summary = train(cfg, run_dir, overwrite=True, console=console, show_progress=False, on_eval=on_eval,
                            checkpoints=False)
        except UserError as err:  # this point of the space cannot train (out of memory, a diverging lr): FAIL
            trial.set_user_attr("error", str(err))
            raise
    trial.set_user_attr("epochs", round(summary["epochs_trained"], 4))
    if summary.get("pruned"):
        raise optuna.TrialPruned(f"pruned after {summary['epochs_trained']:.2f} epochs")
    if summary.get("interrupted"):
        raise KeyboardInterrupt  # the trial ends FAIL; the invocation stops
    value = summary["validation"].get(ctx.metric)
    if value is None:
        raise UserError(f"trial {trial.number}: the validation metrics have no {ctx.metric}")
    trial.set_user_attr("model_dir", summary["model_dir"])
    return float(value)


def drop_other_models(study, out: Path) -> None:
    """`keep_models: best`: the model dirs of completed trials other than the best are removed (a completed
    trial that is not the best never becomes it again; its run dir, log and metrics stay)."""
    best = report.best_trial(study)
    for t in report.completed(study):
        model = trial_dir(out, t.number) / "model"
        if t.number != best.number and model.is_dir() and kind_of(model) == "model":
            shutil.rmtree(model, ignore_errors=True)


def _line(trial, metric_name: str) -> str:
    epochs = trial.user_attrs.get("epochs")
    took = (trial.datetime_complete - trial.datetime_start).total_seconds() if (
        trial.datetime_complete and trial.datetime_start) else None
    parts = [f"trial {trial.number} {trial.state.name.lower()}"]
    if trial.value is not None:
        parts.append(f"{metric_name} {trial.value:.4f}")
    elif trial.intermediate_values:
        step = max(trial.intermediate_values)
        parts.append(f"{metric_name} {trial.intermediate_values[step]:.4f} at evaluation {step}")
    if epochs is not None:
        parts.append(f"{epochs:.2f} epochs")
    if took is not None:
        parts.append(f"{took:.0f} s")
    if "duplicate_of" in trial.user_attrs:
        parts.append(f"same point as trial {trial.user_attrs['duplicate_of']}")
    if "error" in trial.user_attrs:
        parts.append(f"error: {trial.user_attrs['error']}")
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    return " · ".join(parts) + (f" · {params}" if params else "")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---- a worker ----------------------------------------------------------------------------------------------

def take_ticket(tickets) -> bool:
    with tickets.get_lock():
        if tickets.value <= 0:
            return False
        tickets.value -= 1
        return True


def work(ctx: Context, tickets, deadline: float | None, index: int, metric_name: str, emit=None) -> None:
    """One worker: trials until the tickets or the time run out; `emit(line)` says how each trial ended (on
    stderr by default: a spawned worker's lines join the invocation's progress)."""
    emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(ctx.threads)
    storage = open_storage(ctx.storage_url, ctx.opts.heartbeat_s)
    existing = len(optuna.load_study(study_name=ctx.study, storage=storage).trials)
    study = optuna.load_study(study_name=ctx.study, storage=storage,
                              sampler=make_sampler(ctx.opts, worker_seed(ctx.opts.seed, index, existing)),
                              pruner=make_pruner(ctx.opts, ctx.max_resource))

    def after(study, trial) -> None:
        emit(_line(trial, metric_name))
        if ctx.opts.keep_models == "best":
            drop_other_models(study, ctx.out)

    while (deadline is None or time.time() < deadline) and take_ticket(tickets):
        study.optimize(lambda t: objective(ctx, t), n_trials=1, catch=(UserError,), callbacks=[after])


def _work_process(ctx: Context, tickets, deadline, index: int, metric_name: str) -> None:
    """A spawned worker: a user error is one line on stderr and exit code 2 (not a traceback)."""
    try:
        work(ctx, tickets, deadline, index, metric_name)
    except UserError as err:
        print(f"error: worker {index}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


# ---- the invocation ----------------------------------------------------------------------------------------

def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "study"
    return s if s[0].isalnum() else "s" + s


def open_folder(out: Path) -> None:
    """The study folder: new, or one tunelab wrote for a study (never a folder tunelab did not write)."""
    if out.exists() and kind_of(out) == "tune":
        return
    check_target(out, "tune", overwrite=False)  # refuses a file, another artifact, a foreign folder
    out.mkdir(parents=True, exist_ok=True)
    _write_meta(out, {"kind": "tune", "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def _write_meta(out: Path, record: dict) -> None:
    write_file(out / META_FILE, json.dumps(record, indent=2, ensure_ascii=False), "tune", overwrite=True,
               checked=True)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tune(config: str | Path, space_path: str | Path, out: str | Path, opts: TuneOptions,
         config_overrides: list[str] | None = None, console: Console | None = None) -> dict:
    """Run `opts.trials` trials of the study; write the study folder's outputs -> its summary (see `report`)."""
    console = console or Console()
    _check_options(opts)
    out = Path(out).resolve()
    base_raw = apply_overrides(resolve_paths(read_yaml_mapping(config), Path(config).resolve().parent),
                               config_overrides or [], paths_from=Path.cwd())
    cfg = validate(copy.deepcopy(base_raw))
    space = load_space(space_path, base_raw)
    open_folder(out)
    data_dir, _ = ensure_dataset(cfg, console)  # prepared once here, not by each worker at the same time
    spec = task_spec(resolve_task(cfg, load_meta(data_dir), data_dir))
    metric, metric_name, maximize = spec.score
    name = opts.study or slug(cfg.name or Path(config).stem)
    url = opts.storage or f"sqlite:///{out / 'study.db'}"
    study = _open_study(name, url, opts, cfg, space, metric, metric_name, maximize)
    cores = usable_cores()
    workers = opts.workers
    threads = max(1, cores // workers)
    before = len(study.trials)
    ctx = Context(base_raw=base_raw, space=space, out=out, storage_url=url, study=name, metric=metric,
                  maximize=maximize, threads=threads, opts=opts, cores=cores, max_resource=max_evaluations(cfg, space))
    resumed = f" (the study holds {before} already)" if before else ""
    console.print(f"[bold]tune[/] study {plain(name)} · {plain(shown_url(url))} · {opts.trials} trials{resumed} · "
                  f"{workers} worker{'s' if workers > 1 else ''} × {threads} thread{'s' if threads > 1 else ''} "
                  f"({cores} cores) · sampler {opts.sampler} · pruner {opts.pruner} · {metric_name} "
                  f"({'higher' if maximize else 'lower'} is better)", soft_wrap=True, highlight=False)
    for p in space.params:
        console.print(f"  {plain(p.describe())}", highlight=False, soft_wrap=True)
    started = time.time()
    deadline = started + opts.timeout if opts.timeout else None
    tickets = multiprocessing.get_context("spawn").Value("i", opts.trials)
    interrupted = False
    try:
        if workers == 1:
            work(ctx, tickets, deadline, 0, metric_name,
                 emit=lambda line: console.print(plain(line), highlight=False, soft_wrap=True))
        else:
            _run_workers(ctx, tickets, deadline, metric_name, console)
    except KeyboardInterrupt:
        interrupted = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial, once its heartbeat is stale
    summary = report.write(study, ctx, metric_name, console, started=started, interrupted=interrupted,
                           shown_storage=shown_url(url))
    if interrupted:
        console.print("[bold yellow]stopped[/]; the study keeps every finished trial: run the same command to "
                      "continue it", soft_wrap=True)
    return summary


def _check_options(opts: TuneOptions) -> None:
    if opts.trials < 1:
        raise UserError("--trials must be at least 1")
    if opts.workers < 1:
        raise UserError("--workers must be at least 1")
    if opts.sampler not in SAMPLERS:
        raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}")
    if opts.pruner not in PRUNERS:
        raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}")
    if opts.timeout is not None and opts.timeout <= 0:
        raise UserError("--timeout must be a positive number of seconds")
    if opts.heartbeat_s < 1:
        raise UserError("--heartbeat must be at least 1 second")
    if opts.keep_models not in ("best", "all"):
        raise UserError("--keep-models must be best or all")


def _open_study(name: str, url: str, opts: TuneOptions, cfg: RunConfig, space: Space, metric: str, metric_name: str,
                maximize: bool):
    """The study `name` in `url`, created or loaded; a loaded one must optimise the same way, with the same
    config and space (unless forced)."""
    storage = open_storage(url, opts.heartbeat_s)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction = optuna.study.StudyDirection.MAXIMIZE if maximize else optuna.study.StudyDirection.MINIMIZE
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction=direction)
    if study.direction != direction:
        raise UserError(f"study {name} in {shown_url(url)} {study.direction.name.lower()}s; this config's "
                        f"{metric_name} is {'maximized' if maximize else 'minimized'}; choose another --study")
    _check_same_study(study, cfg, space, metric, opts.force, name)
    return study


def _check_same_study(study, cfg: RunConfig, space: Space, metric: str, force: bool, name: str) -> None:
    """A study continues only with the config and space it was started with (else its trials would mix two
    searches); `force` lets a changed one through, and records it."""
    record = {"config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True), "space": space.to_json(),
              "metric": metric}
    saved = study.user_attrs.get("tunelab")
    if saved is None:
        study.set_user_attr("tunelab", record)
        return
    changed = [k for k in ("config", "space", "metric") if saved.get(k) != record[k]]
    if changed and not force:
        raise UserError(f"study {name} was started with another {' and '.join(changed)}; pass --force to add "
                        "trials to it anyway, or choose another --study")
    if changed:
        study.set_user_attr("tunelab", record)


def _run_workers(ctx: Context, tickets, deadline: float | None, metric_name: str, console: Console) -> None:
    """`workers` spawned processes; one that dies while tickets remain is replaced (its trial is failed by the
    heartbeat check), up to as many replacements as trials."""
    mp = multiprocessing.get_context("spawn")
    procs, next_index, replacements, crashed = {}, 0, 0, False

    def start() -> None:
        nonlocal next_index
        p = mp.Process(target=_work_process, args=(ctx, tickets, deadline, next_index, metric_name), daemon=False)
        p.start()
        procs[next_index] = p
        next_index += 1

    for _ in range(ctx.opts.workers):
        start()
    try:
        while procs:
            time.sleep(0.5)
            for index, p in list(procs.items()):
                if p.is_alive():
                    continue
                p.join()
                del procs[index]
                if p.exitcode in (0, 130):
                    continue
                console.print(f"[bold yellow]worker {index} ended with exit code {p.exitcode}[/] (pid {p.pid}); "
                              "its trial is failed once its heartbeat is stale", soft_wrap=True, highlight=False)
                if p.exitcode == 2:
                    continue  # a user error: the same for any worker, not replaced
                crashed = True
                alive = deadline is None or time.time() < deadline
                if tickets.value > 0 and alive and replacements < ctx.opts.trials:
                    replacements += 1
                    start()
        if crashed:
            time.sleep(3 * ctx.opts.heartbeat_s + 1)  # a dead worker's trial: stale once past the grace period
    except KeyboardInterrupt:
        for p in procs.values():
            p.join(timeout=60)
        raise
