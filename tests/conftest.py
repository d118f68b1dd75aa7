"""Shared fixtures: small hand-made labelled files and prepared datasets for tiny models."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

POS = ["great", "love", "excellent", "wonderful", "happy", "amazing", "fantastic", "good"]
NEG = ["awful", "hate", "terrible", "horrible", "sad", "broken", "late", "bad"]
NEU = ["flight", "tuesday", "gate", "schedule", "seat", "ticket", "boston", "monday"]
ASKING = ["why", "how", "when", "where", "which", "whom", "whose", "what"]
FILLER = ["the", "a", "my", "this", "our", "trip", "service", "crew", "airline", "today", "was", "is"]


def make_rows(n: int, seed: int = 0, start: int = 0) -> list[dict]:
    """Synthetic sentiment rows with a learnable signal (label words) and unique texts."""
    rng = random.Random(seed)
    rows = []
    for i in range(start, start + n):
        label, words = [("positive", POS), ("negative", NEG), ("neutral", NEU)][i % 3]
        text = " ".join(rng.sample(FILLER, 3) + rng.sample(words, 2) + [f"#{i}"])
        rows.append({"text": text, "label": label})
    return rows


def write_csv(path: Path, rows: list[dict], columns=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return path


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A prepared dataset dir with 300 synthetic rows (240/30/30)."""
    from tunelab.data.prepare import prepare

    root = tmp_path_factory.mktemp("small")
    src = write_csv(root / "small.csv", make_rows(300))
    prepare(str(src), root / "ds")
    return root / "ds"


def tiny_config(data_dir: Path, **train) -> dict:
    return {
        "task": "classification",
        "model": {"base": "tiny-bert", "max_length": 32},
        "data": {"dir": str(data_dir)},
        "method": {"name": "full"},
        # fp32: the same code path on every CPU (bf16 autocast is `auto` only where the CPU has it natively)
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "eval_every": 0, "log_every": 2, "seed": 0,
                  "precision": "fp32", **train},
        "eval": {"baselines": ["tfidf"]},
    }


def task_config(data_dir, base, method="full", **train_kw):
    """A validated RunConfig for a tiny model on a prepared dataset dir (any task)."""
    from tunelab.config import validate

    return validate({"model": {"base": base, "max_length": 64}, "data": {"dir": str(data_dir)},
                     "method": {"name": method},
                     "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "log_every": 1, "seed": 0, "precision": "fp32",
                               **train_kw}})


@pytest.fixture(scope="session")
def ner_data(tmp_path_factory):
    """200 sentences of the shipped finance NER example, prepared."""
    from tunelab.config import PrepareOptions
    from tunelab.data.prepare import prepare

    d = tmp_path_factory.mktemp("ner") / "ds"
    src = Path(__file__).parent.parent / "examples" / "data" / "finance_ner.conll"
    prepare(str(src), d, PrepareOptions(task="ner", max_rows=200))
    return d


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """120 short market-report documents as a `text` dataset."""
    from tunelab.config import PrepareOptions
    from tunelab.data.prepare import prepare

    root = tmp_path_factory.mktemp("text")
    docs = [f"report {i}: the market opened higher and shares of company {i % 7} rose on strong demand."
            for i in range(120)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    prepare(str(root / "corpus.txt"), root / "ds", PrepareOptions(task="text", dedup={"near": False}))
    return root / "ds"


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """80 arithmetic conversations as an `sft` dataset."""
    from tunelab.config import PrepareOptions
    from tunelab.data.prepare import prepare

    root = tmp_path_factory.mktemp("chat")
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(80)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prepare(str(root / "chat.jsonl"), root / "ds", PrepareOptions(task="sft", dedup={"near": False}))
    return root / "ds"


def build_peaky_llama(out: Path) -> Path:
    """A small random Llama with large weights (init std 0.5), saved with SmolLM2's tokenizer and chat
    template: unlike tiny-llama its greedy outputs differ per prompt and the top-2 logit margins are wide,
    so batching invariants are tested on varied text rather than one repeated token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models import load_tokenizer

    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128,
                      max_position_embeddings=2048, initializer_range=0.5, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):  # the global random state stays what the calling test made it
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peaky_llama(tmp_path_factory) -> Path:
    return build_peaky_llama(tmp_path_factory.mktemp("peaky") / "peaky-llama")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, small_dataset) -> Path:
    """A tiny-bert sentiment classifier model dir, trained to convergence (16 epochs, a few seconds): at 4 epochs
    a tiny random BERT is often still near uniform, and which class wins would be luck."""
    from tunelab.config import validate
    from tunelab.train.loop import train

    run = tmp_path_factory.mktemp("clf") / "sentiment"
    train(validate(tiny_config(small_dataset, epochs=16)), run, show_progress=False)
    return run / "model"


@pytest.fixture(scope="session")
def four_labels(tmp_path_factory) -> Path:
    """The sentiment rows plus a fourth class ('question') the tiny classifier never saw."""
    from tunelab.data.prepare import prepare

    root = tmp_path_factory.mktemp("four")
    rng = random.Random(7)
    rows = make_rows(240, seed=7, start=1000)
    rows += [{"text": " ".join(rng.sample(FILLER, 3) + rng.sample(ASKING, 2) + [f"#{i}"]), "label": "question"}
             for i in range(2000, 2080)]
    prepare(str(write_csv(root / "four.csv", rows)), root / "ds")
    return root / "ds"


@pytest.fixture(scope="session")
def lora_classifier(tmp_path_factory, small_dataset) -> Path:
    """A tiny-bert LoRA classifier (the head trained too): merging has something to fold in."""
    from tunelab.config import validate
    from tunelab.train.loop import train

    raw = tiny_config(small_dataset, epochs=2)
    raw["method"] = {"name": "lora", "lora": {"r": 4, "alpha": 8}}
    run = tmp_path_factory.mktemp("lora-clf") / "run"
    train(validate(raw), run, show_progress=False)
    return run / "model"


@pytest.fixture(scope="session")
def sft_lora(tmp_path_factory, chat_data) -> Path:
    """A tiny-llama LoRA chat model dir (its chat template and stop tokens saved with it)."""
    from tunelab.train.loop import train

    run = tmp_path_factory.mktemp("sft") / "arith"
    train(task_config(chat_data, "tiny-llama", "lora", lr=1e-2, epochs=1), run, show_progress=False)
    return run / "model"


@pytest.fixture(scope="session")
def tiny_ner(tmp_path_factory, ner_data) -> Path:
    """A tiny-bert NER model dir on the finance NER sample (6 epochs, seed 0, ~8 s): it finds the ORG and PER
    names of sentences shaped like its training data (entity F1 ≈ 0.8 on the test split)."""
    from tunelab.train.loop import train

    run = tmp_path_factory.mktemp("ner-model") / "finance-ner"
    train(task_config(ner_data, "tiny-bert", epochs=6), run, show_progress=False)
    return run / "model"


def _export(tmp_path_factory, source, name: str, fmt: str, **kw) -> Path:
    from tunelab.export import export_model

    out = tmp_path_factory.mktemp(f"export-{name}") / name
    export_model(str(source), out, fmt, rows=4, **kw)
    return out


@pytest.fixture(scope="session")
def peaky_gguf(tmp_path_factory, peaky_llama) -> Path:
    """peaky-llama as a GGUF export (f32: llama.cpp computes what PyTorch does; no thresholds, it is random)."""
    return _export(tmp_path_factory, peaky_llama, "peaky", "gguf", quantize="f32", thresholds={})


@pytest.fixture(scope="session")
def classifier_onnx(tmp_path_factory, tiny_classifier) -> Path:
    """The tiny classifier as an fp32 ONNX export (the same predictions as the model dir)."""
    return _export(tmp_path_factory, tiny_classifier, "sentiment", "onnx")


@pytest.fixture(scope="session")
def ner_onnx(tmp_path_factory, tiny_ner) -> Path:
    return _export(tmp_path_factory, tiny_ner, "ner", "onnx")


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory) -> Path:
    """MiniLM's sentence embeddings as an ONNX export."""
    return _export(tmp_path_factory, "builtin:minilm-l6", "minilm-l6", "onnx")


@pytest.fixture(scope="session")
def smollm2_q8(tmp_path_factory) -> tuple[Path, dict]:
    """The built-in SmolLM2 as a Q8_0 GGUF export, and its parity record (integration tests: ~1.5 min). No dataset:
    parity and calibration read the built-in sentences; a few dozen tokens, so top-1 is held loosely."""
    from tunelab.export import export_model

    out = tmp_path_factory.mktemp("smollm2-q8") / "smollm2-135m-instruct"
    record = export_model("builtin:smollm2-135m-instruct", out, "gguf", quantize="q8_0", rows=8,
                          thresholds={"mean_kl": ("max", 1e-3), "top1_agreement": ("min", 0.95)})
    return out, record


def _postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries, if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server for the tests that run on one: TUNELAB_TEST_POSTGRES_URL, else a throwaway cluster
    started from Debian's binaries (as the postgres user when run as root, which PostgreSQL refuses), else skip."""
    import shutil
    import socket
    import subprocess
    import tempfile

    if os.environ.get("TUNELAB_TEST_POSTGRES_URL"):
        yield os.environ["TUNELAB_TEST_POSTGRES_URL"]
        return
    pg = _postgres_bin()
    if pg is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql); its tests are skipped")
    root = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))  # under /tmp: the postgres user must reach it
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    try:
        subprocess.run(as_user + [str(pg / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "tunelab",
                                  "--no-sync"], **run)
        subprocess.run(as_user + [str(pg / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w",
                                  "-o", f"-k {root} -p {port} -c listen_addresses='' -c fsync=off", "start"], **run)
    except (subprocess.CalledProcessError, OSError) as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL cluster: {getattr(err, 'stderr', '') or err}")
    yield f"postgresql+psycopg://tunelab@/postgres?host={root}&port={port}"
    subprocess.run(as_user + [str(pg / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                   capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)
