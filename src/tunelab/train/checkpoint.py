"""Checkpoints: `checkpoints/step-N/` with trainable weights (safetensors), optimizer, scheduler,
RNG and loop state; complete only once `manifest.json` (file list, sizes, sha256) is written last,
fsynced and atomically renamed. Folders without a manifest are ignored, and removed by the run's writer.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import UserError
from tunelab.model_files import sha256_file

MANIFEST = "manifest.json"


def write_durably(path: Path, text: str) -> None:
    """Write `text` to a sibling, fsync it, rename it over `path`: the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():  # one generator per device
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], optimizer, scheduler,
                    loop_state: dict, keep_last: int, keep: set[int] = frozenset(),
                    best_weights: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write `ckpt_root/step-N` and its manifest last; then prune older complete ones beyond `keep_last`
    (never those in `keep`, e.g. the best). `best_weights`, when given, are the best-so-far trainable
    weights if they differ from the current ones."""
    d = Path(ckpt_root) / f"step-{step}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, d / "weights.safetensors")
    if best_weights:
        save_file({k: v.contiguous() for k, v in best_weights.items()}, d / "best_weights.safetensors")
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state()},
               d / "trainer_state.pt")
    (d / "loop_state.json").write_text(json.dumps(loop_state, indent=1))
    for p in d.iterdir():  # the data is on disk before the manifest says the checkpoint exists
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(d.iterdir())}
    write_durably(d / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
    dir_fd = os.open(d, os.O_RDONLY)  # and the manifest's directory entry too
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    prune(ckpt_root, keep_last, keep | {step})
    return d


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoints with a manifest, oldest first (whether their files match it is `verify`'s question)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    done = [d for d in root.iterdir() if _is_step_dir(d) and (d / MANIFEST).is_file()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def _is_step_dir(d: Path) -> bool:
    return d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit()


def clean_incomplete(ckpt_root: Path) -> list[Path]:
    """Remove checkpoint folders without a manifest (a save that was interrupted) -> the removed ones.
    Only the run's writer calls this, holding the run dir's lock."""
    root = Path(ckpt_root)
    gone = [d for d in root.iterdir() if _is_step_dir(d) and not (d / MANIFEST).is_file()] if root.is_dir() else []
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


def prune(ckpt_root: Path, keep_last: int, keep: set[int]) -> None:
    done = complete_checkpoints(ckpt_root)
    for d in done[:-keep_last] if keep_last else done:
        if int(d.name[5:]) not in keep:
            shutil.rmtree(d, ignore_errors=True)


def verify(d: Path) -> dict:
    """Check a checkpoint against its manifest -> the manifest; a `UserError` names what is wrong."""
    if not (d / MANIFEST).is_file():
        raise UserError(f"{d} is not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(
            isinstance(i, dict) and isinstance(i.get("size"), int) and isinstance(i.get("sha256"), str)
            for i in files.values()):
        raise UserError(f"checkpoint {d} is damaged: {d / MANIFEST} is malformed (no file list with sizes and "
                        "sha256)")
    for name in ("weights.safetensors", "trainer_state.pt", "loop_state.json"):
        if name not in files:
            raise UserError(f"checkpoint {d} is damaged: {MANIFEST} does not list {name}")
    for name, info in files.items():
        p = d / name
        if Path(name).name != name or not p.is_file():
            raise UserError(f"checkpoint {d} is damaged: {name} is missing")
        if p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
            raise UserError(f"checkpoint {d} is damaged: {name} does not match its manifest")
    return manifest


def load_resume(run_dir: Path, resume: str, note=print):
    """`resume` = `auto` (the newest checkpoint of the run that passes `verify`; damaged newer ones are
    skipped, each with a `note`) or a checkpoint path -> (path, *load_checkpoint(path))."""
    if resume != "auto":
        p = Path(resume)
        if not p.is_dir():
            raise UserError(f"--resume: no checkpoint folder at {p}")
        return (p, *load_checkpoint(p))
    done = complete_checkpoints(Path(run_dir) / "checkpoints")
    if not done:
        raise UserError(f"--resume auto: no complete checkpoint in {run_dir}/checkpoints")
    for d in reversed(done):
        try:
            return (d, *load_checkpoint(d))
        except UserError as err:
            note(f"skipping {err}")
    raise UserError(f"--resume auto: every checkpoint in {run_dir}/checkpoints is damaged (see above)")


def load_checkpoint(d: Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict[str, torch.Tensor] | None]:
    """-> (trainable weights, trainer state (optimizer, scheduler, rng), loop state, best weights or None)."""
    verify(d)
    weights = load_file(d / "weights.safetensors")
    trainer = torch.load(d / "trainer_state.pt", weights_only=True)
    loop_state = json.loads((d / "loop_state.json").read_text())
    best = load_file(d / "best_weights.safetensors") if (d / "best_weights.safetensors").is_file() else None
    return weights, trainer, loop_state, best
