"""Runs made of several runs: a config's `ensemble` section (one member per seed, combined into an ensemble dir)
and the shared rule of `tunelab cv` and ensembles for a sub-run that already exists.

A sub-run dir that holds a model trained with the same config (and, for cv, the same rows) is kept; one stopped
with a checkpoint of the same config continues from it; anything else is trained afresh. So a stopped ensemble or
CV continues where it stopped when the command is run again, and `--overwrite` retrains every sub-run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from tunelab.artifacts import META_FILE, FolderLock, write_file
from tunelab.config import RunConfig, dump_config
from tunelab.ensemble import build_ensemble
from tunelab.errors import UserError
from tunelab.models import library_versions, read_meta
from tunelab.tasks import task_spec
from tunelab.terminal import make_console, plain
from tunelab.train import checkpoint as ckpt
from tunelab.train.loop import check_run_dir, ensure_dataset, resolve_task, train
from tunelab.data.dataset import load_meta


def same_config(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether the run dir `run_dir` was started with `cfg`."""
    saved = run_dir / "config.yaml"
    return saved.is_file() and saved.read_text(encoding="utf-8") == dump_config(cfg)


def train_or_keep(cfg: RunConfig, run_dir: Path, name: str, overwrite: bool, console: Console,
                  show_progress: bool, fingerprint: str | None = None) -> dict | None:
    """Train `cfg` into `run_dir`, unless it already holds a model of this config (and of the data `fingerprint`,
    when given): -> the run's summary, or None when kept. A checkpoint of this config is continued."""
    model = run_dir / "model" / META_FILE
    if not overwrite and model.is_file() and same_config(run_dir, cfg) and (
            fingerprint is None or read_meta(run_dir / "model")["data"]["fingerprint"] == fingerprint):
        console.print(f"[bold]{name}[/]: kept (trained before with this config)")
        return None
    resume = "auto" if (not overwrite and same_config(run_dir, cfg)
                        and ckpt.complete_checkpoints(run_dir / "checkpoints")) else None
    if resume:
        console.print(f"[bold]{name}[/]: continuing from its last checkpoint")
    summary = train(cfg, run_dir, resume=resume, overwrite=resume is None, console=console,
                    show_progress=show_progress)
    if "model_dir" not in summary:
        raise UserError(f"{name} stopped before its model was saved; run the same command again to continue")
    return summary


def train_ensemble(cfg: RunConfig, out: str | Path, resume: str | None = None, overwrite: bool = False,
                   console: Console | None = None, show_progress: bool = False) -> dict:
    """A config with an `ensemble` section: each seed's member trained into `out/members/seed-N/`, then the
    ensemble dir `out/model` -> a summary (the model dir, each member's best validation score)."""
    console = console or make_console(stderr=True)
    out = Path(out)
    if resume not in (None, "auto"):
        raise UserError("an ensemble run continues each member from its own last checkpoint: use --resume auto")
    check_run_dir(out, resume, overwrite)  # again under the lock below
    data_dir, _ = ensure_dataset(cfg, console)
    spec = task_spec(resolve_task(cfg, load_meta(data_dir), data_dir))
    if not spec.labelled:
        raise UserError(f"ensemble: members are combined by their probabilities; task {spec.name} has none "
                        "(classification and NER do)")
    started = time.perf_counter()
    with FolderLock(out):  # one writer of the ensemble run; each member's run dir has its own lock
        check_run_dir(out, resume, overwrite)
        return _train_members(cfg, out, spec, overwrite, console, show_progress, started)


def _train_members(cfg: RunConfig, out: Path, spec, overwrite: bool, console: Console, show_progress: bool,
                   started: float) -> dict:
    ens = cfg.ensemble
    write_file(out / META_FILE, json.dumps({"kind": "run", "name": cfg.name, "task": spec.name,
                                            "base": cfg.model.base, "ensemble": ens.model_dump(mode="json"),
                                            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                            "versions": library_versions()}, indent=2), "run", overwrite=True,
               checked=True)
    write_file(out / "config.yaml", dump_config(cfg), "run", overwrite=True, checked=True)
    members = []
    for seed in ens.seeds:
        raw = cfg.model_dump(mode="json")
        raw["train"]["seed"], raw["ensemble"] = seed, None
        member = RunConfig.model_validate(raw)
        run_dir = out / "members" / f"seed-{seed}"
        console.print(f"[bold]member seed {seed}[/] ({len(members) + 1} of {len(ens.seeds)}) → {plain(run_dir)}")
        train_or_keep(member, run_dir, f"member seed {seed}", overwrite, console, show_progress)
        meta = read_meta(run_dir / "model")
        members.append({"seed": seed, "model_dir": str(run_dir / "model"),
                        "validation": meta["metrics"]["validation"].get(spec.score[0])})
    record = build_ensemble([m["model_dir"] for m in members], out / "model", ens.combine, overwrite=True)
    console.print(f"[bold green]saved[/] {plain(out / 'model')} · ensemble ({ens.combine}) of {len(members)} · "
                  "members' best validation " + ", ".join(f"{m['validation']:.4f}" for m in members))
    return {"model_dir": str(out / "model"), "task": record["task"], "ensemble": ens.combine, "members": members,
            "elapsed_s": time.perf_counter() - started}
