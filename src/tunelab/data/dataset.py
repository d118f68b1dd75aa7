"""The dataset dir contract: what `tunelab data prepare` writes and every later stage reads.

A dataset dir holds `dataset.json` (kind "dataset", task, fields, labels, split sizes, class balance,
fingerprint, source, options, the preparation report and warnings) and one JSON-lines file per split
(`train.jsonl`, `validation.jsonl`, `test.jsonl`), each row holding its kind's `fields`; beside them
the preparation's own records (`rejected.jsonl`, `near_duplicates.jsonl`, `conflicts.json`). Stages that only
read a dataset (training, evaluation, overlap checks) import this module, never the preparation pipeline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tunelab.errors import UserError, read_json_file

DATASET_FILE = "dataset.json"
SPLITS = ("train", "validation", "test")
# kept when present: a dialogue's category, an augmented row's origin, a retrieval pair's hard negatives
EXTRA_FIELDS = ("category", "augmented", "negatives")


@dataclass(frozen=True)
class DatasetKind:
    """What a dataset of one kind (`dataset.json` `task`) holds, for the pipeline that writes it and the stages
    that read it. Adding a kind is one entry in `DATASET_KINDS`, its name in `PrepareOptions.task`, an
    `_extract_<name>` on the preparation's `RowFilter`, and a `TaskSpec` in `tasks.TASKS` that trains on it."""

    name: str
    fields: tuple[str, ...]  # of a written row
    columns: tuple[str, ...] = ()  # the source columns it reads by role ("text", "label"); others read a structure
    labelled: bool = False  # one class label per row: class balance, label warnings, augmentation
    tagged: bool = False  # one BIO tag per token; its labels are the tag set
    keeps_newlines: bool = True  # a class label rarely depends on line breaks; text, chat and tokens keep theirs
    dedup_on: str = "text"  # the row field exact de-duplication compares (a retrieval pair: both of its texts)
    group_by: str | None = None  # rows sharing this field's text stay in one split (a retrieval query's pairs)
    # near de-duplication compares this field, with the kind's own `dedup.near_action` if any: a retrieval pair's
    # query, grouped (a question asked twice in other words stays in one split, and each wording is worth training on)
    near_on: str = "text"
    near_action: str | None = None

    def label_set(self, rows: list[dict]) -> list[str]:
        """The dataset's labels: the sorted classes, or "O" then the tags grouped by entity type, or []."""
        if self.labelled:
            return sorted({r["label"] for r in rows})
        if self.tagged:
            return ["O"] + sorted({t for r in rows for t in r["tags"] if t != "O"}, key=lambda t: (t[2:], t))
        return []

    def output_row(self, r: dict) -> dict:
        """The row as written to a split file: the kind's fields, plus the extras it has."""
        out = {k: r[k] for k in self.fields}
        for extra in EXTRA_FIELDS:
            if extra in r:
                out[extra] = r[extra]
        return out


DATASET_KINDS = {k.name: k for k in (
    DatasetKind("classification", ("text", "label"), ("text", "label"), labelled=True, keeps_newlines=False),
    DatasetKind("text", ("text",), ("text",)),
    DatasetKind("sft", ("messages",)),
    DatasetKind("ner", ("tokens", "tags"), tagged=True),
    DatasetKind("retrieval", ("query", "passage"), dedup_on="_pair", group_by="query",
                near_on="query", near_action="group"),
)}


def dataset_kind(name: str) -> DatasetKind:
    """The `DatasetKind` called `name`; an unknown one is a `UserError` naming the known ones."""
    if name not in DATASET_KINDS:
        raise UserError(f"unknown dataset task '{name}'; choose one of {', '.join(DATASET_KINDS)}")
    return DATASET_KINDS[name]


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
            negatives = [r["negatives"]] if r.get("negatives") else []  # only where rows have them: others' stay
            h.update(json.dumps([name, r["text"], r["label"], r.get("messages"), r.get("tags"), *negatives],
                                ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def load_meta(data_dir: str | Path) -> dict:
    """The `dataset.json` of a dataset dir; a folder that is not one is a `UserError`."""
    d = Path(data_dir)
    return read_json_file(d / DATASET_FILE,
                          f"{d} is not a dataset dir (no {DATASET_FILE}); create one with `tunelab data prepare`")


def load_split(data_dir: str | Path, split: str) -> list[dict]:
    """The rows of one split of a dataset dir, each with its kind's `fields` (and extras)."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    load_meta(data_dir)
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; prepare the dataset again")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
