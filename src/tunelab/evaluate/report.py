"""`tunelab eval`: the fine-tuned model and the baselines (or its base, "before") on the same split.

Every report has `task`, `model` and `data`. Classification: top-level `accuracy`, `macro_f1`,
`macro_recall`, `per_class`, `confusion_matrix`, `ece` and `baselines` (name -> the same metrics), with a
confusion-matrix PNG beside the JSON. Token classification: `entity_f1`, `entity_precision`,
`entity_recall`, `token_accuracy`, `per_type` and the word-lookup baseline. causal_lm / sft: `before`
(the base) and `after` perplexity, sft generation scores, and `forgetting` (see evaluate/language.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab.artifacts import check_file_target, write_file
from tunelab.config import EvalConfig, section
from tunelab.data.prepare import load_meta, load_split
from tunelab.errors import UserError
from tunelab.evaluate import baselines as bl
from tunelab.evaluate.metrics import classification_metrics
from tunelab.evaluate.entities import lookup_baseline
from tunelab.evaluate.language import evaluate_language
from tunelab.evaluate import base_fit
from tunelab.evaluate.leakage import check_leakage, describe, row_text, training_data
from tunelab.evaluate.plots import confusion_matrix_png
from tunelab.models import load_model_dir
from tunelab.tasks import DATASET_TASKS
from tunelab.tasks.classification import ClassificationTask, softmax
from tunelab.tasks.token_classification import TokenClassificationTask

BASELINES = ("tfidf", "zero_shot")


def eval_config_of(meta: dict, overrides: dict | None = None) -> EvalConfig:
    """The `eval` section a model was trained with (its tunelab.json), with `overrides` on top."""
    saved = {k: v for k, v in (meta.get("eval") or {}).items() if k in EvalConfig.model_fields}
    return section(EvalConfig, {**saved, **(overrides or {})}, "eval options")


def evaluate(model_dir: str | Path, data_dir: str | Path | None = None, split: str = "test",
             out: str | Path | None = None, eval_cfg: EvalConfig | None = None, seed: int = 0,
             overwrite: bool = False, overrides: dict | None = None, strict: bool = False) -> dict:
    """Evaluate a model dir on `split` of `data_dir` (default: the data it was trained on).

    `eval_cfg`: the baselines, samples and batch size; by default the `eval` section of the run config the
    model was trained with, with `overrides` (e.g. command-line flags) on top. `out`: the report JSON, with a
    confusion-matrix PNG beside it for classification; an existing file there is replaced only if it is a
    tunelab report and `overwrite`. Every evaluation checks the split for rows of the model's training data
    (`leakage` in the report); `strict` refuses to score when it finds them, or cannot look."""
    png = None
    if out:
        out = Path(out)
        png = out.with_suffix(".confusion.png")
        check_file_target(out, "report", overwrite)  # refused before the work, not after it
        if png.exists() and not _report_names(out, png):
            check_file_target(png, "plot", overwrite)
    model, tok, meta = load_model_dir(model_dir)
    eval_cfg = eval_cfg or eval_config_of(meta, overrides)
    if data_dir is None:
        found, why = training_data(meta)
        if found is None:
            raise UserError(f"{why}; give the data to evaluate on with --data DIR")
        data_dir = found
    data_dir = Path(data_dir)
    data_meta = load_meta(data_dir)
    rows = load_split(data_dir, split)
    if not rows:
        raise UserError(f"split '{split}' of {data_dir} is empty")
    wanted = DATASET_TASKS.get(data_meta.get("task"))
    if wanted != meta["task"]:
        raise UserError(f"{data_dir} holds a '{data_meta.get('task')}' dataset; the model was trained for "
                        f"'{meta['task']}'")
    fit = base_fit.measure(tok, [row_text(r) for r in rows])
    leak = check_leakage(meta, rows)
    if strict and (not leak["checked"] or leak["loud"]):
        raise UserError(f"--strict: {describe(leak, split)}; evaluate on data the model has not seen")
    head = {"kind": "report", "task": meta["task"],
            "model": {"dir": str(model_dir), "base": meta["base"]["ref"], "method": meta["method"]["name"],
                      "train_examples": meta["data"]["train_examples"]},
            "data": {"dir": str(data_dir), "split": split, "fingerprint": data_meta["fingerprint"],
                     "same_data_as_training": data_meta["fingerprint"] == meta["data"]["fingerprint"]},
            "leakage": leak, "base_fit": fit, "eval": eval_cfg.model_dump(mode="json")}
    if meta["task"] == "classification":
        report = _classification(model, tok, meta, rows, data_dir, eval_cfg, seed)
    elif meta["task"] == "token_classification":
        task = TokenClassificationTask(tok, meta["labels"], meta.get("max_length", 512))
        report = task.evaluate(model, task.encode(rows), eval_cfg.batch_size)
        report["n"] = len(rows)
        report["baselines"] = {"lookup": lookup_baseline(load_split(data_dir, "train"), rows)}
    else:
        report = evaluate_language(model, tok, meta, rows, eval_cfg, str(next(model.parameters()).device))
    report = {**head, **report}
    if out:
        if meta["task"] == "classification":
            title = f"{meta['base']['ref']} ({meta['method']['name']}) — {split}"
            write_file(png, lambda p: confusion_matrix_png(report["confusion_matrix"]["matrix"], meta["labels"],
                                                           p, title), "plot", checked=True)
            report["confusion_matrix_png"] = str(png)
        write_file(out, json.dumps(report, indent=2, ensure_ascii=False), "report", checked=True)
    return report


def _report_names(report: Path, png: Path) -> bool:
    """Whether the tunelab report at `report` is the one that wrote `png` (so `png` is tunelab's too)."""
    try:
        obj = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and Path(str(obj.get("confusion_matrix_png", ""))).name == png.name


def _classification(model, tok, meta, rows, data_dir, eval_cfg: EvalConfig, seed) -> dict:
    labels = meta["labels"]
    task = ClassificationTask(tok, labels, meta.get("max_length", 512))
    enc = task.encode(rows)
    logits = task.logits(model, enc, eval_cfg.batch_size)
    report = classification_metrics(enc.labels, logits.argmax(-1), labels, softmax(logits))
    report["baselines"] = {}
    if "tfidf" in eval_cfg.baselines:
        # tuned on the validation split (a train hold-out when that is empty); the evaluated rows take no part
        report["baselines"]["tfidf_logreg"] = bl.tfidf_logreg(load_split(data_dir, "train"), rows, labels, seed,
                                                              validation_rows=load_split(data_dir, "validation"))
    if "zero_shot" in eval_cfg.baselines:
        report["baselines"]["zero_shot"] = bl.zero_shot(eval_cfg.zero_shot_model, rows, labels,
                                                        eval_cfg.zero_shot_samples, seed)
    return report


def print_report(report: dict, console: Console | None = None) -> None:
    """The before/after table of the report's task."""
    console = console or Console()
    {"classification": _print_classification, "token_classification": _print_entities,
     "causal_lm": _print_language, "sft": _print_language}[report["task"]](report, console)
    _print_leakage(report, console)
    if report.get("base_fit") and (warning := base_fit.advice(report["base_fit"], report["model"]["base"])):
        console.print(f"[bold yellow]warning:[/] {warning}")


def _print_leakage(report: dict, console: Console) -> None:
    leak = report.get("leakage")
    if not leak:
        return
    line = describe(leak, report["data"]["split"])
    if leak.get("checked") and leak["loud"]:
        console.print(f"[bold red]WARNING: {line}[/]")
        for ex in (leak["exact_examples"] + [e["b"] for e in leak["near_examples"]])[:3]:
            console.print(f"  [red]seen in training:[/] {ex[:100]}")
    else:
        console.print(line, style="yellow" if not leak.get("checked") else "dim")


def _per_group_table(title: str, key: str, groups: dict) -> Table:
    """Precision / recall / F1 / support per class or entity type."""
    t = Table(title=title)
    for col in (key, "precision", "recall", "F1", "support"):
        t.add_column(col, justify="left" if col == key else "right")
    for name, m in groups.items():
        t.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    return t


def _model_name(report: dict) -> str:
    model = report["model"]
    if model["base"] == "scratch":
        return f"trained from scratch ({model['method']})"
    return f"fine-tuned {model['base'].removeprefix('builtin:')} ({model['method']})"


def _print_entities(report: dict, console: Console) -> None:
    t = Table(title=f"{report['data']['split']} split of {report['data']['dir']}")
    for col in ("model", "train rows", "test rows", "entity P", "entity R", "entity F1", "token acc"):
        t.add_column(col, justify="left" if col == "model" else "right")

    def add(name, m, style=""):
        t.add_row(name, str(m.get("train_examples", "")), str(m["n"]), f"{m['entity_precision']:.4f}",
                  f"{m['entity_recall']:.4f}", f"{m['entity_f1']:.4f}", f"{m['token_accuracy']:.4f}", style=style)

    base = report["baselines"]["lookup"]
    add(base["name"], base)
    add(_model_name(report), {**report, "train_examples": report["model"]["train_examples"]}, "bold green")
    console.print(t)
    console.print(_per_group_table("fine-tuned model, per entity type", "type", report["per_type"]))
    gain = report["entity_f1"] - base["entity_f1"]
    console.print(f"fine-tuned model {'[bold green]beats' if gain > 0 else '[bold red]does not beat'}[/] the "
                  f"word-lookup baseline by {gain:+.4f} entity F1")


def _print_language(report: dict, console: Console) -> None:
    sft = report["task"] == "sft"
    t = Table(title=f"{report['data']['split']} split of {report['data']['dir']}"
              + (" (perplexity on assistant tokens)" if sft else ""))
    cols = ["model", "tokens", "loss", "perplexity"] + (["ROUGE-L", "exact match", "answers"] if sft else [])
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right")

    def add(name, m, style=""):
        cells = [name, f"{m['tokens']:,}", f"{m['loss']:.4f}", f"{m['perplexity']:.2f}"]
        if sft:
            g = m.get("generation")
            cells += [f"{g['rouge_l']:.4f}", f"{g['exact_match']:.4f}", str(g["n"])] if g else ["", "", ""]
        t.add_row(*cells, style=style)

    if "before" in report:
        add(f"base {report['model']['base'].removeprefix('builtin:')} (before)", report["before"])
    add(_model_name(report), report["after"], "bold green")
    console.print(t)
    f = report.get("forgetting")
    if f:
        console.print(f"forgetting probe: perplexity on {f['rows']} rows of {f['general_text']}: "
                      f"{f['perplexity_before']:.2f} before → {f['perplexity_after']:.2f} after "
                      f"({100 * f['change']:+.1f}%)")
    for s in (report["after"].get("generation") or {}).get("samples", []):
        console.print(f"[dim]prompt:[/] {s['prompt']}\n[dim]reference:[/] {s['reference']}\n"
                      f"[dim]answer:[/] {s['answer']}")


def _print_classification(report: dict, console: Console) -> None:
    """The before/after table: baselines first, the fine-tuned model last; then per-class scores."""
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
        add(b["tfidf_logreg"]["name"], b["tfidf_logreg"]["train_examples"], b["tfidf_logreg"])
    add(_model_name(report), report["model"]["train_examples"], report, style="bold green")
    console.print(t)
    console.print(_per_group_table("fine-tuned model, per class", "label", report["per_class"]))
    if "tfidf_logreg" in b:
        gain = report["macro_f1"] - b["tfidf_logreg"]["macro_f1"]
        verdict = "[bold green]beats[/]" if gain > 0 else "[bold red]does not beat[/]"
        console.print(f"fine-tuned model {verdict} {b['tfidf_logreg']['name']} by {gain:+.4f} macro-F1")
