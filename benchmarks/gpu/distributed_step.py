"""One GPU: the cost of tunelab's distributed machinery and of checkpoints at 1B scale.

1. Step time of full fine-tuning (bf16 autocast over fp32 weights, packed 2048-token rows, random
   SmolLM2-135M and Llama-1B shapes) in the plain single-process loop vs under FSDP2 (`fully_shard` per layer +
   root on a one-rank mesh, the loss through the model's forward as `train.distributed: fsdp` does), so the
   wrapping overhead shows. (DDP with one rank is the plain loop: tunelab all-reduces only when world > 1.)
2. Checkpoint save / load time and size for the 1B shape with its AdamW state (`tunelab.train.checkpoint`:
   safetensors + manifest with sha256, fsync), written to local disk.

Run under torchrun (installs nothing; needs only PYTHONPATH=src):

    PYTHONPATH=src torchrun --standalone --nproc_per_node 1 benchmarks/gpu/distributed_step.py [--smoke]

Writes $OUT/distributed_step.json (or benchmarks/results/gpu_distributed_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SHAPES, SMOKE, build, conversations  # noqa: E402

from tunelab.tasks.causal_lm import IGNORE, CausalLMTask, chunked_lm_loss_sum, full_logits_loss_sum  # noqa: E402
from tunelab.tasks.causal_lm import pack_bins, shift_targets  # noqa: E402
from tunelab.train import checkpoint as ckpt  # noqa: E402
from tunelab.train import distributed  # noqa: E402


def batches(convs, block, rows, n, device):
    task = CausalLMTask(SimpleNamespace(pad_token_id=0), block)
    enc = pack_bins([(ids, shift_targets(ids, lab)) for ids, lab in convs], block)
    out = []
    for s in range(n):
        idx = [(s * rows + r) % len(enc) for r in range(rows)]
        out.append({k: v.to(device) for k, v in task.collate(enc, idx).items()})
    return out


def step_time(shape, mode, device, block, rows, steps, warmup) -> dict:
    model, n_params = build(shape, "full", device)
    if mode == "fsdp":
        model = distributed.shard_model(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = batches(conversations(2000, shape["vocab_size"], block), block, rows, steps + warmup, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    times, tokens = [], 0
    for s, batch in enumerate(data):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
            fn = full_logits_loss_sum if mode == "fsdp" else chunked_lm_loss_sum
            loss = fn(model, batch) / (batch["targets"] != IGNORE).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        if s >= warmup:
            times.append(time.perf_counter() - t)
            tokens += int((batch["input_ids"] != 0).sum())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"mode": mode, "params": n_params, "step_s": sorted(times)[len(times) // 2],
            "tokens_per_s": tokens / sum(times), "peak_mem_gib": peak}


def checkpoint_cost(shape, device) -> dict:
    model, n_params = build(shape, "full", device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(3, shape["vocab_size"], (1, 64), device=device)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = Path(tempfile.mkdtemp(prefix="ckpt-gpu-"))
    try:
        t = time.perf_counter()
        weights = {n: p.detach().to("cpu") for n, p in model.named_parameters()}
        d = ckpt.save_checkpoint(root, 1, weights, opt, sched, {"loop": {"step": 1}}, keep_last=1)
        save_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in d.iterdir())
        t = time.perf_counter()
        ckpt.load_checkpoint(d)
        load_s = time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"params": n_params, "size_gib": size / 2**30, "save_s": save_s, "load_s": load_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    shapes = {"smoke": SMOKE} if args.smoke else SHAPES
    block, rows, steps, warmup = (128, 2, 3, 1) if args.smoke else (2048, 8, 10, 3)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "block": block, "rows_per_step": rows, "steps": []}
    for name, shape in shapes.items():
        for mode in ("plain", "fsdp"):
            r = {"shape": name, **step_time(shape, mode, device, block, rows, steps, warmup)}
            result["steps"].append(r)
            print(f"{name:13s} {mode:5s} step {r['step_s'] * 1000:8.1f} ms · {r['tokens_per_s']:10,.0f} tok/s · "
                  f"peak {r['peak_mem_gib']:6.1f} GiB", flush=True)
    big = "smoke" if args.smoke else "llama-1b"
    c = checkpoint_cost(shapes[big], device)
    result["checkpoint"] = {"shape": big, **c}
    print(f"checkpoint {big}: {c['size_gib']:.1f} GiB · save {c['save_s']:.1f} s · load {c['load_s']:.1f} s",
          flush=True)
    dist.destroy_process_group()
    if args.smoke:
        return
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parents[1] / "results"
    name = "distributed_step.json" if os.environ.get("OUT") else "gpu_distributed_step.json"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=2))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
