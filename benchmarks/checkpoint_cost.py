"""Checkpoint cost for SmolLM2-135M-Instruct, full fine-tuning and LoRA (r=16, every linear layer):

1. save and load time and size of one checkpoint (`tunelab.train.checkpoint`: safetensors weights, optimizer
   and scheduler state, RNG, loop state, then the sha256 manifest written last with fsync), with the
   optimizer state populated by one real step;
2. the training-time overhead of checkpointing every N steps: save time / (N x step time), with the step
   time measured on the same machine (SFT, one 512-token block per step, bf16 autocast where native).
   tunelab's default interval is one checkpoint per evaluation (per epoch unless `train.eval_every`).

Writes benchmarks/results/checkpoint_cost.json.

    python benchmarks/checkpoint_cost.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

from tunelab.config import MethodConfig  # noqa: E402
from tunelab.methods import MethodContext, apply_method  # noqa: E402
from tunelab.models import load_causal_lm, trainable_state  # noqa: E402
from tunelab.tasks.sft import SFTTask  # noqa: E402
from tunelab.train import checkpoint as ckpt  # noqa: E402
from tunelab.train.optim import build_optimizer, build_schedule  # noqa: E402
from tunelab.train.precision import autocast, resolve_precision  # noqa: E402

BASE = "builtin:smollm2-135m-instruct"
INTERVALS = [10, 50, 100, 500]
CONV = [{"role": "user", "content": "What is the capital of France, and what is it known for?"},
        {"role": "assistant", "content": "Paris. It is known for the Eiffel Tower, the Louvre, its cafes and "
                                         "its long history as a centre of art, fashion and science."}]


def measure(method: str, steps: int = 4) -> dict:
    model, tok, _, _ = load_causal_lm(BASE)
    cfg = MethodConfig(name=method)
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 16, 32, 0.0
    model = apply_method(model, cfg, MethodContext("sft", [], total_steps=100))
    task = SFTTask(tok, 512)
    enc = task.encode([{"messages": CONV}] * 8)
    batch = task.collate(enc, list(range(len(enc))))
    opt = build_optimizer(model, 1e-4, 0.01)
    sched = build_schedule(opt, "linear", 100, 5)
    precision = resolve_precision("auto", "cpu")
    times = []
    for _ in range(steps):  # the first step also fills the optimizer state
        t = time.perf_counter()
        with autocast(precision, "cpu"):
            loss = task.loss_sum(model, batch) / task.units(enc, range(len(enc)))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        saves, loads = [], []
        for i in range(3):
            t = time.perf_counter()
            d = ckpt.save_checkpoint(root, i + 1, trainable_state(model), opt, sched, {"loop": {"step": i + 1}},
                                     keep_last=1)
            saves.append(time.perf_counter() - t)
            t = time.perf_counter()
            ckpt.load_checkpoint(d)
            loads.append(time.perf_counter() - t)
        size = sum(p.stat().st_size for p in d.iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save_s = sorted(saves)[1]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "trainable_params": trainable, "checkpoint_mb": size / 2**20, "save_s": save_s,
            "load_s": sorted(loads)[1], "step_s": step_s, "precision": precision,
            "overhead_every_n_steps": {str(n): save_s / (n * step_s) for n in INTERVALS}}


def main() -> None:
    torch.manual_seed(0)
    rows = [measure("lora"), measure("full")]
    for r in rows:
        over = " · ".join(f"every {n}: {100 * v:.1f}%" for n, v in r["overhead_every_n_steps"].items())
        print(f"{r['method']:4s} {r['checkpoint_mb']:8.1f} MB · save {r['save_s']:.2f} s · load {r['load_s']:.2f} s "
              f"· step {r['step_s']:.2f} s · overhead {over}", flush=True)
    path = write_result("checkpoint_cost", {"model": BASE, "runs": rows,
                                            "target": "overhead <= 5% at the default interval"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
