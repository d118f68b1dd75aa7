"""Leakage: do the rows a model is evaluated on also occur in the data it was trained on?

A model dir records its training dataset (`tunelab.json` → `data`: the dir as given, its absolute `path` and
its `fingerprint`). Every evaluation checks the evaluated rows against that dataset's train and validation
splits — exact duplicates (normalised text) and near duplicates (MinHash, as `tunelab data overlap`) — so a
score on rows the model has seen cannot pass for a score on new data. When the training data is gone, or has
changed since training (another fingerprint), the report says the check could not be made.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.data.dataset import load_meta, load_split
from tunelab.data.overlap import overlap

LOUD_SHARE = 0.01  # from this share of contaminated rows (or any exact duplicate) the warning is loud
SEEN_SPLITS = ("train", "validation")  # what training read: train to fit, validation to pick the checkpoint


def training_data(meta: dict) -> tuple[Path | None, str]:
    """The model's training dataset dir -> (dir, "") or (None, why it cannot be used)."""
    data = meta.get("data") or {}
    places = [p for p in (data.get("path"), data.get("dir")) if p]
    if not places:
        return None, "the model dir does not record its training data"
    for place in dict.fromkeys(places):
        if (Path(place) / "dataset.json").is_file():
            found = load_meta(place).get("fingerprint")
            if found == data.get("fingerprint"):
                return Path(place), ""
            return None, (f"the training data at {place} has changed since training (fingerprint {found}, "
                          f"trained on {data.get('fingerprint')})")
    return None, f"the training data is gone (not found at {' or '.join(dict.fromkeys(places))})"


def row_text(row: dict) -> str:
    """The text a model reads from a dataset row: `text`, an NER row's words joined by spaces, the contents of
    a conversation's messages, one per line, or a retrieval pair's query and passage on two lines."""
    text, tokens, messages = row.get("text"), row.get("tokens"), row.get("messages")
    if isinstance(text, str):
        return text
    if isinstance(row.get("query"), str) and isinstance(row.get("passage"), str):
        return f"{row['query']}\n{row['passage']}"
    if isinstance(tokens, list):
        return " ".join(map(str, tokens))
    if isinstance(messages, list):
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return json.dumps(row, ensure_ascii=False)


def check_leakage(meta: dict, rows: list[dict], threshold: float = 0.7) -> dict:
    """`rows` (the evaluated split) against the model's training data. -> {"checked", ...}: when checked, the
    counts of exact and near duplicates, their share, a few examples, and whether the warning is `loud`."""
    train_dir, why = training_data(meta)
    if train_dir is None:
        return {"checked": False, "reason": why}
    seen = [row_text(r) for s in SEEN_SPLITS for r in load_split(train_dir, s)]
    res = overlap(seen, [row_text(r) for r in rows], threshold=threshold, examples=3)
    return {"checked": True, "training_data": str(train_dir), "against": list(SEEN_SPLITS),
            "training_rows": len(seen), "rows": len(rows), "exact": res["exact"], "near": res["near"],
            "contaminated": res["contaminated"], "share": res["contaminated_share"], "threshold": threshold,
            "loud": res["exact"] > 0 or res["contaminated_share"] >= LOUD_SHARE,
            "exact_examples": res["exact_examples"], "near_examples": res["near_examples"]}


def describe(leak: dict, split: str) -> str:
    """One line for the console."""
    if not leak.get("checked"):
        return f"leakage not checked: {leak.get('reason')}"
    n, rows = leak["contaminated"], leak["rows"]
    if not n:
        return (f"leakage check: none of the {rows:,} {split} rows occur in the training data "
                f"({leak['training_rows']:,} train + validation rows)")
    return (f"{n:,} of {rows:,} {split} rows ({leak['share']:.1%}) also occur in the model's training data "
            f"({leak['exact']:,} exact, {leak['near']:,} near duplicates)"
            + ("; these scores are inflated" if leak["loud"] else ""))
