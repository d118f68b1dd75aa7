"""`tunelab quickstart` (what `make demo` runs): built-in tweets -> fine-tuned MiniLM -> report.

By default the fine-tuned model and the TF-IDF baseline train on the same whole train split (one epoch
of MiniLM: ~4 minutes on 2 CPU cores with native bf16); `--train-examples N` fine-tunes on a seeded
subset instead. Both are scored on the same test split.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from tunelab.config import validate
from tunelab.config import PrepareOptions
from tunelab.data.prepare import prepare
from tunelab.data.summary import print_dataset_summary
from tunelab.evaluate.report import evaluate, print_report
from tunelab.train.loop import train


def quickstart_config(data: Path, train_examples: int | None, epochs: float) -> dict:
    return {
        "task": "classification", "name": "quickstart",
        "model": {"base": "builtin:minilm-l6", "max_length": 128},
        "data": {"dir": str(data), "max_train_examples": train_examples, "max_eval_examples": 1000},
        "method": {"name": "full"},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 5e-5, "warmup_ratio": 0.06,
                  "eval_every": 0, "seed": 0},
    }


def run_quickstart(out: Path, data: Path, train_examples: int | None, epochs: float, console: Console) -> dict:
    t0 = time.perf_counter()
    console.rule("1/3 prepare the built-in tweets")
    meta = prepare("builtin:tweets-sentiment", data, PrepareOptions(seed=0))
    print_dataset_summary(meta, data, console)
    n_train = min(train_examples or meta["splits"]["train"], meta["splits"]["train"])
    console.rule(f"2/3 fine-tune builtin:minilm-l6 on {n_train:,} of {meta['splits']['train']:,} train rows")
    cfg = validate(quickstart_config(data, train_examples, epochs))
    summary = train(cfg, out, overwrite=True, console=console, show_progress=console.is_terminal)
    console.rule("3/3 evaluate on the test split against the baselines")
    report = evaluate(summary["model_dir"], data, "test", out / "report.json")
    print_report(report, console)
    model_dir = summary["model_dir"]
    console.print(f"\n[bold]model[/]  {model_dir}\n[bold]report[/] {out / 'report.json'} "
                  f"(+ {report['confusion_matrix_png']})\n"
                  f"[bold]use it[/] tunelab predict {model_dir} \"the flight was late again\" \"great service!\"\n"
                  f"        python: from tunelab.predict import predict_texts; "
                  f"predict_texts('{model_dir}', ['great service!'])\n"
                  f"        API: tunelab serve {model_dir}   (POST /v1/classify; playground at /)\n"
                  f"done in {time.perf_counter() - t0:.0f} s")
    return report
