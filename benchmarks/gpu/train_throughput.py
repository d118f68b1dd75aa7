"""GPU training throughput: tunelab's step vs the Hugging Face Trainer-style step, bf16, sequences to 2048.

For the SmolLM2-135M shape and a ~1B Llama shape (Llama-3.2-1B: 2048 hidden, 16 layers, 128k vocabulary),
random weights, LoRA (r=16, every linear layer) and full fine-tuning, on the same synthetic conversations
(lengths log-normal around 400 tokens, capped at 2048; the last ~35% of each is the assistant's answer):

- `hf`: what `Trainer` + `peft` + `DataCollatorForSeq2Seq` do each step: the step's conversations padded
  to the longest, `model(..., labels=...)` (full-vocabulary logits, upcast to float32 for the loss),
  bf16 autocast over fp32 master weights, clip, fused AdamW;
- `tunelab`: the same conversations packed whole into 2048-token rows (position resets -> no attention
  across conversations), loss only at target positions through the chunked cross-entropy of
  `tunelab.tasks.causal_lm`, otherwise the same.

Both arms train on exactly the same real tokens per step. Reported: real tokens/s (padding excluded),
MFU = k·N·tokens/s over the bf16 matmul peak measured here (k = 6 full, 4 LoRA; N = parameters), peak GPU
memory. Runs in well under 8 minutes, installs nothing (torch, transformers, peft), needs only
`PYTHONPATH=src`. Writes $OUT/train_throughput.json (or benchmarks/results/gpu_train_throughput.json).

    PYTHONPATH=src python benchmarks/gpu/train_throughput.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from tunelab.tasks.causal_lm import IGNORE, CausalLMTask, chunked_lm_loss_sum, pack_bins, shift_targets  # noqa: E402

# tokens per optimizer step per shape: the padded full-vocabulary logits of the `hf` arm must fit in memory
TOKENS_PER_STEP = {"smollm2-135m": 8192, "llama-1b": 4096, "smoke": 512}
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True)


def bf16_peak(device: str, n: int = 8192, reps: int = 10) -> float:
    """Measured dense bf16 matmul FLOP/s (the MFU denominator)."""
    if device != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def conversations(n: int, vocab: int, max_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) with the last ~35% of tokens as the answer (labels = ids there, IGNORE elsewhere)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(min(max_len, max(16, rng.lognormal(math.log(400), 0.7))))
        ids = rng.integers(3, vocab, length).tolist()
        answer = int(length * 0.65)
        out.append((ids, [IGNORE] * answer + ids[answer:]))
    return out


def steps_of(convs, tokens_per_step: int) -> list[list[int]]:
    steps, cur, used = [], [], 0
    for i, (ids, _) in enumerate(convs):
        if cur and used + len(ids) > tokens_per_step:
            steps.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += len(ids)
    return steps


def hf_batch(convs, idx, pad_id: int, device: str) -> dict:
    width = max(len(convs[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for r, i in enumerate(idx):
        n = len(convs[i][0])
        ids[r, :n] = torch.tensor(convs[i][0])
        mask[r, :n] = 1
        labels[r, :n] = torch.tensor(convs[i][1])
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def tunelab_batch(convs, idx, block: int, pad_id: int, device: str) -> dict:
    """tunelab's own packing and collation (CausalLMTask.collate reads only the pad id of a tokenizer)."""
    task = CausalLMTask(SimpleNamespace(pad_token_id=pad_id), block)
    enc = pack_bins([(convs[i][0], shift_targets(convs[i][0], convs[i][1])) for i in idx], block)
    return {k: v.to(device) for k, v in task.collate(enc, list(range(len(enc)))).items()}


def build(shape: dict, method: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32,
                                                 lora_dropout=0.0, target_modules="all-linear"))
    return model, n_params


def run_arm(arm: str, shape: dict, method: str, convs, steps, block: int, device: str, warmup: int) -> dict:
    model, n_params = build(shape, method, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens, elapsed, losses = 0, 0.0, []
    try:
        for s, idx in enumerate(steps):
            if s == warmup and device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
                if arm == "hf":
                    loss = model(**hf_batch(convs, idx, 0, device), use_cache=False).loss
                else:
                    batch = tunelab_batch(convs, idx, block, 0, device)
                    loss = chunked_lm_loss_sum(model, batch) / (batch["targets"] != IGNORE).sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # also synchronises
            if s >= warmup:
                elapsed += time.perf_counter() - t
                tokens += sum(len(convs[i][0]) for i in idx)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        del model, opt
    rate = tokens / elapsed
    k = 4 if method == "lora" else 6
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": rate, "model_flops_per_s": k * n_params * rate, "params": n_params,
            "peak_mem_gib": peak_mem, "measured_steps": len(steps) - warmup, "tokens": tokens,
            "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device (checks the script)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens-per-step", type=int, default=None, help="default: per shape (TOKENS_PER_STEP)")
    ap.add_argument("--block", type=int, default=2048)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = {"smoke": SMOKE} if args.smoke else SHAPES
    if args.smoke:
        args.block, args.steps = 256, 3
    peak = bf16_peak(device)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} · torch {torch.__version__} · "
          f"measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", flush=True)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "bf16_peak_tflops": peak / 1e12, "block": args.block,
               "runs": []}
    for name, shape in shapes.items():
        convs = conversations(4000, shape["vocab_size"], args.block)
        per_step = args.tokens_per_step or TOKENS_PER_STEP[name]
        steps = steps_of(convs, per_step)[:args.steps + args.warmup]
        for method in ("lora", "full"):
            row = {"shape": name, "method": method, "tokens_per_step": per_step}
            for arm in ("hf", "tunelab"):
                row[arm] = run_arm(arm, shape, method, convs, steps, args.block, device, args.warmup)
                r = row[arm]
                if "error" in r:
                    print(f"{name:13s} {method:4s} {arm:7s} {r['error']}", flush=True)
                    continue
                r["mfu"] = r["model_flops_per_s"] / peak
                print(f"{name:13s} {method:4s} {arm:7s} {r['tokens_per_s']:10,.0f} tok/s · MFU {100 * r['mfu']:5.1f}% "
                      f"· peak {r['peak_mem_gib']:6.1f} GiB · loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}",
                      flush=True)
            if "error" not in row["hf"] and "error" not in row["tunelab"]:
                row["speedup"] = row["tunelab"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
                row["memory_ratio"] = row["tunelab"]["peak_mem_gib"] / row["hf"]["peak_mem_gib"]
                print(f"{'':13s} {method:4s} tunelab/hf: {row['speedup']:.2f}x tokens/s, "
                      f"{row['memory_ratio']:.2f}x peak memory", flush=True)
            results["runs"].append(row)
    if args.smoke:
        return
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parents[1] / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "train_throughput.json" if os.environ.get("OUT") else "gpu_train_throughput.json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
