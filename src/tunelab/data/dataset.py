"""The dataset dir contract: what `tunelab data prepare` writes and every later stage reads.

A dataset dir holds `dataset.json` (kind "dataset", task, fields, labels, split sizes, class balance,
fingerprint, source, options, the preparation report and warnings) and one JSON-lines file per split
(`train.jsonl`, `validation.jsonl`, `test.jsonl`), each row holding the task's `OUTPUT_FIELDS`; beside them
the preparation's own records (`rejected.jsonl`, `near_duplicates.jsonl`, `conflicts.json`). Stages that only
read a dataset (training, evaluation, overlap checks) import this module, never the preparation pipeline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tunelab.errors import UserError, read_json_file

DATASET_FILE = "dataset.json"
SPLITS = ("train", "validation", "test")
# The fields of a written row, per dataset task (`classification` also for any labelled text task).
OUTPUT_FIELDS = {"classification": ["text", "label"], "text": ["text"], "sft": ["messages"],
                 "ner": ["tokens", "tags"]}
EXTRA_FIELDS = ("category", "augmented")  # kept when present: a dialogue's category, an augmented row's origin


def output_row(r: dict, task: str) -> dict:
    """The row as written to a split file: the task's fields, plus the extras it has."""
    out = {k: r[k] for k in OUTPUT_FIELDS[task]}
    for extra in EXTRA_FIELDS:
        if extra in r:
            out[extra] = r[extra]
    return out


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def fingerprint(splits: dict[str, list[dict]]) -> str:
    """sha256 over the written content of all splits (order-sensitive): two dataset dirs with the same
    fingerprint train and evaluate the same; a model dir records it to tell its data apart."""
    h = hashlib.sha256()
    for name in SPLITS:
        for r in splits[name]:
            h.update(json.dumps([name, r["text"], r["label"], r.get("messages"), r.get("tags")],
                                ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def load_meta(data_dir: str | Path) -> dict:
    """The `dataset.json` of a dataset dir; a folder that is not one is a `UserError`."""
    d = Path(data_dir)
    return read_json_file(d / DATASET_FILE,
                          f"{d} is not a dataset dir (no {DATASET_FILE}); create one with `tunelab data prepare`")


def load_split(data_dir: str | Path, split: str) -> list[dict]:
    """The rows of one split of a dataset dir, each with its task's `OUTPUT_FIELDS` (and extras)."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    load_meta(data_dir)
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; prepare the dataset again")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
