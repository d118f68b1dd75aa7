"""`tunelab quickstart` (what `make demo` runs): built-in tweets -> fine-tuned MiniLM -> report.

By default the fine-tuned model and the TF-IDF baseline train on the same whole train split (one epoch
of MiniLM: ~4 minutes on 2 CPU cores with native bf16); `--train-examples N` fine-tunes on a seeded
subset instead, and the report adds TF-IDF trained on that same subset. All are scored on the same test
split; a model that scores below a baseline gets a `warning:` line, and a last one with the flags to change.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from tunelab import __version__
from tunelab.config import PrepareOptions, validate
from tunelab.data.dataset import load_meta
from tunelab.data.prepare import prepare
from tunelab.data.summary import print_dataset_summary
from tunelab.evaluate.report import evaluate, print_report
from tunelab.terminal import plain, print_warnings
from tunelab.train.loop import train


SOURCE = "builtin:tweets-sentiment"


def _same_dataset(data: Path, opts: PrepareOptions) -> dict | None:
    """The dataset.json at `data` if it was prepared from the built-in tweets with `opts` by this version."""
    if not (data / "dataset.json").is_file():
        return None
    meta = load_meta(data)
    same = (meta.get("source", {}).get("path") == SOURCE and meta.get("options") == opts.model_dump(mode="json")
            and meta.get("tunelab_version") == __version__)
    return meta if same else None


def quickstart_config(data: Path, train_examples: int | None, epochs: float) -> dict:
    return {
        "task": "classification", "name": "quickstart",
        "model": {"base": "builtin:minilm-l6", "max_length": 128},
        "data": {"dir": str(data), "max_train_examples": train_examples, "max_eval_examples": 1000},
        "method": {"name": "full"},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 5e-5, "warmup_ratio": 0.06,
                  "eval_every": 0, "seed": 0},
    }


def run_quickstart(out: Path, data: Path, train_examples: int | None, epochs: float, console: Console,
                   overwrite: bool = False) -> dict:
    """Prepare (or reuse, when prepared the same way) the tweets at `data`, train into the run dir `out`
    (an earlier quickstart run there is replaced only with `overwrite`), evaluate, print the report."""
    t0 = time.perf_counter()
    console.rule("1/3 prepare the built-in tweets")
    opts = PrepareOptions(seed=0)
    meta = _same_dataset(data, opts)
    if meta is not None:
        console.print(f"using the dataset already prepared at {plain(data)} (same source, options and tunelab version)")
    else:
        meta = prepare(SOURCE, data, opts, overwrite=overwrite)
    print_dataset_summary(meta, data, console)
    n_train = min(train_examples or meta["splits"]["train"], meta["splits"]["train"])
    console.rule(f"2/3 fine-tune builtin:minilm-l6 on {n_train:,} of {meta['splits']['train']:,} train rows")
    cfg = validate(quickstart_config(data, train_examples, epochs))
    summary = train(cfg, out, overwrite=overwrite, console=console, show_progress=console.is_terminal)
    console.rule("3/3 evaluate on the test split against the baselines")
    report = evaluate(summary["model_dir"], data, "test", out / "report.json", overwrite=True)
    print_report(report, console)
    model_dir = plain(summary["model_dir"])
    console.print(f"\n[bold]model[/]  {model_dir}\n[bold]report[/] {plain(out / 'report.json')} "
                  f"(+ {plain(report['confusion_matrix_png'])})\n"
                  f"[bold]use it[/] tunelab predict {model_dir} \"the flight was late again\" \"great service!\"\n"
                  f"        python: from tunelab.predict import predict_texts; "
                  f"predict_texts('{model_dir}', ['great service!'])\n"
                  f"        API: tunelab serve {model_dir}   (POST /v1/classify; playground at /)\n"
                  f"done in {time.perf_counter() - t0:.0f} s")
    if report["warnings"]:  # last, where it is read: the model above is not one to use yet
        tries = [f"--epochs {max(2, round(2 * epochs))}"]
        if n_train < meta["splits"]["train"]:
            tries.insert(0, f"--train-examples above {n_train:,} (or without it: all {meta['splits']['train']:,} "
                            "rows)")
        print_warnings([f"this model scores below a baseline (see the warnings above): run the quickstart again "
                        f"with {' or '.join(tries)}, and --overwrite"], console)
    return report
