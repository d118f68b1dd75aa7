"""Shared fixtures: small hand-made labelled files and prepared datasets for tiny models."""

from __future__ import annotations

import csv
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
FILLER = ["the", "a", "my", "this", "our", "trip", "service", "crew", "airline", "today", "was", "is"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic sentiment rows with a learnable signal (label words) and unique texts."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
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
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "eval_every": 0, "log_every": 2, "seed": 0,
                  **train},
        "eval": {"baselines": ["tfidf"]},
    }
