"""`tunelab eval`: the fine-tuned model and the baselines (or its base, "before") on the same split.

Every report has `task`, `model` and `data`. Classification: top-level `accuracy`, `macro_f1`,
`macro_recall`, `per_class`, `confusion_matrix`, `ece` and `baselines` (name -> the same metrics), with a
confusion-matrix PNG beside the JSON, and `train_rows` (how many rows the model and each baseline trained on):
a model trained on a seeded subset of the train split (`data.max_train_examples`) is also compared with
TF-IDF + LR trained on that same subset (`tfidf_logreg_same_rows`). Token classification: `entity_f1`,
`entity_precision`, `entity_recall`, `token_accuracy`, `per_type` and the word-lookup baseline. causal_lm / sft:
`before` (the base) and `after` perplexity, sft generation scores, and `forgetting` (see evaluate/language.py).
masked_lm: the masked tokens' `loss`, `perplexity` and `accuracy` on the split, its masks drawn as validation's
were (fixed, seeded with the run's seed); no baseline: the model is a stage, judged by the runs fine-tuned from it.
retrieval: `mrr@10`, `recall@1/5/10` over the split's distinct queries ranking its distinct passages, beside the
base encoder (before tuning) and BM25 (evaluate/retrieval.py).
Every report has `warnings`: when baselines (or the base model) score better than the fine-tuned model, a
sentence naming each with both scores and what to try; `print_report` prints them as `warning:` lines. With
`eval.bootstrap` resamples (default 1,000), every report also has `statistics`, 95% `intervals` for the model's
(and each baseline's) scores and paired `comparisons` with each baseline or the base (evaluate/significance.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab.artifacts import check_file_target, write_file
from tunelab.config import EvalConfig, section
from tunelab.data.dataset import load_meta, load_split
from tunelab.data.split import seeded_subset
from tunelab.ensemble import Ensemble, is_ensemble
from tunelab.errors import UserError
from tunelab.evaluate import baselines as bl
from tunelab.evaluate.metrics import classification_metrics
from tunelab.evaluate.entities import lookup_baseline
from tunelab.evaluate.language import evaluate_language
from tunelab.evaluate import base_fit
from tunelab.evaluate import significance as sg
from tunelab.evaluate.leakage import check_leakage, describe, row_text, training_data
from tunelab.evaluate.plots import confusion_matrix_png
from tunelab.models import load_model_dir
from tunelab.tasks import task_spec
from tunelab.tasks.classification import ClassificationTask, softmax
from tunelab.tasks.masked_lm import MaskedLMTask
from tunelab.tasks.token_classification import TokenClassificationTask
from tunelab.terminal import make_console, plain, print_warnings

BASELINES = ("tfidf", "zero_shot")
VERDICT_STYLES = {"better": "green", "worse": "red", "no clear difference": "yellow"}  # a paired comparison's


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
    if is_ensemble(model_dir):  # scored like a model; its leakage is the worst of its members'
        model = Ensemble(model_dir)
        tok, meta, leak_metas = model.tokenizer, model.meta, model.member_metas
    else:
        model, tok, meta = load_model_dir(model_dir)
        leak_metas = [meta]
    eval_cfg = eval_cfg or eval_config_of(meta, overrides)
    data_dir, data_meta, rows = _split_rows(meta, data_dir, split)
    fit = base_fit.measure(tok, [row_text(r) for r in rows])
    leak = max((check_leakage(m, rows) for m in leak_metas), key=lambda r: (r["checked"], r.get("contaminated", 0)))
    if strict and (not leak["checked"] or leak["loud"]):
        raise UserError(f"--strict: {describe(leak, split)}; evaluate on data the model has not seen")
    head = {"kind": "report", "task": meta["task"],
            "model": {"dir": str(model_dir), "base": meta["base"]["ref"], "method": meta["method"]["name"],
                      "train_examples": meta["data"]["train_examples"]},
            "data": {"dir": str(data_dir), "split": split, "fingerprint": data_meta["fingerprint"],
                     "same_data_as_training": data_meta["fingerprint"] == meta["data"]["fingerprint"]},
            "leakage": leak, "base_fit": fit, "eval": eval_cfg.model_dump(mode="json")}
    spec = task_spec(meta["task"])
    report = {**head, **_scores(spec.report, model, tok, meta, rows, data_dir, eval_cfg, seed,
                                head["data"]["same_data_as_training"])}
    report["warnings"] = below_baseline_warnings(report)
    if out:
        if spec.report == "classes":
            title = f"{meta['base']['ref']} ({meta['method']['name']}) — {split}"
            write_file(png, lambda p: confusion_matrix_png(report["confusion_matrix"]["matrix"], meta["labels"],
                                                           p, title), "plot", checked=True)
            report["confusion_matrix_png"] = str(png)
        write_file(out, json.dumps(report, indent=2, ensure_ascii=False), "report", checked=True)
    return report


def _scores(kind: str, model, tok, meta: dict, rows: list[dict], data_dir: Path, eval_cfg: EvalConfig, seed: int,
            same_data: bool) -> dict:
    """The scores of the report `kind` (the task spec's `report`) of the model on `rows`."""
    if kind == "classes":
        return _classification(model, tok, meta, rows, data_dir, eval_cfg, seed, same_data)
    if kind == "entities":
        if isinstance(model, Ensemble):
            report = model.evaluate(rows, eval_cfg.batch_size, predictions=True)
        else:
            task = TokenClassificationTask(tok, meta["labels"], meta.get("max_length", 512))
            report = task.evaluate(model, task.encode(rows), eval_cfg.batch_size, predictions=True)
        report = {**report, "n": len(rows),
                  "baselines": {"lookup": lookup_baseline(load_split(data_dir, "train"), rows, predictions=True)}}
        _entity_statistics(report, rows, eval_cfg.bootstrap, seed)
        return report
    if kind == "retrieval":
        from tunelab.evaluate.retrieval import retrieval_report  # bm25s (start-up): loaded by this report only

        return retrieval_report(model, tok, meta, rows, eval_cfg, seed)
    if kind == "masked":
        task = MaskedLMTask.from_meta(tok, meta)
        report = {**task.evaluate(model, task.encode(rows), eval_cfg.batch_size, eval_cfg.bootstrap > 0),
                  "n": len(rows)}
        if blocks := report.pop("blocks", None):
            report["statistics"] = sg.settings(eval_cfg.bootstrap, seed, "row")
            report["intervals"] = {"perplexity": sg.perplexity_interval(blocks, eval_cfg.bootstrap, seed)}
        return report
    return evaluate_language(model, tok, meta, rows, eval_cfg, str(next(model.parameters()).device), seed)


def _split_rows(meta: dict, data_dir: str | Path | None, split: str) -> tuple[Path, dict, list[dict]]:
    """The dataset to evaluate on (default: the one the model was trained on), its meta and the split's rows;
    an empty split or a dataset of another task is a `UserError`."""
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
    if task_spec(meta["task"]).dataset != data_meta.get("task"):
        raise UserError(f"{data_dir} holds a '{data_meta.get('task')}' dataset; the model was trained for "
                        f"'{meta['task']}'")
    return data_dir, data_meta, rows


def _report_names(report: Path, png: Path) -> bool:
    """Whether the tunelab report at `report` is the one that wrote `png` (so `png` is tunelab's too)."""
    try:
        obj = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and Path(str(obj.get("confusion_matrix_png", ""))).name == png.name


def model_train_subset(meta: dict, train_rows: list[dict]) -> list[dict] | None:
    """The rows of `train_rows` (the train split the model was trained on) that the model saw, when it trained
    on a seeded subset (`data.max_train_examples`); None when it saw all of them or the subset can't be rebuilt
    (no seed recorded). Rebuilt with `seeded_subset`, as training drew it: the same rows, the same seed."""
    data, seed = meta["data"], meta.get("seed")
    n = data.get("max_train_examples") or data["train_examples"]
    if seed is None or data["train_examples"] >= len(train_rows):
        return None
    subset = seeded_subset(train_rows, n, seed, "label")
    return subset if len(subset) == data["train_examples"] else None


def _classification(model, tok, meta, rows, data_dir, eval_cfg: EvalConfig, seed, same_data: bool) -> dict:
    labels = meta["labels"]
    if isinstance(model, Ensemble):
        report = model.evaluate(rows, eval_cfg.batch_size, predictions=True)
    else:
        task = ClassificationTask(tok, labels, meta.get("max_length", 512))
        enc = task.encode(rows)
        logits = task.logits(model, enc, eval_cfg.batch_size)
        report = classification_metrics(enc.labels, logits.argmax(-1), labels, softmax(logits))
        report["predictions"] = logits.argmax(-1).tolist()
    report["baselines"] = {}
    train_rows = load_split(data_dir, "train")
    subset = model_train_subset(meta, train_rows) if same_data else None
    if "tfidf" in eval_cfg.baselines:
        # tuned on the validation split (a train hold-out when that is empty); the evaluated rows take no part
        validation = load_split(data_dir, "validation")
        report["baselines"]["tfidf_logreg"] = bl.tfidf_logreg(train_rows, rows, labels, seed,
                                                              validation_rows=validation, predictions=True)
        if subset is not None:  # the rows the model saw: separates what the extra rows are worth from the method
            same = bl.tfidf_logreg(subset, rows, labels, seed, validation_rows=validation, predictions=True)
            same["name"] += f" on the same {len(subset):,} rows"
            same["rows"] = f"the seeded subset the model was trained on (seed {meta['seed']})"
            report["baselines"]["tfidf_logreg_same_rows"] = same
    if "zero_shot" in eval_cfg.baselines:
        report["baselines"]["zero_shot"] = bl.zero_shot(eval_cfg.zero_shot_model, rows, labels,
                                                        eval_cfg.zero_shot_samples, seed, predictions=True)
    if "few_shot" in eval_cfg.baselines:  # the zero-shot's sample (same size and seed): the two share rows
        report["baselines"]["few_shot"] = bl.few_shot(
            eval_cfg.zero_shot_model, train_rows, rows, labels, eval_cfg.few_shot_k, eval_cfg.few_shot_selection,
            eval_cfg.zero_shot_samples, seed, eval_cfg.few_shot_pool, predictions=True)
    _class_statistics(report, rows, labels, eval_cfg.bootstrap, seed)
    n_model = meta["data"]["train_examples"]
    if not same_data:
        seen = "rows of the data it was trained on, not this dataset"
    elif subset is not None:
        seen = f"a seeded subset of the train split, seed {meta['seed']}"
    else:
        seen = "the whole train split" if n_model == len(train_rows) else "a subset of the train split"
    report["train_rows"] = {"model": n_model, "model_rows": seen, "train_split": len(train_rows),
                            "baselines": {k: b["train_examples"] for k, b in report["baselines"].items()
                                          if "train_examples" in b}}
    return report


def _class_statistics(report: dict, rows: list[dict], labels: list[str], resamples: int, seed: int) -> None:
    """Adds the intervals of the model's and each baseline's scores and the paired comparisons of the model with
    each baseline (see evaluate/significance.py), and drops the per-row predictions they are computed from."""
    pred = report.pop("predictions")
    preds = {k: (b.pop("predictions"), b.pop("scored_rows", None)) for k, b in report["baselines"].items()}
    if not resamples:
        return
    label2id = {label: i for i, label in enumerate(labels)}
    y = [label2id[r["label"]] for r in rows]
    report["statistics"] = sg.settings(resamples, seed, "row")
    k_labels = len(labels)
    report["intervals"] = sg.class_intervals(y, pred, resamples, seed, k_labels)
    report["comparisons"] = {}
    for k, (base_pred, base_rows) in preds.items():
        shared = y if base_rows is None else [y[i] for i in base_rows]
        report["baselines"][k]["intervals"] = sg.class_intervals(shared, base_pred, resamples, seed, k_labels)
        report["comparisons"][k] = sg.compare_classes(y, pred, base_pred, base_rows, resamples, seed, k_labels)


def _entity_statistics(report: dict, rows: list[dict], resamples: int, seed: int) -> None:
    """As `_class_statistics`, for NER: entity scores resampled by sentence."""
    pred, base = report.pop("predictions"), report["baselines"]["lookup"]
    base_pred = base.pop("predictions")
    if not resamples:
        return
    gold = [r["tags"] for r in rows]
    counts, base_counts = sg.entity_counts(gold, pred), sg.entity_counts(gold, base_pred)
    report["statistics"] = sg.settings(resamples, seed, "sentence")
    report["intervals"] = sg.entity_intervals(counts, resamples, seed)
    base["intervals"] = sg.entity_intervals(base_counts, resamples, seed)
    report["comparisons"] = {"lookup": sg.compare_entities(counts, base_counts, resamples, seed)}


def _gain(score: float, base: float, higher_is_better: bool = True) -> float:
    """How much better `score` is than `base` (positive: better), rounded to the 4 places reports show."""
    return round(score - base if higher_is_better else base - score, 4)


def below_baseline_warnings(report: dict) -> list[str]:
    """[one sentence] naming each baseline (classification, NER) or the base model (causal_lm, sft: perplexity on
    the split) that scores better than the fine-tuned model, with both scores and what to try; [] when none does."""
    spec = task_spec(report["task"])
    key, metric, higher = spec.score
    if spec.report == "masked":  # a stage: nothing to compare with here (see the module docstring)
        return []
    if spec.report == "language":
        before, after = report.get("before"), report["after"]
        if before is None or _gain(after[key], before[key], higher) >= 0:
            return []
        return [f"the fine-tuned model is worse than its base on this split (perplexity {after[key]:.2f} vs "
                f"{before[key]:.2f} before fine-tuning): don't use it as is; train on more rows or for more "
                "epochs, try a lower learning rate, and compare with the base model's row above"]
    n_model, n_split = report["model"]["train_examples"], (report.get("train_rows") or {}).get("train_split")
    seen = f"{n_model:,} of {n_split:,}" if n_split and n_split > n_model else f"{n_model:,}"
    below = [f"{b['name']} ({report[key]:.4f} vs {b[key]:.4f} {metric})"
             for b in (report.get("baselines") or {}).values() if _gain(report[key], b[key], higher) < 0]
    if not below:
        return []
    which = below[0] if len(below) == 1 else ", ".join(below[:-1]) + " and " + below[-1]
    return [f"the fine-tuned model scores below {which}: don't use it as is; train on more rows (it saw {seen}) or "
            + ("for more epochs, and see the baselines above (one may already be good enough)" if len(below) > 1
               else "for more epochs, and see the baseline above (it may already be good enough)")]


def verdict(score: float, base: float, name: str, metric: str, higher_is_better: bool = True,
            comparison: dict | None = None, unit: str = "rows") -> str:
    """One plain line: "fine-tuned model beats NAME by +0.0400 (0.8100 vs 0.7700 macro-F1)", "... scores
    0.4614 below NAME (0.3100 vs 0.7714 macro-F1)" or "... ties with NAME (0.7700 macro-F1 each)". With a paired
    `comparison` ({difference, interval, verdict, rows}: significance.py) the line states the difference on the
    rows both scored and its interval, and says "beats" or "below" only when the interval excludes zero."""
    if comparison:
        return _paired_verdict(comparison, plain(name), metric, unit)
    gain, name = _gain(score, base, higher_is_better), plain(name)
    if gain > 0:
        return f"fine-tuned model [bold green]beats[/] {name} by {gain:+.4f} ({score:.4f} vs {base:.4f} {metric})"
    if gain < 0:
        return f"fine-tuned model [bold red]scores {-gain:.4f} below[/] {name} ({score:.4f} vs {base:.4f} {metric})"
    return f"fine-tuned model [bold yellow]ties with[/] {name} ({score:.4f} {metric} each)"


def _paired_verdict(c: dict, name: str, metric: str, unit: str) -> str:
    d, (low, high) = c["difference"], c["interval"]
    where = f"95% interval [{low:+.4f}, {high:+.4f}], paired on {c['rows']:,} {unit}"
    if c["verdict"] == "better":
        return f"fine-tuned model [bold green]beats[/] {name} by {d:+.4f} {metric} ({where})"
    if c["verdict"] == "worse":
        return f"fine-tuned model [bold red]scores {abs(d):.4f} {metric} below[/] {name} ({where})"
    return (f"fine-tuned model [bold yellow]shows no clear difference from[/] {name}: {d:+.4f} {metric} ({where}; "
            "it includes zero)")


def _paired(report: dict, key: str, metric: str) -> dict | None:
    """The paired comparison of the model with baseline `key` on `metric`, with its rows; None without one."""
    c = (report.get("comparisons") or {}).get(key)
    return {**c[metric], "rows": c["rows"]} if c and c.get(metric) else None


def _ci(intervals: dict | None, metric: str, digits: int = 4) -> str:
    """An interval as a table cell ("" without one)."""
    if not intervals or not intervals.get(metric):
        return ""
    low, high = intervals[metric]
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def print_report(report: dict, console: Console | None = None) -> None:
    """The before/after table of the report's task."""
    console = console or make_console()
    printers = {"classes": _print_classification, "entities": _print_entities, "language": _print_language,
                "masked": _print_masked, "retrieval": _print_retrieval}
    printers[task_spec(report["task"]).report](report, console)
    _print_leakage(report, console)
    if report.get("base_fit") and (warning := base_fit.advice(report["base_fit"], report["model"]["base"])):
        print_warnings([warning], console)
    print_warnings(report["warnings"] if "warnings" in report else below_baseline_warnings(report), console)


def _print_leakage(report: dict, console: Console) -> None:
    leak = report.get("leakage")
    if not leak:
        return
    line = describe(leak, report["data"]["split"])
    if leak.get("checked") and leak["loud"]:
        console.print(f"[bold red]WARNING: {plain(line)}[/]")
        for ex in (leak["exact_examples"] + [e["b"] for e in leak["near_examples"]])[:3]:
            console.print(f"  [red]seen in training:[/] {plain(ex[:100])}")
    else:
        console.print(line, style="yellow" if not leak.get("checked") else "dim", markup=False, soft_wrap=True)


def _per_group_table(title: str, key: str, groups: dict) -> Table:
    """Precision / recall / F1 / support per class or entity type."""
    t = Table(title=title)
    for col in (key, "precision", "recall", "F1", "support"):
        t.add_column(col, justify="left" if col == key else "right")
    for name, m in groups.items():
        t.add_row(plain(name), f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    return t


def _model_name(report: dict) -> str:
    model = report["model"]
    if model["base"] == "scratch":
        return f"trained from scratch ({model['method']})"
    return plain(f"fine-tuned {model['base'].removeprefix('builtin:')} ({model['method']})")


def _print_entities(report: dict, console: Console) -> None:
    t = Table(title=f"{plain(report['data']['split'])} split of {plain(report['data']['dir'])}")
    ci = "intervals" in report
    for col in ("model", "train rows", "test rows", "entity P", "entity R", "entity F1") + (
            ("entity F1 95% CI",) if ci else ()) + ("token acc",):
        t.add_column(col, justify="left" if col == "model" else "right")

    def add(name, m, style=""):
        t.add_row(name, str(m.get("train_examples", "")), str(m["n"]), f"{m['entity_precision']:.4f}",
                  f"{m['entity_recall']:.4f}", f"{m['entity_f1']:.4f}",
                  *([_ci(m.get("intervals"), "entity_f1")] if ci else []), f"{m['token_accuracy']:.4f}", style=style)

    base = report["baselines"]["lookup"]
    add(plain(base["name"]), base)
    add(_model_name(report), {**report, "train_examples": report["model"]["train_examples"]}, "bold green")
    console.print(t)
    console.print(_per_group_table("fine-tuned model, per entity type", "type", report["per_type"]))
    console.print(verdict(report["entity_f1"], base["entity_f1"], "the word-lookup baseline", "entity F1",
                          comparison=_paired(report, "lookup", "entity_f1"), unit="sentences"),
                  soft_wrap=True, highlight=False)


def _print_language(report: dict, console: Console) -> None:
    sft = task_spec(report["task"]).conversations
    t = Table(title=f"{plain(report['data']['split'])} split of {plain(report['data']['dir'])}"
              + (" (perplexity on assistant tokens)" if sft else ""))
    ci = "intervals" in report["after"]
    cols = ["model", "tokens", "loss", "perplexity"] + (["perplexity 95% CI"] if ci else []) + (
        ["ROUGE-L", "exact match", "answers"] if sft else [])
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right")

    def add(name, m, style=""):
        cells = [name, f"{m['tokens']:,}", f"{m['loss']:.4f}", f"{m['perplexity']:.2f}"]
        cells += [_ci(m.get("intervals"), "perplexity", 2)] if ci else []
        if sft:
            g = m.get("generation")
            cells += [f"{g['rouge_l']:.4f}", f"{g['exact_match']:.4f}", str(g["n"])] if g else ["", "", ""]
        t.add_row(*cells, style=style)

    if "before" in report:
        add(plain(f"base {report['model']['base'].removeprefix('builtin:')} (before)"), report["before"])
    add(_model_name(report), report["after"], "bold green")
    console.print(t)
    for metric, name, unit in (("perplexity", "perplexity", "blocks"), ("rouge_l", "ROUGE-L", "answers")):
        if c := _paired(report, "before", metric):
            (low, high), style = c["interval"], f"bold {VERDICT_STYLES[c['verdict']]}"
            console.print(f"fine-tuned model vs its base, {name} after - before: {c['difference']:+.4f} (95% interval "
                          f"[{low:+.4f}, {high:+.4f}], paired on {c['rows']:,} {unit}): [{style}]{c['verdict']}[/]",
                          soft_wrap=True, highlight=False)
    f = report.get("forgetting")
    if f:
        console.print(f"forgetting probe: perplexity on {f['rows']} rows of {plain(f['general_text'])}: "
                      f"{f['perplexity_before']:.2f} before → {f['perplexity_after']:.2f} after "
                      f"({100 * f['change']:+.1f}%)")
    for s in (report["after"].get("generation") or {}).get("samples", []):
        console.print(f"[dim]prompt:[/] {plain(s['prompt'])}\n[dim]reference:[/] {plain(s['reference'])}\n"
                      f"[dim]answer:[/] {plain(s['answer'])}")


def _print_masked(report: dict, console: Console) -> None:
    """The masked-token scores, and what the model dir is for."""
    t = Table(title=f"{plain(report['data']['split'])} split of {plain(report['data']['dir'])} (masked tokens)")
    ci = "intervals" in report
    for col in ("model", "rows", "masked tokens", "loss", "perplexity") + (("perplexity 95% CI",) if ci else ()) + (
            "accuracy",):
        t.add_column(col, justify="left" if col == "model" else "right")
    t.add_row(_model_name(report).replace("fine-tuned", "continued"), f"{report['n']:,}", f"{report['tokens']:,}",
              f"{report['loss']:.4f}", f"{report['perplexity']:.2f}",
              *([_ci(report["intervals"], "perplexity", 2)] if ci else []), f"{report['accuracy']:.4f}",
              style="bold green")
    console.print(t)
    console.print(f"a masked-LM model dir is a stage: fine-tune it for a task (model.base: "
                  f"{plain(report['model']['dir'])}) and compare that model with one fine-tuned from the base",
                  soft_wrap=True, highlight=False)


def _print_retrieval(report: dict, console: Console) -> None:
    """BM25, the base encoder and the fine-tuned one ranking the split's passages; then a verdict per baseline."""
    t = Table(title=f"{plain(report['data']['split'])} split of {plain(report['data']['dir'])}: "
                    f"{report['n']:,} queries over {report['passages']:,} passages")
    ci = "intervals" in report
    for col in ("model", "MRR@10") + (("MRR@10 95% CI",) if ci else ()) + ("recall@1", "recall@5", "recall@10"):
        t.add_column(col, justify="left" if col == "model" else "right")

    def add(name: str, m: dict, style: str = "") -> None:
        t.add_row(name, f"{m['mrr@10']:.4f}", *([_ci(m.get("intervals"), "mrr@10")] if ci else []),
                  *(f"{m[f'recall@{k}']:.4f}" for k in (1, 5, 10)), style=style)

    b = report["baselines"]
    for k in ("bm25", "base"):
        add(plain(b[k]["name"]), b[k])
    add(_model_name(report), report, "bold green")
    console.print(t)
    for k in ("bm25", "base"):
        console.print(verdict(report["mrr@10"], b[k]["mrr@10"], b[k]["name"], "MRR@10",
                              comparison=_paired(report, k, "mrr@10"), unit="queries"), soft_wrap=True,
                      highlight=False)


def _print_classification(report: dict, console: Console) -> None:
    """The before/after table: baselines first, the fine-tuned model last; then per-class scores."""
    data = report["data"]
    t = Table(title=f"{plain(data['split'])} split of {plain(data['dir'])}")
    ci = "intervals" in report  # then the interval takes the place of macro recall (in the JSON and per class)
    for col in ("model", "train rows", "test rows", "accuracy", "macro-F1") + (
            ("macro-F1 95% CI",) if ci else ("recall",)) + ("ECE",):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=col != "model",
                     min_width=20 if col == "model" else None)

    def add(name: str, train_rows, m: dict, style: str = "") -> None:
        rows = str(m["n"]) + (f" of {m['population']}" if m.get("population", m["n"]) != m["n"] else "")
        t.add_row(name, str(train_rows), rows, f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}",
                  _ci(m.get("intervals"), "macro_f1") if ci else f"{m['macro_recall']:.4f}", f"{m['ece']:.4f}",
                  style=style)

    b = report["baselines"]
    shown = [k for k in ("zero_shot", "few_shot", "tfidf_logreg", "tfidf_logreg_same_rows") if k in b]
    seen = {"zero_shot": lambda m: 0, "few_shot": lambda m: f"{m['k']} of {m['pool']:,}"}
    for k in shown:
        add(plain(b[k]["name"]), seen.get(k, lambda m: m["train_examples"])(b[k]), b[k])
    add(_model_name(report), report["model"]["train_examples"], report, style="bold green")
    console.print(t)
    console.print(_per_group_table("fine-tuned model, per class", "label", report["per_class"]))
    _print_train_rows(report, console)
    _print_comparisons(report, shown, console)
    for k in shown:
        console.print(verdict(report["macro_f1"], b[k]["macro_f1"], b[k]["name"], "macro-F1",
                              comparison=_paired(report, k, "macro_f1")), soft_wrap=True, highlight=False)


def _print_comparisons(report: dict, shown: list[str], console: Console) -> None:
    """The paired differences of the model and each baseline, on the rows both scored."""
    comparisons = report.get("comparisons") or {}
    if not any(k in comparisons for k in shown):
        return
    t = Table(title="fine-tuned model minus each baseline, paired on the rows both scored (95% bootstrap intervals)")
    for col in ("baseline", "rows", "Δ macro-F1 [interval]", "Δ accuracy", "McNemar p", "verdict (macro-F1)"):
        t.add_column(col, justify="left" if col in ("baseline", "verdict (macro-F1)") else "right")
    for k in shown:
        if (c := comparisons.get(k)) is None:
            continue
        f1 = c["macro_f1"]
        t.add_row(plain(report["baselines"][k]["name"]), f"{c['rows']:,}",
                  "{:+.4f} [{:+.3f}, {:+.3f}]".format(f1["difference"], *f1["interval"]),
                  f"{c['accuracy']['difference']:+.4f}", f"{c['mcnemar']['p_value']:.2g}",
                  f"[{VERDICT_STYLES[f1['verdict']]}]{f1['verdict']}[/]")
    console.print(t)


def _print_train_rows(report: dict, console: Console) -> None:
    """When the model and TF-IDF + LR trained on different numbers of rows, say so in words (the table's
    column is easy to miss): how many each saw, and which rows."""
    rows, b = report.get("train_rows"), report["baselines"]
    if not rows or "tfidf_logreg" not in b or rows["model"] == b["tfidf_logreg"]["train_examples"]:
        return
    line = (f"train rows: the fine-tuned model saw {rows['model']:,} ({rows['model_rows']}); "
            f"{b['tfidf_logreg']['name']} trained on {b['tfidf_logreg']['train_examples']:,} (the whole train split)")
    if "tfidf_logreg_same_rows" in b:
        line += f", and again on the same {rows['model']:,} rows as the model (its own row above)"
    console.print(line, soft_wrap=True, highlight=False, markup=False)
