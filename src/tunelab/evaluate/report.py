"""`tunelab eval`: the fine-tuned model and the baselines on the same split, in one report.

The JSON report has top-level `accuracy`, `macro_f1`, `macro_recall`, `per_class`, `confusion_matrix`,
`ece` (the fine-tuned model) and `baselines` (name -> the same metrics); a confusion-matrix PNG is
written beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab.data.prepare import load_meta, load_split
from tunelab.errors import UserError
from tunelab.evaluate import baselines as bl
from tunelab.evaluate.metrics import classification_metrics
from tunelab.evaluate.plots import confusion_matrix_png
from tunelab.models import load_model_dir
from tunelab.tasks.classification import ClassificationTask, softmax

BASELINES = ("tfidf", "zero_shot")


def evaluate(model_dir: str | Path, data_dir: str | Path | None = None, split: str = "test",
             out: str | Path | None = None, baselines: tuple[str, ...] | list[str] = BASELINES,
             zero_shot_model: str = "builtin:smollm2-135m-instruct", zero_shot_samples: int | None = 300,
             batch_size: int = 128, seed: int = 0) -> dict:
    """Evaluate a classification model dir on `split` of `data_dir` (default: the data it was trained on)."""
    model, tok, meta = load_model_dir(model_dir, tasks=("classification",))
    data_dir = Path(data_dir or meta["data"]["dir"])
    data_meta = load_meta(data_dir)
    rows = load_split(data_dir, split)
    if not rows:
        raise UserError(f"split '{split}' of {data_dir} is empty")
    labels = meta["labels"]
    task = ClassificationTask(tok, labels, meta.get("max_length", 512))
    enc = task.encode(rows)
    logits = task.logits(model, enc, batch_size)
    probs = softmax(logits)
    report = classification_metrics(enc.labels, logits.argmax(-1), labels, probs)
    report.update(model={"dir": str(model_dir), "base": meta["base"]["ref"], "method": meta["method"]["name"],
                         "train_examples": meta["data"]["train_examples"]},
                  data={"dir": str(data_dir), "split": split, "fingerprint": data_meta["fingerprint"],
                        "same_data_as_training": data_meta["fingerprint"] == meta["data"]["fingerprint"]})
    report["baselines"] = {}
    if "tfidf" in baselines:
        report["baselines"]["tfidf_logreg"] = bl.tfidf_logreg(load_split(data_dir, "train"), rows, labels, seed)
    if "zero_shot" in baselines:
        report["baselines"]["zero_shot"] = bl.zero_shot(zero_shot_model, rows, labels, zero_shot_samples, seed)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        png = out.with_suffix(".confusion.png")
        confusion_matrix_png(report["confusion_matrix"]["matrix"], labels, png,
                             f"{meta['base']['ref']} ({meta['method']['name']}) — {split}")
        report["confusion_matrix_png"] = str(png)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def print_report(report: dict, console: Console | None = None) -> None:
    """The before/after table: baselines first, the fine-tuned model last; then per-class scores."""
    console = console or Console()
    data = report["data"]
    t = Table(title=f"{data['split']} split of {data['dir']}")
    for col in ("model", "train rows", "test rows", "accuracy", "macro-F1", "recall", "ECE"):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=col != "model",
                     min_width=20 if col == "model" else None)

    def add(name: str, train_rows, m: dict, style: str = "") -> None:
        rows = str(m["n"]) + (f" of {m['population']}" if m.get("population", m["n"]) != m["n"] else "")
        t.add_row(name, str(train_rows), rows, f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}",
                  f"{m['macro_recall']:.4f}", f"{m['ece']:.4f}", style=style)

    b = report["baselines"]
    if "zero_shot" in b:
        add(b["zero_shot"]["name"], 0, b["zero_shot"])
    if "tfidf_logreg" in b:
        add("TF-IDF + LR", b["tfidf_logreg"]["train_examples"], b["tfidf_logreg"])
    model = report["model"]
    add(f"fine-tuned {model['base'].removeprefix('builtin:')} ({model['method']})", model["train_examples"],
        report, style="bold green")
    console.print(t)
    pc = Table(title="fine-tuned model, per class")
    for col in ("label", "precision", "recall", "F1", "support"):
        pc.add_column(col, justify="left" if col == "label" else "right")
    for label, m in report["per_class"].items():
        pc.add_row(label, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    console.print(pc)
    if "tfidf_logreg" in b:
        gain = report["macro_f1"] - b["tfidf_logreg"]["macro_f1"]
        verdict = "[bold green]beats[/]" if gain > 0 else "[bold red]does not beat[/]"
        console.print(f"fine-tuned model {verdict} TF-IDF + LR by {gain:+.4f} macro-F1")
