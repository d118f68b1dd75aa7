"""Command line: one command per stage; each parses, validates and calls a library function.

A `UserError` is printed as one line (`error: ...`) with exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from typer._click import ClickException, Command, exceptions as click_exceptions
from typer.core import TyperOption

from tunelab import __version__
from tunelab.artifacts import check_file_target, write_file
from tunelab.config import (PREPARE_PATH_KEYS, DedupConfig, EvalConfig, PrepareOptions, ServeConfig, apply_overrides,
                            load_config, read_yaml_mapping, resolve_paths, section)
from tunelab.data.summary import print_dataset_summary
from tunelab.errors import UserError
from tunelab.registry.commands import registry_app
from tunelab.monitor.commands import monitor_app
from tunelab.rag.commands import index_app
from tunelab.recommend.commands import recommend_app
from tunelab.terminal import PIPE_WIDTH, make_console, plain

# Each command's stage is imported inside the command: tunelab.data.prepare and tunelab.data.overlap load numpy
# (~0.1 s); tunelab.train.loop, tunelab.evaluate.report, tunelab.predict, tunelab.generate, tunelab.serve.server
# tunelab.quickstart and tunelab.export load torch (and sklearn), 1-3 s. `tunelab --help` loads none of them.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # help text is printed as written (no markup in option help)
                  context_settings={"max_content_width": PIPE_WIDTH,
                                    "terminal_width": None if sys.stdout.isatty() else PIPE_WIDTH})
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, short_help="data prepare | data overlap",
                       help="data prepare: a file into a dataset dir · data overlap: rows of one found in another")
app.add_typer(data_app, name="data")
app.add_typer(registry_app, name="registry")
app.add_typer(monitor_app, name="monitor")
app.add_typer(index_app, name="index")
app.add_typer(recommend_app, name="recommend")
console = make_console()
err_console = make_console(stderr=True)


def _show_version(value: bool) -> None:
    if value:
        print(f"tunelab {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="print the version and exit")):
    """tunelab: prepare data, fine-tune, evaluate against baselines, predict, generate and serve."""


def _opt(cls, field: str, *decls: str, note: str = "", **kw):
    """A flag whose help and default come from the config model's field (the one source of both): the
    flag defaults to None, meaning "not given", and the command falls back to the model's default."""
    f = cls.model_fields[field]
    default = f.default
    shown = "none" if default is None else ", ".join(default) if isinstance(default, list) else default
    text = "; ".join(x for x in (f.description, note) if x)
    return typer.Option(None, *decls, help=f"{text} (default: {shown})".lstrip(), show_default=False, **kw)


OVERWRITE = typer.Option(False, "--overwrite", help="replace what an earlier run of this command wrote there "
                         "(never a file or folder tunelab did not write; the old one is removed only once the new "
                         "one is complete)")


@data_app.command("prepare")
def data_prepare(
    source: str = typer.Argument(..., help="builtin:tweets-sentiment, builtin:chatterbot[/LANGUAGE], a file "
                                 "(.csv .tsv .jsonl .ndjson .json .parquet; .txt paragraphs; .yml/.yaml dialogues; "
                                 ".conll .bio .iob for NER) or a folder (of .txt files, of .yml dialogues, or a saved "
                                 "`datasets` dataset)"),
    out: Path = typer.Option(..., "--out", help="dataset dir to write"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with any prepare options (clean, pii, "
                                          "dedup, ...); flags given here win"),
    task: Optional[str] = _opt(PrepareOptions, "task", "--task"),
    text_column: Optional[str] = typer.Option(None, help="column holding the text (default: text, or the "
                                              "built-in dataset's own)"),
    label_column: Optional[str] = typer.Option(None, help="column holding the label (default: label, or the "
                                               "built-in dataset's own)"),
    seed: Optional[int] = _opt(PrepareOptions, "seed", "--seed", note="seed of the split"),
    val_ratio: Optional[float] = _opt(PrepareOptions, "val_ratio", "--val-ratio"),
    test_ratio: Optional[float] = _opt(PrepareOptions, "test_ratio", "--test-ratio"),
    max_rows: Optional[int] = _opt(PrepareOptions, "max_rows", "--max-rows"),
    split_column: Optional[str] = _opt(PrepareOptions, "split_column", "--split-column"),
    strict: Optional[bool] = typer.Option(None, "--strict", help=PrepareOptions.model_fields["strict"].description),
    max_drop_rate: Optional[float] = _opt(PrepareOptions, "max_drop_rate", "--max-drop-rate"),
    near_threshold: Optional[float] = _opt(DedupConfig, "threshold", "--near-threshold", note="near duplicates"),
    no_near_dedup: bool = typer.Option(False, "--no-near-dedup", help="exact de-duplication only"),
    no_pii: bool = typer.Option(False, "--no-pii", help="do not redact PII"),
    workers: Optional[int] = typer.Option(None, "--workers", help="processes that clean, redact and shingle rows "
                                          "(default: 1 below 16 MB of source, else one per CPU, at most 8)"),
    overwrite: bool = OVERWRITE,
):
    """Read, clean, redact, de-duplicate and split a labelled text file into a dataset dir."""
    from tunelab.data.prepare import prepare

    raw = resolve_paths(read_yaml_mapping(config, "prepare options"), config.resolve().parent,
                        PREPARE_PATH_KEYS) if config else {}
    flags = {"task": task, "text_column": text_column, "label_column": label_column, "seed": seed,
             "val_ratio": val_ratio, "test_ratio": test_ratio, "max_rows": max_rows, "split_column": split_column,
             "strict": strict, "max_drop_rate": max_drop_rate, "dedup.threshold": near_threshold,
             "dedup.near": False if no_near_dedup else None, "pii.enabled": False if no_pii else None}
    apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None])
    opts = section(PrepareOptions, raw, "prepare options")
    meta = prepare(source, out, opts, overwrite=overwrite, workers=workers)
    print_dataset_summary(meta, out, console)


@data_app.command("overlap")
def data_overlap(
    a: str = typer.Argument(..., help="reference: a file, a dataset dir, or DIR:split (e.g. data/tweets:train)"),
    b: str = typer.Argument(..., help="checked: a file, a dataset dir, or DIR:split (e.g. my_test.csv)"),
    text_column: str = typer.Option("text", "--text-column"),
    threshold: Optional[float] = _opt(DedupConfig, "threshold", "--threshold", note="near duplicates"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the report as JSON"),
    overwrite: bool = OVERWRITE,
):
    """Decontamination check: rows of B that occur exactly or nearly in A."""
    from tunelab.data.overlap import load_texts, overlap

    threshold = section(DedupConfig, {"threshold": threshold} if threshold is not None else {}, "options").threshold
    if out:
        check_file_target(out, "overlap", overwrite)
    rep = overlap(load_texts(a, text_column), load_texts(b, text_column), threshold)
    console.print(f"{rep['rows_b']:,} rows of {plain(b)} against {rep['rows_a']:,} rows of {plain(a)}: "
                  f"[bold]{rep['exact']:,} exact[/] and [bold]{rep['near']:,} near[/] duplicates "
                  f"({rep['contaminated_share']:.2%} contaminated, Jaccard >= {threshold})")
    for ex in rep["near_examples"][:5]:
        console.print(f"  near: {plain(repr(ex['b']))}\n     ~ {plain(repr(ex['a']))}", highlight=False)
    if out:
        write_file(out, json.dumps({"kind": "overlap", "a": a, "b": b, **rep}, indent=2, ensure_ascii=False),
                   "overlap", checked=True)


@app.command()
def train(
    config: Optional[str] = typer.Argument(None, help="YAML config (see examples/); relative paths in it are "
                                           "relative to the file; with --resume the run's saved config.yaml"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. train.lr=3e-5 (paths "
                                                    "relative to the current folder)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run dir (default: runs/<config name>)"),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (newest checkpoint in --out) or a "
                                         "checkpoint path; without CONFIG the run's saved config is used"),
    force: bool = typer.Option(False, "--force", help="resume even if the config or data changed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier run in --out"),
):
    """Fine-tune a model; writes the run dir with metrics, checkpoints and model/."""
    from tunelab.train.loop import resume_command, train as run_train

    args = [a for a in [config, *(overrides or [])] if a is not None]
    path, saved = None, False
    if args and not ("=" in args[0] and not Path(args[0]).is_file()):
        path = Path(args.pop(0))
    if path is None:
        if not resume or out is None:
            raise UserError("give a CONFIG file (see examples/), or continue a run with --out RUN_DIR --resume auto")
        path, saved = out / "config.yaml", True
        if not path.is_file():
            raise UserError(f"--resume: {out} is not a tunelab run dir (no config.yaml); give the CONFIG too")
    if path.is_dir():
        hint = f"; to continue the run in it: {resume_command(path)}" if (path / "config.yaml").is_file() else ""
        raise UserError(f"{path} is a folder, not a YAML config file{hint}")
    cfg = load_config(path, args, saved=saved)
    out = out or Path("runs") / (cfg.name or path.stem)
    if cfg.ensemble is not None:  # one member per seed, then the ensemble dir out/model
        from tunelab.train.members import train_ensemble

        summary = train_ensemble(cfg, out, resume=resume, overwrite=overwrite, console=err_console,
                                 show_progress=sys.stderr.isatty())
    else:
        summary = run_train(cfg, out, resume=resume, force=force, overwrite=overwrite, console=err_console,
                            show_progress=sys.stderr.isatty())
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports for the job
        console.print_json(json.dumps(summary))


@app.command("tune")
def tune_cmd(
    config: Path = typer.Argument(..., help="the run config every trial starts from (as for tunelab train)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides of the config, e.g. "
                                                    "data.max_train_examples=2000"),
    space: Path = typer.Option(..., "--space", help="search space YAML: dotted keys -> {low, high, log}, "
                               "{type: int, low, high} or {choices: [...]}"),
    trials: int = typer.Option(..., "--trials", help="trials this invocation adds to the study"),
    out: Optional[Path] = typer.Option(None, "--out", help="the study folder: trials/, study.db, best.yaml, "
                                       "trials.csv, PNGs (default: runs/tune-<study>)"),
    workers: int = typer.Option(1, "--workers", help="parallel worker processes; the cores are split between them"),
    storage: Optional[str] = typer.Option(None, "--storage", help="database URL of the study (default: "
                                          "sqlite:///OUT/study.db); postgresql+psycopg://… for workers on several "
                                          "machines"),
    study: Optional[str] = typer.Option(None, "--study", help="study name (default: the config's name or file "
                                        "name); the same name in the same storage resumes it"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds after which no new trial starts "
                                            "(running trials finish); continue later with the same command"),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe | random | gp"),
    pruner: str = typer.Option("median", "--pruner", help="median | hyperband | none; fed by every validation "
                               "pass (set train.evals_per_epoch to prune within an epoch)"),
    startup_trials: int = typer.Option(10, "--startup-trials", help="random trials before the sampler models the "
                                       "results"),
    pruner_startup: int = typer.Option(3, "--pruner-startup", help="median: completed trials before pruning "
                                       "starts"),
    seed: int = typer.Option(0, "--seed", help="the sampler's seed (each worker and resumption derives its own)"),
    heartbeat: int = typer.Option(10, "--heartbeat", help="seconds between a running trial's heartbeats; a trial "
                                  "silent for three is failed (its worker died)"),
    keep_models: str = typer.Option("best", "--keep-models", help="best: only the best trial keeps its model "
                                    "dir; all: every completed trial"),
    registry: Optional[Path] = typer.Option(None, "--registry", help="register the best model in this registry "
                                            "(also done when TUNELAB_REGISTRY or TUNELAB_REGISTRY_DB is set)"),
    registry_db: Optional[str] = typer.Option(None, "--registry-db", help="the registry's database URL"),
    register_name: Optional[str] = typer.Option(None, "--register-name", help="the registry model line "
                                                "(default: the study name)"),
    force: bool = typer.Option(False, "--force", help="add trials to a study started with another config or "
                               "space"),
):
    """Hyperparameter search: an Optuna study over config keys, trials pruned at each evaluation."""
    from tunelab.tune.search import TuneOptions, slug, tune

    opts = TuneOptions(trials=trials, workers=workers, storage=storage, study=study, timeout=timeout,
                       sampler=sampler, pruner=pruner, startup_trials=startup_trials, pruner_startup=pruner_startup,
                       seed=seed, heartbeat_s=heartbeat, keep_models=keep_models,
                       registry=str(registry) if registry else None, registry_db=registry_db,
                       register_name=register_name, force=force)
    if out is None:
        name = study or slug(read_yaml_mapping(config).get("name") or config.stem)
        out = Path("runs") / f"tune-{name}"
    tune(config, space, out, opts, overrides or [], console=err_console)


@app.command("cv")
def cv_cmd(
    config: Path = typer.Argument(..., help="the run config (as for tunelab train)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. train.epochs=1"),
    folds: int = typer.Option(5, "--folds", help="K: each fold trains on the other K-1 of the train split"),
    out: Optional[Path] = typer.Option(None, "--out", help="the CV folder: folds/, fold-N/ run dirs, cv.json "
                                       "(default: runs/cv-<config name>)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="retrain folds already trained"),
):
    """K-fold cross-validation on the train split (near-duplicate groups kept in one fold): per-fold scores on the
    held-out fold and their mean ± std."""
    from tunelab.train.cv import cross_validate, print_cv

    cfg = load_config(config, overrides or [])
    out = out or Path("runs") / f"cv-{cfg.name or config.stem}"
    summary = cross_validate(cfg, folds, out, overwrite=overwrite, console=err_console,
                             show_progress=sys.stderr.isatty())
    print_cv(summary, console)
    console.print(f"results: {plain(out / 'cv.json')} · the fold models make an ensemble: tunelab ensemble "
                  f"{plain(out)}/fold-*/model --out {plain(out)}-ensemble")


@app.command("update")
def update_cmd(
    model_dir: Path = typer.Argument(..., help="the model dir to update (a tunelab model dir)"),
    data: Path = typer.Option(..., "--data", help="the new dataset dir (prepared, same kind as the old one)"),
    out: Path = typer.Option(..., "--out", help="the update's run dir"),
    replay: Optional[float] = typer.Option(None, "--replay", min=0.0, max=0.99,
                                           help="share of the training rows replayed from the old train split"),
    regularize: Optional[str] = typer.Option(None, "--regularize", help="ewc or l2sp: pull toward the old weights"),
    strength: Optional[float] = typer.Option(None, "--strength", help="λ of --regularize"),
    method: Optional[str] = typer.Option(None, "--method", help="training method (default: the old run's)"),
    min_gain: float = typer.Option(0.01, "--min-gain", help="gate: least gain on the new test split (points; "
                                   "perplexity: relative)"),
    max_drop: float = typer.Option(0.01, "--max-drop", help="gate: most loss on the old test split (points; "
                                   "perplexity: relative)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. train.epochs=1"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier run in --out"),
):
    """Teach a model dir new data (optionally replaying old rows or pulling toward its weights); score old and new
    test splits before and after; exit 3 when the gate fails (the result is recorded either way)."""
    from tunelab.train.update import print_update, update

    record = update(model_dir, data, out, replay=replay or None, regularize=regularize, strength=strength,
                    method=method, overrides=overrides or [], min_gain=min_gain, max_drop=max_drop,
                    overwrite=overwrite, console=err_console, show_progress=sys.stderr.isatty())
    print_update(record, console)
    if not record["gate"]["passed"]:
        raise typer.Exit(3)


@app.command("eval")
def eval_cmd(
    model_dir: Path = typer.Argument(..., help="a model dir written by `tunelab train`"),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset dir (default: the one it was trained on)"),
    split: str = typer.Option("test", "--split"),
    out: Optional[Path] = typer.Option(None, "--out", help="report JSON (a confusion-matrix PNG goes beside it)"),
    overwrite: bool = OVERWRITE,
    baseline: Optional[list[str]] = _opt(EvalConfig, "baselines", "--baseline", note="repeatable"),
    no_baselines: bool = typer.Option(False, "--no-baselines"),
    zero_shot_model: Optional[str] = _opt(EvalConfig, "zero_shot_model", "--zero-shot-model"),
    zero_shot_samples: Optional[int] = _opt(EvalConfig, "zero_shot_samples", "--zero-shot-samples",
                                            note="here 0 = all"),
    generation_samples: Optional[int] = _opt(EvalConfig, "generation_samples", "--generation-samples"),
    max_new_tokens: Optional[int] = _opt(EvalConfig, "max_new_tokens", "--max-new-tokens"),
    general_text: Optional[str] = _opt(EvalConfig, "general_text", "--general-text"),
    general_samples: Optional[int] = _opt(EvalConfig, "general_samples", "--general-samples"),
    batch_size: Optional[int] = _opt(EvalConfig, "batch_size", "--batch-size"),
    few_shot_k: Optional[int] = _opt(EvalConfig, "few_shot_k", "--few-shot-k"),
    few_shot_selection: Optional[str] = _opt(EvalConfig, "few_shot_selection", "--few-shot-selection"),
    bootstrap: Optional[int] = _opt(EvalConfig, "bootstrap", "--bootstrap"),
    strict: bool = typer.Option(False, "--strict", help="refuse to score a split that shares rows with the "
                                "model's training data (1% or more, or any exact duplicate), or when that data "
                                "is gone and cannot be checked"),
):
    """Evaluate on a split next to the cheap baselines (classification: TF-IDF + LR and zero-shot, few-shot with
    --baseline few_shot; NER: word lookup) or, for causal_lm/sft, next to the base model before fine-tuning
    (perplexity, generation scores, forgetting probe), with 95% intervals and paired comparisons. Options not
    given come from the `eval` section of the model's run config."""
    from tunelab.evaluate.report import evaluate, print_report

    flags = {"baselines": [] if no_baselines else baseline, "zero_shot_model": zero_shot_model,
             "zero_shot_samples": zero_shot_samples, "generation_samples": generation_samples,
             "max_new_tokens": max_new_tokens, "general_text": general_text, "general_samples": general_samples,
             "batch_size": batch_size, "bootstrap": bootstrap, "few_shot_k": few_shot_k,
             "few_shot_selection": few_shot_selection}
    overrides = {k: v for k, v in flags.items() if v is not None}
    if zero_shot_samples == 0:
        overrides["zero_shot_samples"] = None  # all rows
    report = evaluate(model_dir, data, split, out, overwrite=overwrite, overrides=overrides, strict=strict)
    print_report(report, console)
    if out:
        png = report.get("confusion_matrix_png")
        console.print(f"report: {plain(out)}" + (f" · confusion matrix: {plain(png)}" if png else ""))


@app.command("eval-rag")
def eval_rag_cmd(
    index: Path = typer.Argument(..., help="an index folder (`tunelab index build`)"),
    questions: Path = typer.Argument(..., help="JSONL: question, in_scope, and for in-scope questions the doc and "
                                     "heading that answer it and a reference answer; optional history"),
    model: Optional[str] = typer.Option(None, "--model", help="a chat model (model dir or base) answering from "
                                        "the passages: adds the answer scores (supported-answer rate, ROUGE-L, the "
                                        "whole assistant's hand-off, latency)"),
    out: Optional[Path] = typer.Option(None, "--out", help="the report JSON (with one row per answered question)"),
    overwrite: bool = OVERWRITE,
    top_k: Optional[int] = _opt(ServeConfig, "rag_top_k", "--top-k", min=1, max=20),
    min_score: Optional[float] = _opt(ServeConfig, "rag_min_score", "--min-score", min=-1.0, max=1.0),
    max_tokens: int = typer.Option(160, "--max-tokens", min=1, help="most new tokens per answer"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="only the first N questions"),
):
    """Score retrieval (MRR@10, recall@1/5/10 for BM25, dense and hybrid), the hand-off on out-of-scope questions
    and, with --model, the answers, on a question set."""
    from tunelab.rag.answer import AnswerSettings, Assistant  # torch, FAISS, bm25s: start-up
    from tunelab.rag.evaluate import evaluate_rag, load_questions
    from tunelab.rag.index import Index

    if out:
        check_file_target(out, "rag-report", overwrite)
    rows = load_questions(questions)[:limit]
    defaults = ServeConfig.model_fields
    settings = AnswerSettings(top_k=defaults["rag_top_k"].default if top_k is None else top_k,
                              min_score=defaults["rag_min_score"].default if min_score is None else min_score)
    assistant = Assistant(Index.load(index), settings)
    answer = None
    if model:
        from tunelab.generate import GenerationParams, generate as run, load_generator

        gen, params = load_generator(model), GenerationParams(max_new_tokens=max_tokens).check()
        answer = lambda messages: run(gen, messages, params, chat=True)["text"]  # noqa: E731
    report = evaluate_rag(assistant, rows, answer)
    _print_rag_report(report)
    if out:
        write_file(out, json.dumps(report, ensure_ascii=False, indent=1), "rag-report", overwrite=True,
                   checked=True)
        console.print(f"report: {plain(out)}")


def _print_rag_report(report: dict) -> None:
    r = report["retrieval"]
    table = Table(title=f"retrieval over {r['questions']} in-scope questions")
    for col in ("mode", "MRR@10", "recall@1", "recall@5", "recall@10", "search p50 ms"):
        table.add_column(col)
    for mode in ("bm25", "dense", "hybrid"):
        m = r[mode]
        table.add_row(mode, f"{m['mrr@10']:.3f}", f"{m['recall@1']:.3f}", f"{m['recall@5']:.3f}",
                      f"{m['recall@10']:.3f}", str(m["search_ms_p50"]))
    console.print(table)
    g = report["handoff_gate"]
    console.print(f"hand-off by the retrieval gate (out of scope = positive): precision {g['precision']:.3f} "
                  f"recall {g['recall']:.3f} F1 {g['f1']:.3f}")
    a = report.get("answers")
    if a:
        h = a["handoff"]
        console.print(f"answers: supported {a['supported_answer_rate']:.3f} of in-scope questions · ROUGE-L "
                      f"{a['rouge_l']:.3f} · hand-off precision {h['precision']:.3f} recall {h['recall']:.3f} F1 "
                      f"{h['f1']:.3f} · answer p50 {a['answer_seconds_p50']} s, p95 {a['answer_seconds_p95']} s")


@app.command("ensemble")
def ensemble_cmd(
    model_dirs: list[Path] = typer.Argument(..., help="two or more model dirs of one task and label set "
                                            "(classification or NER)"),
    out: Path = typer.Option(..., "--out", help="the ensemble dir (predict, eval and serve take it)"),
    combine: str = typer.Option("mean", "--combine", help="mean: average the probabilities; vote: majority of "
                                "the members' labels"),
    weights: Optional[list[float]] = typer.Option(None, "--weight", help="one per model dir, in order "
                                                  "(repeatable; default: equal)"),
    overwrite: bool = OVERWRITE,
):
    """Combine classifiers (or NER models) into one ensemble dir: probability averaging or voting."""
    from tunelab.ensemble import build_ensemble

    record = build_ensemble(model_dirs, out, combine, weights or None, overwrite)
    table = Table("member", "base", "method", "validation")
    for given, m, w in zip(model_dirs, record["members"], record["weights"]):
        score = m["validation"].get("macro_f1", m["validation"].get("entity_f1"))
        table.add_row(plain(str(given)), plain(m["base"]), m["method"] + f" · weight {w:.2f}",
                      "—" if score is None else f"{score:.4f}")
    console.print(table)
    console.print(f"[bold green]saved[/] {plain(out)} · {record['task']} · {len(record['members'])} members · "
                  f"{combine}")


@app.command("compare")
def compare_cmd(
    runs: list[Path] = typer.Argument(..., help="two or more run dirs (from train, tune trials, cv folds) or their "
                                      "model dirs"),
    out: Optional[Path] = typer.Option(None, "--out", help="a folder for compare.json and curves.png (train loss "
                                       "and the validation score of every run, overlaid)"),
    overwrite: bool = OVERWRITE,
):
    """Runs side by side: the config keys that differ, the best validation scores, time and speed, curves."""
    from tunelab.compare import cell, compare_runs

    summary = compare_runs(runs, out, overwrite)
    table = Table("", *(f"{i}. {plain(r['name'])}" for i, r in enumerate(summary["runs"], 1)))
    for key in summary["differing_keys"]:
        table.add_row(plain(key), *(plain(cell(r["differing"][key])) for r in summary["runs"]))
    table.add_section()
    rows = {"validation": lambda r: "-" if r["best"].get(r["metric"]) is None
            else f"{r['best'][r['metric']]:.4f} {r['metric_name']}",
            "best step": lambda r: cell(r["best_step"]), "steps": lambda r: cell(r["steps"]),
            "train time": lambda r: ("-" if r["elapsed_s"] is None else f"{r['elapsed_s'] / 60:.1f} min")
            + ("" if r["finished"] else " (unfinished)"),
            "examples/s": lambda r: cell(r["examples_per_s"])}
    for name, show in rows.items():
        table.add_row(name, *(show(r) for r in summary["runs"]), style="bold" if name == "validation" else "")
    console.print(table)
    n = len(summary["differing_keys"])
    console.print(f"{n} config key{'s differ' if n != 1 else ' differs'} (above), {summary['same_keys']} are the "
                  "same", markup=False, highlight=False)
    for i, r in enumerate(summary["runs"], 1):
        console.print(f"{i}. {r['dir']}", markup=False, highlight=False, soft_wrap=True)
    if out:
        console.print(f"[bold green]saved[/] {plain(out)}: compare.json, curves.png")


@app.command("export")
def export_cmd(
    model_dir: Path = typer.Argument(..., help="a model dir written by `tunelab train`; or a base model as it is "
                                     "(builtin:NAME, an HF dir): an encoder for onnx embeddings, a decoder for gguf"),
    fmt: str = typer.Option(..., "--format", help="hf (a plain Hugging Face folder, adapters merged), onnx "
                               "(encoders: classification, NER, embeddings) or gguf (Llama-family decoders, for "
                               "llama.cpp)"),
    out: Path = typer.Option(..., "--out", help="the export folder to write"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="onnx: int8 (ONNX Runtime dynamic "
                                           "quantisation); gguf: f32, f16 (default), bf16, q8_0, q4_0"),
    parity_rows: int = typer.Option(64, "--parity-rows", help="rows the parity check compares the export and "
                                    "the model on"),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset dir for the parity rows (default: the "
                                        "model's own, test split) and the gguf quantiser's calibration (train split)"),
    overwrite: bool = OVERWRITE,
):
    """Export a model as the file its user deploys, and prove it: the export runs in its own runtime on the
    same rows as the model and must match it (parity.json); when it does not, nothing is written."""
    from tunelab.export import export_model

    record = export_model(model_dir, out, fmt, quantize=quantize, rows=parity_rows,
                          data_dir=str(data) if data else None, overwrite=overwrite)
    table = Table(title=f"parity of the {fmt}{' ' + quantize if quantize else ''} export "
                  f"({record['rows']} rows from {plain(record['rows_from'])})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    for name, value in record["figures"].items():
        side, bound = record["thresholds"].get(name, (None, None))
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(name, shown, f"{'≤' if side == 'max' else '≥'} {bound:g}" if side else "")
    console.print(table)
    console.print(f"export {plain(out)} (parity.json, tunelab.json)")


@app.command()
def compress(
    model_dir: Path = typer.Argument(..., help="a model dir written by `tunelab train`"),
    out: Optional[Path] = typer.Option(None, "--out", help="the model dir to write"),
    report: bool = typer.Option(False, "--report", help="measure instead: MODEL_DIR and each --with (model "
                                "dirs, ONNX exports) on the same test rows: size, latency, throughput, metric"),
    with_: list[Path] = typer.Option([], "--with", help="--report: another model dir or ONNX export to compare"),
    report_rows: int = typer.Option(0, "--rows", help="--report: test rows to measure on (0: all)"),
    report_bf16: bool = typer.Option(False, "--bf16", help="--report: also MODEL_DIR with its weights in bf16 "
                                     "(emulated, and so slow, on CPUs without native bf16)"),
    int8: bool = typer.Option(False, "--int8", help="dynamic int8 quantisation of every linear layer (PyTorch, "
                              "CPU): a smaller model dir that predict, eval and serve load"),
    prune_ffn: Optional[float] = typer.Option(None, "--prune-ffn", help="encoders: the share of each layer's FFN "
                                              "neurons to keep (its most important), e.g. 0.5"),
    layers: Optional[int] = typer.Option(None, "--layers", help="encoders: keep this many layers, evenly spaced"),
    epochs: float = typer.Option(1.0, "--epochs", help="pruning: epochs of the recovery fine-tune"),
    lr: float = typer.Option(5e-5, "--lr", help="pruning: learning rate of the recovery fine-tune"),
    data: Optional[Path] = typer.Option(None, "--data", help="pruning: the training data (default: the model's)"),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="pruning: the recovery fine-tune learns the "
                                 "unpruned model's soft labels too"),
    overwrite: bool = OVERWRITE,
):
    """Make a model smaller and faster for deployment (int8, or pruning with a recovery fine-tune); the result is
    a model dir with its lineage that predict, eval, export and serve take."""
    if report:
        _compression_report([model_dir, *with_], str(data) if data else None, report_rows, report_bf16)
        return
    if out is None:
        raise UserError("--out DIR: where to write the compressed model dir")
    if int8 == (prune_ffn is not None or layers is not None):
        raise UserError("say how to compress: --int8, or --prune-ffn F and/or --layers K (one of the two; "
                        "quantise a pruned model in a second step)")
    if int8:
        from tunelab.export.quantize import compress_int8  # torch.ao and safetensors: this path only

        meta = compress_int8(model_dir, out, overwrite=overwrite)
        size = sum(f["size"] for f in meta["files"].values()) / 2**20
        console.print(f"int8 model {plain(out)}: {meta['compression']['int8']['layers']} linear layers "
                      f"quantised, weights {size:.1f} MB")
        return
    from tunelab.export.prune import compress_prune  # the training loop: this path only

    meta = compress_prune(model_dir, out, ffn_keep=prune_ffn or 1.0, layers=layers, epochs=epochs, lr=lr,
                          data_dir=str(data) if data else None, distill=distill, overwrite=overwrite)
    p = meta["compression"]["prune"]
    val = (meta.get("metrics") or {}).get("validation") or {}
    before = ((meta["parent"].get("metrics") or {}).get("validation") or {})
    scores = [f"{k} {before[k]:.4f} -> {val[k]:.4f}" if k in before else f"{k} {val[k]:.4f}"
              for k in ("macro_f1", "entity_f1") if k in val]
    console.print(f"pruned model {plain(out)}: layers {p['layers_kept']} of {p['layers_of']}, FFN width "
                  f"{p['ffn_width']} of {p['ffn_width_of']}, recovered {epochs:g} epoch(s)"
                  + (f" · validation {', '.join(scores)}" if scores else ""))


def _compression_report(items: list[Path], data: str | None, rows: int, bf16: bool) -> None:
    from tunelab.export.report import compression_report  # ONNX Runtime and the models: this path only

    result = compression_report(items, data, rows, bf16)
    table = Table(title=f"compression report ({result['rows']:,} test rows, {result['threads']} threads)")
    for column in ("model", "runtime", "weights MB", "p50 ms (b1)", "texts/s (b32)", "metric", "Δ"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    for r in result["models"]:
        delta = r.get("delta")
        table.add_row(plain(r["model"]), f"{r['runtime']} {r['precision']}",
                      f"{r['size_mb']:.1f}", f"{r['p50_ms_batch1']:.1f} ({r['speedup_batch1']:.1f}x)",
                      f"{r['texts_per_s_batch32']:.0f} ({r['speedup_batch32']:.1f}x)",
                      f"{r['metric']} {r['value']:.4f}" if r["metric"] else "",
                      "" if delta is None or r is result["models"][0] else f"{delta * 100:+.2f} pt")
    console.print(table)


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="a classification or NER model dir written by `tunelab train`"),
    texts: Optional[list[str]] = typer.Argument(None, help="texts to classify, or to find entities in; - reads "
                                                "standard input (JSON lines, or one text per line)"),
    input: Optional[str] = typer.Option(None, "--input", help="JSONL/CSV/TSV/JSON/Parquet file of texts; - for "
                                        "standard input"),
    out: Optional[Path] = typer.Option(None, "--out", help="predictions JSONL to write (default, or -: "
                                       "standard output)"),
    overwrite: bool = OVERWRITE,
    text_column: str = typer.Option("text", "--text-column"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help="texts given as arguments: JSON lines (as in a "
                                 "predictions file) instead of a table"),
):
    """Labels and per-class probabilities (classifier), or entities with character offsets (NER), for texts or
    a file. Every output has one schema: the row's fields plus `prediction` and `probs`, or `entities`."""
    from tunelab.predict import predict_file, predict_texts

    if texts == ["-"] and input is None:
        texts, input = None, "-"
    if out == Path("-"):
        out = None
    if bool(texts) == bool(input):
        raise UserError("give either texts as arguments or --input FILE (- for standard input)")
    if out is not None and not input:
        raise UserError("--out writes the predictions of --input FILE; texts given as arguments print (--json "
                        "for JSON lines)")
    if input:
        res = predict_file(model_dir, input, out, text_column, batch_size, overwrite=overwrite)
        if out is not None:
            err_console.print(f"wrote {res['predicted']} predictions to {plain(res['out'])}")
        if res["skipped"]:
            err_console.print(f"skipped {len(res['skipped'])} rows without text: " + ", ".join(
                f"line {s['line']} ({s['reason']})" for s in res["skipped"][:10]))
        return
    results = predict_texts(model_dir, texts, batch_size)
    if as_json:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
        return
    console.print(_predictions_table(results))


def _predictions_table(results: list[dict]) -> Table:
    """Texts with their label and per-class probabilities, or with their entities (one row each)."""
    table = Table()
    table.add_column("text")
    if "entities" in results[0]:
        for name in ("type", "entity", "span", "score"):
            table.add_column(name, style="bold" if name == "type" else None,
                             justify="right" if name in ("span", "score") else "left")
        for r in results:
            if not r["entities"]:
                table.add_row(plain(r["text"]), "", "(no entities)", "", "", end_section=True)
            for i, e in enumerate(r["entities"]):
                table.add_row(plain(r["text"]) if i == 0 else "", plain(e["type"]), plain(e["text"]),
                              f"{e['start']}–{e['end']}",
                              f"{e['score']:.3f}", end_section=i == len(r["entities"]) - 1)
        return table
    table.add_column("prediction", style="bold")
    for label in results[0]["probs"]:
        table.add_column(f"p({plain(label)})", justify="right")
    for r in results:
        table.add_row(plain(r["text"]), plain(r["prediction"]), *[f"{p:.3f}" for p in r["probs"].values()])
    return table


def _generation_options(max_tokens: int, temperature: float, top_p: float, top_k: int,
                       repetition_penalty: float, stop: Optional[list[str]], seed: Optional[int]):
    from tunelab.generate import GenerationParams

    return GenerationParams(max_tokens, temperature, top_p, top_k, repetition_penalty, list(stop or []),
                            seed).check()


MAX_TOKENS = typer.Option(256, "--max-tokens", help="most new tokens per answer")
TEMPERATURE = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples")
TOP_P = typer.Option(1.0, "--top-p")
TOP_K = typer.Option(0, "--top-k", help="0 = off")
REPETITION = typer.Option(1.0, "--repetition-penalty")
STOP = typer.Option(None, "--stop", help="stop string (repeatable); the model's own end tokens always stop")
SEED = typer.Option(None, "--seed")


@app.command()
def generate(
    model: str = typer.Argument(..., help="a causal_lm/sft model dir, or a base (builtin:…, a HF dir, .gguf)"),
    prompt: str = typer.Argument(..., help="the prompt"),
    raw: bool = typer.Option(False, "--raw", help="complete the text as is (default: as a chat message when "
                             "the model has a chat template)"),
    max_tokens: int = MAX_TOKENS, temperature: float = TEMPERATURE, top_p: float = TOP_P, top_k: int = TOP_K,
    repetition_penalty: float = REPETITION, stop: Optional[list[str]] = STOP, seed: Optional[int] = SEED,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (text, token counts, reason)"),
):
    """Generate text for one prompt, streamed as it is produced."""
    from tunelab.generate import generate as run, load_generator

    params = _generation_options(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
    gen = load_generator(model)
    chat = gen.has_chat_template and not raw
    if as_json:
        print(json.dumps(run(gen, prompt, params, chat), ensure_ascii=False))
        return
    res = run(gen, prompt, params, chat, on_text=lambda t: print(t, end="", flush=True))
    print()
    err_console.print(f"[dim]{res['prompt_tokens']} prompt + {res['completion_tokens']} generated tokens · "
                      f"finish: {res['finish_reason']}[/]")


@app.command()
def chat(
    model: str = typer.Argument(..., help="a causal_lm/sft model dir, or a base with a chat template"),
    system: Optional[str] = typer.Option(None, "--system", help="a system message"),
    max_tokens: int = MAX_TOKENS, temperature: float = TEMPERATURE, top_p: float = TOP_P, top_k: int = TOP_K,
    repetition_penalty: float = REPETITION, stop: Optional[list[str]] = STOP, seed: Optional[int] = SEED,
):
    """Chat in the terminal; answers stream token by token. Ctrl-C stops an answer; /help lists the commands
    (/reset, /history, /exit); Ctrl-D quits."""
    from tunelab.generate import generate as run, load_generator

    params = _generation_options(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
    gen = load_generator(model)
    if not gen.has_chat_template:
        raise UserError(f"{model} has no chat template; use `tunelab generate --raw`")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err_console.print(f"chatting with {plain(model)} · Ctrl-C stops an answer · /help lists the commands · "
                      "/exit or Ctrl-D quits", highlight=False)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            err_console.print("(/exit or Ctrl-D quits)")
            continue
        if line.startswith("/"):  # a message that starts with a slash: type a space before it
            messages = _chat_command(line.split()[0].lower() if line.split() else "/", messages, start)
            if messages is None:
                return
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        print("model> ", end="", flush=True)
        shown: list[str] = []

        def show(piece: str) -> None:
            shown.append(piece)
            print(piece, end="", flush=True)

        try:
            answer = run(gen, messages, params, chat=True, on_text=show)["text"]
        except KeyboardInterrupt:  # stop this answer, keep the chat; the history keeps what was shown
            answer = "".join(shown)
            print()
            err_console.print("(answer stopped)", end="")
        print()
        messages.append({"role": "assistant", "content": answer.strip()})


def _chat_command(command: str, messages: list[dict], start: list[dict]) -> list[dict] | None:
    """A chat /command -> the history after it, or None to quit."""
    if command in ("/exit", "/quit", "/bye"):
        return None
    if command == "/reset":
        err_console.print("history cleared" + (" (the system message is kept)" if start else ""))
        return list(start)
    if command == "/history":
        turns = sum(m["role"] == "user" for m in messages)
        err_console.print(f"{turns} exchange{'s' if turns != 1 else ''} in the history")
    elif command == "/help":
        err_console.print(CHAT_HELP, highlight=False)
    else:
        err_console.print(f"unknown command {plain(command)}; /help lists the commands (to send a message that "
                          "starts with /, type a space before it)", highlight=False)
    return messages


CHAT_HELP = """/reset    clear the history (a --system message is kept)
/history  how many exchanges the history holds
/help     this list
/exit     quit (also /quit, /bye, Ctrl-D)
Ctrl-C while an answer streams stops it; the chat goes on."""


@app.command()
def serve(
    models: list[str] = typer.Argument(..., help="model dirs, export dirs (ONNX, GGUF), base models (builtin:…, "
                                       "tiny-llama, a dir, a .gguf) or registry:NAME@ALIAS (followed: a promote or "
                                       "rollback swaps the version served); NAME=PATH sets the id clients use"),
    host: Optional[str] = _opt(ServeConfig, "host", "--host"),
    port: Optional[int] = _opt(ServeConfig, "port", "--port"),
    api_keys_file: Optional[Path] = _opt(ServeConfig, "api_keys_file", "--api-keys-file"),
    embedding_model: Optional[str] = _opt(ServeConfig, "embedding_model", "--embedding-model"),
    device: Optional[str] = _opt(ServeConfig, "device", "--device"),
    max_batch: Optional[int] = _opt(ServeConfig, "max_batch", "--max-batch"),
    max_waiting: Optional[int] = _opt(ServeConfig, "max_waiting", "--max-waiting"),
    encoder_batch: Optional[int] = _opt(ServeConfig, "encoder_batch", "--encoder-batch"),
    encoder_wait_ms: Optional[float] = _opt(ServeConfig, "encoder_wait_ms", "--encoder-wait-ms"),
    precision: Optional[str] = _opt(ServeConfig, "precision", "--precision"),
    rate_limit: Optional[float] = _opt(ServeConfig, "rate_limit", "--rate-limit"),
    max_body_bytes: Optional[int] = _opt(ServeConfig, "max_body_bytes", "--max-body-bytes"),
    max_header_bytes: Optional[int] = _opt(ServeConfig, "max_header_bytes", "--max-header-bytes"),
    max_headers: Optional[int] = _opt(ServeConfig, "max_headers", "--max-headers"),
    header_timeout: Optional[float] = _opt(ServeConfig, "header_timeout_s", "--header-timeout"),
    body_timeout: Optional[float] = _opt(ServeConfig, "body_timeout_s", "--body-timeout"),
    max_connections: Optional[int] = _opt(ServeConfig, "max_connections", "--max-connections"),
    drain_timeout: Optional[float] = _opt(ServeConfig, "drain_timeout_s", "--drain-timeout"),
    max_n: Optional[int] = _opt(ServeConfig, "max_n", "--max-n"),
    default_max_tokens: Optional[int] = _opt(ServeConfig, "default_max_tokens", "--default-max-tokens"),
    gguf_context: Optional[int] = _opt(ServeConfig, "gguf_context", "--gguf-context"),
    registry: Optional[Path] = _opt(ServeConfig, "registry", "--registry"),
    registry_db: Optional[str] = _opt(ServeConfig, "registry_db", "--registry-db"),
    registry_poll: Optional[float] = _opt(ServeConfig, "registry_poll_s", "--registry-poll"),
    admin_keys_file: Optional[Path] = _opt(ServeConfig, "admin_keys_file", "--admin-keys-file"),
    drift_window: Optional[int] = _opt(ServeConfig, "drift_window", "--drift-window"),
    drift_every: Optional[int] = _opt(ServeConfig, "drift_every", "--drift-every"),
    drift_min_window: Optional[int] = _opt(ServeConfig, "drift_min_window", "--drift-min-window"),
    drift_alpha: Optional[float] = _opt(ServeConfig, "drift_alpha", "--drift-alpha"),
    drift_permutations: Optional[int] = _opt(ServeConfig, "drift_permutations", "--drift-permutations"),
    request_log: Optional[Path] = _opt(ServeConfig, "request_log", "--request-log"),
    request_log_sample: Optional[float] = _opt(ServeConfig, "request_log_sample", "--request-log-sample"),
    request_log_max_mb: Optional[float] = _opt(ServeConfig, "request_log_max_mb", "--request-log-max-mb"),
    rag: Optional[list[str]] = _opt(ServeConfig, "rag", "--rag"),
    rag_top_k: Optional[int] = _opt(ServeConfig, "rag_top_k", "--rag-top-k"),
    rag_min_score: Optional[float] = _opt(ServeConfig, "rag_min_score", "--rag-min-score"),
    rag_handoff: Optional[str] = _opt(ServeConfig, "rag_handoff", "--rag-handoff"),
):
    """An OpenAI-compatible API (chat, completions, classify, entities, embeddings) with a playground page at /."""
    from tunelab.serve.server import serve as run_server

    flags = {"host": host, "port": port, "api_keys_file": api_keys_file, "embedding_model": embedding_model,
             "device": device, "max_batch": max_batch, "max_waiting": max_waiting, "encoder_batch": encoder_batch,
             "encoder_wait_ms": encoder_wait_ms, "precision": precision, "rate_limit": rate_limit,
             "max_body_bytes": max_body_bytes, "max_header_bytes": max_header_bytes,
             "header_timeout_s": header_timeout, "body_timeout_s": body_timeout, "max_connections": max_connections,
             "drain_timeout_s": drain_timeout, "max_headers": max_headers, "max_n": max_n,
             "default_max_tokens": default_max_tokens, "gguf_context": gguf_context, "registry": registry,
             "registry_db": registry_db, "registry_poll_s": registry_poll, "admin_keys_file": admin_keys_file,
             "drift_window": drift_window, "drift_every": drift_every, "drift_min_window": drift_min_window,
             "drift_alpha": drift_alpha, "drift_permutations": drift_permutations,
             "request_log": request_log, "request_log_sample": request_log_sample,
             "request_log_max_mb": request_log_max_mb, "rag": rag, "rag_top_k": rag_top_k,
             "rag_min_score": rag_min_score, "rag_handoff": rag_handoff}
    raw = {"models": models, **{k: v for k, v in flags.items() if v is not None}}
    if embedding_model is not None and embedding_model.lower() == "none":
        raw["embedding_model"] = None
    raise typer.Exit(run_server(section(ServeConfig, raw, "serve options")))


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out"),
    data: Path = typer.Option(Path("data/tweets"), "--data"),
    train_examples: Optional[int] = typer.Option(None, "--train-examples", min=32,
                                                 help="seeded subset of the train split (default: all of it)"),
    epochs: float = typer.Option(1.0, "--epochs", min=0.01),
    overwrite: bool = OVERWRITE,
):
    """Prepare the built-in tweets, fine-tune MiniLM, compare with the baselines, print the table."""
    from tunelab.quickstart import run_quickstart

    run_quickstart(out, data, train_examples, epochs, console, overwrite=overwrite)


def _uniform_defaults(cmd: Command) -> None:
    """Every option's default written one way, "(default: X)" at the end of its help, as `_opt` writes it."""
    for p in cmd.params:
        if isinstance(p, TyperOption) and p.show_default:
            if not p.is_flag and p.default is not None and p.default != ():
                p.help = f"{p.help or ''} (default: {p.default})".lstrip()
            p.show_default = False
    for sub in getattr(cmd, "commands", {}).values():
        _uniform_defaults(sub)


def _usage_error(err: ClickException) -> str:
    """A click usage error (unknown option, missing argument, bad value) as one line naming where help is."""
    msg = " ".join(err.format_message().split()).rstrip(".")
    msg = msg[:1].lower() + msg[1:]
    ctx = getattr(err, "ctx", None)
    return f"{msg} (see `{ctx.command_path if ctx else 'tunelab'} --help`)"


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not for users
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' own bars (GGUF de-quantisation); read when tqdm loads
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    command = typer.main.get_command(app)
    _uniform_defaults(command)
    try:
        code = command.main(prog_name="tunelab", standalone_mode=False)
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {plain(err)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click_exceptions.NoArgsIsHelpError as e:  # `tunelab` or `tunelab data` alone: the help, as asked
        print(e.ctx.get_help())
        sys.exit(0)
    except ClickException as e:  # usage errors: unknown option, missing argument, bad value
        err_console.print(f"[bold red]error:[/] {plain(_usage_error(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
