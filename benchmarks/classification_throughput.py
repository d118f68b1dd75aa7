"""Training examples/s of MiniLM-L6 on the same 2,048 tweets, batch 32, side by side in one run:

1. tunelab's `train()` (dynamic padding + length-grouped batches, fused AdamW), with its default
   precision (`auto`: bf16 autocast on CPUs with native bf16) and again forced to fp32 like the anchors;
2. the widely copied tutorial recipe: every batch padded to max_length=128, a plain PyTorch loop;
3. Hugging Face `Trainer` with `DataCollatorWithPadding` (its usual settings).

Each trains the same epochs with the same learning rate and schedule from the same pretrained weights;
each model is then scored on the same 1,000 test tweets (macro-F1) by the same code. Writes
benchmarks/results/classification_throughput.json.

    python benchmarks/classification_throughput.py [--examples 2048] [--epochs 2]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

from tunelab.config import validate  # noqa: E402
from tunelab.config import PrepareOptions  # noqa: E402
from tunelab.data.dataset import load_split  # noqa: E402
from tunelab.data.prepare import prepare  # noqa: E402
from tunelab.evaluate.metrics import classification_metrics  # noqa: E402
from tunelab.models import load_classifier, quiet_transformers  # noqa: E402
from tunelab.tasks.classification import ClassificationTask  # noqa: E402
from tunelab.train.loop import train  # noqa: E402

BASE = "builtin:minilm-l6"
LR, BATCH, WARMUP = 5e-5, 32, 0.06


def macro_f1(model, tok, labels, test_rows) -> float:
    task = ClassificationTask(tok, labels, 128)
    enc = task.encode(test_rows)
    return classification_metrics(enc.labels, task.logits(model, enc).argmax(-1), labels)["macro_f1"]


def run_tunelab(data_dir: Path, n: int, epochs: int, out: Path, precision: str) -> dict:
    cfg = validate({"model": {"base": BASE, "max_length": 128},
                    "data": {"dir": str(data_dir), "max_train_examples": n, "max_eval_examples": 64},
                    "train": {"epochs": epochs, "batch_size": BATCH, "lr": LR, "warmup_ratio": WARMUP,
                              "eval_every": 0, "save_every": 10**9, "seed": 0,
                              "precision": precision}})
    summary = train(cfg, out, show_progress=False)
    from tunelab.models import load_model_dir

    model, tok, meta = load_model_dir(summary["model_dir"])
    return {"train_s": summary["train_s"], "examples_per_s": summary["examples_per_s"],
            "precision": meta["precision"], "model": model, "tok": tok}


def run_tutorial(rows: list[dict], labels: list[str], epochs: int) -> dict:
    """The tutorial loop: tokenize with padding='max_length' (128), DataLoader, AdamW, linear schedule."""
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model, tok, _, _ = load_classifier(BASE, labels)
    enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=128,
              return_tensors="pt")
    y = torch.tensor([labels.index(r["label"]) for r in rows])
    loader = DataLoader(TensorDataset(enc["input_ids"], enc["attention_mask"], y), batch_size=BATCH, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    total = epochs * len(loader)
    sched = get_linear_schedule_with_warmup(opt, round(WARMUP * total), total)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for ids, mask, labels_b in loader:
            out = model(input_ids=ids, attention_mask=mask, labels=labels_b)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    dt = time.perf_counter() - t0
    return {"train_s": dt, "examples_per_s": epochs * len(rows) / dt, "precision": "fp32", "model": model.eval(),
            "tok": tok}


def run_trainer(rows: list[dict], labels: list[str], epochs: int, out: Path) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    torch.manual_seed(0)
    model, tok, _, _ = load_classifier(BASE, labels)
    ds = Dataset.from_dict({"text": [r["text"] for r in rows], "label": [labels.index(r["label"]) for r in rows]})
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=128), batched=True,
                remove_columns=["text"])
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=epochs,
                             learning_rate=LR, weight_decay=0.01, lr_scheduler_type="linear",
                             warmup_steps=round(WARMUP * epochs * math.ceil(len(rows) / BATCH)),
                             save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10**6,
                             seed=0, disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    trainer.train()
    dt = time.perf_counter() - t0
    return {"train_s": dt, "examples_per_s": epochs * len(rows) / dt, "precision": "fp32", "model": model.eval(),
            "tok": tok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--only", nargs="*", default=["tunelab", "tunelab_fp32", "tutorial", "trainer"])
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    data_dir = tmp / "tweets"
    prepare("builtin:tweets-sentiment", data_dir, PrepareOptions(seed=0))
    from tunelab.data.split import sample_rows

    train_rows = sample_rows(load_split(data_dir, "train"), args.examples, "label", 0)[0]
    test_rows = load_split(data_dir, "test")[: args.test_rows]
    labels = sorted({r["label"] for r in train_rows})

    runners = {"tunelab": lambda: run_tunelab(data_dir, args.examples, args.epochs, tmp / "tunelab", "auto"),
               "tunelab_fp32": lambda: run_tunelab(data_dir, args.examples, args.epochs, tmp / "tl32", "fp32"),
               "tutorial": lambda: run_tutorial(train_rows, labels, args.epochs),
               "trainer": lambda: run_trainer(train_rows, labels, args.epochs, tmp / "trainer")}
    results = {}
    for name in args.only:
        print(f"== {name}", flush=True)
        r = runners[name]()
        r["macro_f1"] = macro_f1(r.pop("model"), r.pop("tok"), labels, test_rows)
        results[name] = r
        print(f"   {r['examples_per_s']:.1f} examples/s, {r['train_s']:.1f} s, macro-F1 {r['macro_f1']:.4f}",
              flush=True)
    ratios = {}
    for mine in ("tunelab", "tunelab_fp32"):
        for other in ("tutorial", "trainer"):
            if mine in results and other in results:
                ratios[f"{mine}_vs_{other}"] = results[mine]["examples_per_s"] / results[other]["examples_per_s"]
    path = write_result("classification_throughput", {
        "setup": {"model": BASE, "train_examples": args.examples, "epochs": args.epochs, "batch_size": BATCH,
                  "lr": LR, "test_rows": len(test_rows)},
        "results": results, "ratios": ratios,
        "targets": {"tunelab_vs_tutorial": 3.0, "tunelab_vs_trainer": 1.3},
    })
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
