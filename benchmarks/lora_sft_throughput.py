"""LoRA SFT of SmolLM2-135M-Instruct on the built-in chatterbot conversations, side by side:

1. tunelab's `train()`: conversations packed whole into 512-token blocks (no attention across them),
   loss only on assistant tokens through the chunked cross-entropy (no full-vocabulary float32 logits),
   fused AdamW — in fp32 like the anchor, and with its default precision (bf16 autocast where native);
2. Hugging Face `Trainer` + `peft`: the same conversations tokenised with the same chat template and the
   same assistant-only labels, `DataCollatorForSeq2Seq` padding each batch (its usual setup), fp32.

Same LoRA (r=16, alpha=32, every linear layer), learning rate, schedule, one epoch over the same
conversations, and about the same effective batch: Trainer takes 8 conversations per step; tunelab one
512-token block per step, which holds about 8 (the mean conversation is ~60 tokens). Each arm runs in
its own process so its peak RSS is its own. Reported: trained tokens/s (real tokens: the conversations'
tokens, padding excluded; both arms train on exactly the same tokens), peak RSS, and the validation loss
on assistant tokens after the epoch, computed by the same code for both. Writes
benchmarks/results/lora_sft_throughput.json.

    python benchmarks/lora_sft_throughput.py [--conversations 709]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mb, write_result  # noqa: E402

BASE = "builtin:smollm2-135m-instruct"
LR, WARMUP, BLOCK, CONVS_PER_STEP, R, ALPHA = 1e-3, 0.05, 512, 8, 16, 32


def real_tokens(rows: list[dict]) -> int:
    from tunelab.models import load_tokenizer
    from tunelab.tasks.sft import encode_conversation

    tok = load_tokenizer(BASE)
    return sum(len(encode_conversation(tok, r["messages"])[0][:BLOCK]) for r in rows)


def validation_loss(model, tok, rows: list[dict]) -> float:
    from tunelab.tasks.sft import SFTTask

    task = SFTTask(tok, BLOCK)
    return task.evaluate(model, task.encode(rows), 8)["loss"]


def arm_tunelab(data_dir: str, n: int, precision: str, out: str) -> dict:
    from tunelab.config import validate
    from tunelab.train.loop import train

    cfg = validate({"model": {"base": BASE, "max_length": BLOCK},
                    "data": {"dir": data_dir, "max_train_examples": n},
                    "method": {"name": "lora", "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0,
                                                        "target_modules": "all-linear"}},
                    "train": {"epochs": 1, "batch_size": 1, "lr": LR, "warmup_ratio": WARMUP, "eval_every": 0,
                              "save_every": 10**9, "seed": 0, "precision": precision, "log_every": 10}})
    s = train(cfg, out, show_progress=False)
    return {"train_s": s["train_s"], "steps": s["steps"], "validation_loss": s["validation"]["loss"]}


def arm_trainer(data_dir: str, n: int, out: str) -> dict:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunelab.data.dataset import load_split
    from tunelab.models import load_tokenizer, quiet_transformers, resolve_base
    from tunelab.tasks.sft import encode_conversation
    from tunelab.data.split import seeded_subset

    quiet_transformers()
    tok = load_tokenizer(BASE)
    rows = seeded_subset(load_split(data_dir, "train"), n, 0)
    features = []
    for r in rows:
        ids, labels = encode_conversation(tok, r["messages"])
        features.append({"input_ids": ids[:BLOCK], "attention_mask": [1] * len(ids[:BLOCK]),
                         "labels": labels[:BLOCK]})
    model = AutoModelForCausalLM.from_pretrained(resolve_base(BASE).path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear"))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=CONVS_PER_STEP, num_train_epochs=1,
                             learning_rate=LR, warmup_steps=round(WARMUP * math.ceil(len(features) / CONVS_PER_STEP)),
                             lr_scheduler_type="linear", weight_decay=0.01,
                             logging_steps=10, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=features,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    val = load_split(data_dir, "validation")
    return {"train_s": train_s, "steps": result.global_step, "validation_loss": validation_loss(model, tok, val)}


def child(args) -> None:
    import torch

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        if args.arm == "trainer":
            res = arm_trainer(args.data, args.conversations, tmp)
        else:
            res = arm_tunelab(args.data, args.conversations, args.arm.removeprefix("tunelab-"), tmp + "/run")
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=709)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        return child(args)

    from tunelab.config import PrepareOptions
    from tunelab.data.dataset import load_split
    from tunelab.data.prepare import prepare
    from tunelab.data.split import seeded_subset

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat"
        prepare("builtin:chatterbot", data, PrepareOptions(task="sft", max_drop_rate=0.6))
        rows = seeded_subset(load_split(data, "train"), args.conversations, 0)
        tokens = real_tokens(rows)
        arms = {}
        for arm in ("trainer", "tunelab-fp32", "tunelab-auto"):
            cmd = [sys.executable, __file__, "--arm", arm, "--data", str(data),
                   "--conversations", str(args.conversations)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[-1][7:])
            res["tokens_per_s"] = tokens / res["train_s"]
            arms[arm] = res
            print(f"{arm:14s} {res['tokens_per_s']:8.1f} tokens/s · peak RSS {res['peak_rss_mb']:7.0f} MB · "
                  f"{res['steps']} steps · validation loss {res['validation_loss']:.4f}", flush=True)
    ref = arms["trainer"]
    ratios = {arm: {"tokens_per_s": r["tokens_per_s"] / ref["tokens_per_s"],
                    "peak_rss": r["peak_rss_mb"] / ref["peak_rss_mb"]} for arm, r in arms.items() if arm != "trainer"}
    for arm, r in ratios.items():
        print(f"{arm}: {r['tokens_per_s']:.2f}x Trainer tokens/s, {r['peak_rss']:.2f}x its peak RSS")
    path = write_result("lora_sft_throughput", {
        "setup": {"model": BASE, "lora": {"r": R, "alpha": ALPHA, "target_modules": "all-linear"},
                  "conversations": len(rows), "real_tokens": tokens, "lr": LR, "epochs": 1,
                  "trainer_batch": CONVS_PER_STEP, "tunelab_block": BLOCK},
        "arms": arms, "ratios_vs_trainer": ratios,
        "targets": {"tokens_per_s": ">= 1.5x", "peak_rss": "<= 0.8x"}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
