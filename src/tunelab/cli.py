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
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from typer._click import ClickException

from tunelab.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tunelab: prepare data, fine-tune, evaluate against baselines, predict.")
data_app = typer.Typer(no_args_is_help=True, help="Data stage.")
app.add_typer(data_app, name="data")
# Pipes and log files get a fixed, wide layout instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


@data_app.command("prepare")
def data_prepare(
    source: str = typer.Argument(..., help="builtin:tweets-sentiment or a CSV/TSV/JSONL/JSON/Parquet file"),
    out: Path = typer.Option(..., "--out", help="dataset dir to write"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with any prepare options (clean, pii, "
                                          "dedup, ...); flags given here win"),
    task: Optional[str] = typer.Option(None, "--task", help="classification (default), text (documents for "
                                       "pretraining), sft (conversations), ner (tokens + BIO tags)"),
    text_column: Optional[str] = typer.Option(None, help="column holding the text (default: text)"),
    label_column: Optional[str] = typer.Option(None, help="column holding the label (default: label)"),
    seed: Optional[int] = typer.Option(None, help="seed of the split (default 0)"),
    val_ratio: Optional[float] = typer.Option(None, min=0.0, max=0.5),
    test_ratio: Optional[float] = typer.Option(None, min=0.0, max=0.5),
    max_rows: Optional[int] = typer.Option(None, min=1, help="keep a seeded stratified sample of this many rows"),
    split_column: Optional[str] = typer.Option(None, help="respect an existing train/validation/test column"),
    strict: Optional[bool] = typer.Option(None, "--strict", help="stop at the first malformed row (file:line)"),
    max_drop_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="fail above this drop rate (0.2)"),
    near_threshold: Optional[float] = typer.Option(None, min=0.01, max=1.0, help="near-dup Jaccard (0.7)"),
    no_near_dedup: bool = typer.Option(False, "--no-near-dedup", help="exact de-duplication only"),
    no_pii: bool = typer.Option(False, "--no-pii", help="do not redact PII"),
):
    """Read, clean, redact, de-duplicate and split a labelled text file into a dataset dir."""
    from tunelab.config import PrepareOptions, apply_overrides, format_validation_error, read_yaml_mapping
    from tunelab.data.prepare import prepare
    from tunelab.data.summary import print_dataset_summary

    raw = read_yaml_mapping(config, "prepare options") if config else {}
    flags = {"task": task, "text_column": text_column, "label_column": label_column, "seed": seed,
             "val_ratio": val_ratio, "test_ratio": test_ratio, "max_rows": max_rows, "split_column": split_column,
             "strict": strict, "max_drop_rate": max_drop_rate, "dedup.threshold": near_threshold,
             "dedup.near": False if no_near_dedup else None, "pii.enabled": False if no_pii else None}
    apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None])
    try:
        opts = PrepareOptions.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err).replace("invalid config", "invalid prepare options")) from None
    meta = prepare(source, out, opts)
    print_dataset_summary(meta, out, console)


@data_app.command("overlap")
def data_overlap(
    a: str = typer.Argument(..., help="reference: a file, a dataset dir, or DIR:split (e.g. data/tweets:train)"),
    b: str = typer.Argument(..., help="checked: a file, a dataset dir, or DIR:split (e.g. my_test.csv)"),
    text_column: str = typer.Option("text", "--text-column"),
    threshold: float = typer.Option(0.7, "--threshold", min=0.01, max=1.0, help="near-dup Jaccard"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the report as JSON"),
):
    """Decontamination check: rows of B that occur exactly or nearly in A."""
    from tunelab.data.overlap import load_texts, overlap

    rep = overlap(load_texts(a, text_column), load_texts(b, text_column), threshold)
    console.print(f"{rep['rows_b']:,} rows of {b} against {rep['rows_a']:,} rows of {a}: "
                  f"[bold]{rep['exact']:,} exact[/] and [bold]{rep['near']:,} near[/] duplicates "
                  f"({rep['contaminated_share']:.2%} contaminated, Jaccard >= {threshold})")
    for ex in rep["near_examples"][:5]:
        console.print(f"  near: {ex['b']!r}\n     ~ {ex['a']!r}", highlight=False)
    if out:
        out.write_text(json.dumps(rep, indent=2, ensure_ascii=False))


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config (see examples/)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. train.lr=3e-5"),
    out: Optional[Path] = typer.Option(None, "--out", help="run dir (default: runs/<config name>)"),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (newest checkpoint in --out) or a path"),
    force: bool = typer.Option(False, "--force", help="resume even if the config or data changed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier run in --out"),
):
    """Fine-tune a model; writes the run dir with metrics, checkpoints and model/."""
    from tunelab.config import load_config
    from tunelab.train.loop import train as run_train

    cfg = load_config(config, overrides or [])
    out = out or Path("runs") / (cfg.name or config.stem)
    summary = run_train(cfg, out, resume=resume, force=force, overwrite=overwrite,
                        show_progress=sys.stderr.isatty())
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports for the job
        console.print_json(json.dumps(summary))


@app.command("eval")
def eval_cmd(
    model_dir: Path = typer.Argument(..., help="a model dir written by `tunelab train`"),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset dir (default: the one it was trained on)"),
    split: str = typer.Option("test", "--split"),
    out: Optional[Path] = typer.Option(None, "--out", help="report JSON (a confusion-matrix PNG goes beside it)"),
    baseline: Optional[list[str]] = typer.Option(None, "--baseline", help="tfidf, zero_shot (default both)"),
    no_baselines: bool = typer.Option(False, "--no-baselines"),
    zero_shot_model: str = typer.Option("builtin:smollm2-135m-instruct", "--zero-shot-model"),
    zero_shot_samples: int = typer.Option(300, "--zero-shot-samples", min=0,
                                          help="cap on rows scored zero-shot; 0 = all"),
    generation_samples: int = typer.Option(50, "--generation-samples", min=0,
                                           help="sft: conversations answered for ROUGE-L / exact match"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    general_text: Optional[str] = typer.Option(None, "--general-text",
                                               help="forgetting probe text (.txt or dataset dir; default: the "
                                               "built-in tweets)"),
    general_samples: int = typer.Option(200, "--general-samples", min=1),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="examples per forward (causal_lm/sft: at "
                                   "most 8 blocks)"),
):
    """Evaluate on a split next to the cheap baselines (classification: TF-IDF + LR and zero-shot; NER: word
    lookup) or, for causal_lm/sft, next to the base model before fine-tuning (perplexity, generation
    scores, forgetting probe)."""
    from tunelab.config import EvalConfig
    from tunelab.evaluate.report import BASELINES, evaluate, print_report

    chosen = [] if no_baselines else (baseline or list(BASELINES))
    unknown = set(chosen) - set(BASELINES)
    if unknown:
        raise UserError(f"unknown baseline(s) {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    eval_cfg = EvalConfig(batch_size=batch_size, generation_samples=generation_samples,
                          max_new_tokens=max_new_tokens, general_text=general_text, general_samples=general_samples)
    report = evaluate(model_dir, data, split, out, chosen, zero_shot_model, zero_shot_samples or None,
                      batch_size=batch_size, eval_cfg=eval_cfg)
    print_report(report, console)
    if out:
        png = report.get("confusion_matrix_png")
        console.print(f"report: {out}" + (f" · confusion matrix: {png}" if png else ""))


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="a model dir written by `tunelab train`"),
    texts: Optional[list[str]] = typer.Argument(None, help="texts to classify"),
    input: Optional[Path] = typer.Option(None, "--input", help="JSONL/CSV/TSV/Parquet file of texts"),
    out: Optional[Path] = typer.Option(None, "--out", help="predictions JSONL (with --input)"),
    text_column: str = typer.Option("text", "--text-column"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per text instead of a table"),
):
    """Labels and per-class probabilities for texts or a file."""
    from tunelab.predict import predict_file, predict_texts

    if bool(texts) == bool(input):
        raise UserError("give either texts as arguments or --input FILE (with --out)")
    if input:
        if out is None:
            raise UserError("--input needs --out FILE for the predictions")
        res = predict_file(model_dir, input, out, text_column, batch_size)
        console.print(f"wrote {res['predicted']} predictions to {res['out']}")
        if res["skipped"]:
            err_console.print(f"skipped {len(res['skipped'])} rows without text: " + ", ".join(
                f"line {s['line']} ({s['reason']})" for s in res["skipped"][:10]))
        return
    results = predict_texts(model_dir, texts, batch_size)
    if as_json:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
        return
    table = Table()
    table.add_column("text")
    table.add_column("label", style="bold")
    for label in results[0]["probs"]:
        table.add_column(f"p({label})", justify="right")
    for r in results:
        table.add_row(r["text"], r["label"], *[f"{p:.3f}" for p in r["probs"].values()])
    console.print(table)


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
    """Chat in the terminal; answers stream token by token. /reset clears the history, /exit (or Ctrl-D) quits."""
    from tunelab.generate import generate as run, load_generator

    params = _generation_options(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
    gen = load_generator(model)
    if not gen.has_chat_template:
        raise UserError(f"{model} has no chat template; use `tunelab generate --raw`")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err_console.print(f"chatting with {model} · /reset clears the history · /exit quits")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        res = run(gen, messages, params, chat=True, on_text=lambda t: print(t, end="", flush=True))
        print()
        messages.append({"role": "assistant", "content": res["text"].strip()})


@app.command()
def serve(
    models: list[str] = typer.Argument(..., help="model dirs or base models (builtin:…, tiny-llama, a dir, a .gguf); "
                                       "NAME=PATH sets the id clients use"),
    host: str = typer.Option("127.0.0.1", "--host", help="other than loopback only with API keys"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="0 = any free port"),
    api_keys_file: Optional[Path] = typer.Option(None, "--api-keys-file",
                                                 help="one key per line; keys also from TUNELAB_API_KEYS"),
    embedding_model: str = typer.Option("builtin:minilm-l6", "--embedding-model",
                                        help="served at /v1/embeddings; 'none' = off"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present)"),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="sequences decoded together per model"),
    max_waiting: int = typer.Option(64, "--max-waiting", min=0, help="queued requests beyond the batch; then 503"),
    encoder_batch: int = typer.Option(64, "--encoder-batch", min=1, help="texts per classify/embeddings forward "
                                      "(and per request)"),
    encoder_wait_ms: float = typer.Option(5.0, "--encoder-wait-ms", min=0, help="how long a micro-batch waits to "
                                          "fill"),
    precision: str = typer.Option("auto", "--precision", help="classify/embeddings: auto (bf16 where native), "
                                  "fp32, bf16; generation runs in fp32"),
    rate_limit: float = typer.Option(0, "--rate-limit", min=0, help="requests per minute per key (0 = off)"),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", min=1),
    drain_timeout: float = typer.Option(30, "--drain-timeout", min=0.1, help="SIGTERM: seconds in-flight "
                                        "requests may take to finish"),
):
    """An OpenAI-compatible API (chat, completions, classify, embeddings) with a playground page at /."""
    from tunelab.config import ServeConfig, format_validation_error
    from tunelab.serve.server import serve as run_server

    try:
        cfg = ServeConfig(models=models, host=host, port=port, api_keys_file=api_keys_file,
                          embedding_model=None if embedding_model.lower() == "none" else embedding_model,
                          device=device, max_batch=max_batch, max_waiting=max_waiting, encoder_batch=encoder_batch,
                          encoder_wait_ms=encoder_wait_ms, precision=precision, rate_limit=rate_limit,
                          max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout)
    except ValidationError as err:
        raise UserError(format_validation_error(err).replace("invalid config", "invalid serve options")) from None
    raise typer.Exit(run_server(cfg))


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out"),
    data: Path = typer.Option(Path("data/tweets"), "--data"),
    train_examples: Optional[int] = typer.Option(None, "--train-examples", min=32,
                                                 help="seeded subset of the train split (default: all of it)"),
    epochs: float = typer.Option(1.0, "--epochs", min=0.01),
):
    """Prepare the built-in tweets, fine-tune MiniLM, compare with the baselines, print the table."""
    from tunelab.quickstart import run_quickstart

    run_quickstart(out, data, train_examples, epochs, console)


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not for users
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        app(standalone_mode=False)
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except ClickException as e:  # usage errors: bad option, missing argument
        e.show()
        sys.exit(e.exit_code)
