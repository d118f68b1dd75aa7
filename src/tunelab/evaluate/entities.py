"""Evaluation of token-classification (NER) models against a lookup baseline.

The baseline is what a rule-minded engineer would try first: every word seen in train gets the tag it
had most often there (as B-/I- by position in the run), every other word "O".
"""

from __future__ import annotations

from collections import Counter, defaultdict

from tunelab.tasks.token_classification import entity_metrics


def lookup_baseline(train: list[dict], rows: list[dict], predictions: bool = False) -> dict:
    """The lookup's entity scores on `rows` (with `predictions`, its tags per row under `predictions`)."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        for w, t in zip(r["tokens"], r["tags"]):
            seen[w.lower()][t[2:] if t != "O" else "O"] += 1
    pred = []
    for r in rows:
        tags, prev = [], "O"
        for w in r["tokens"]:
            etype = seen[w.lower()].most_common(1)[0][0] if w.lower() in seen else "O"
            tag = "O" if etype == "O" else ("I-" if prev == etype else "B-") + etype
            tags.append(tag)
            prev = etype
        pred.append(tags)
    out = entity_metrics([r["tags"] for r in rows], pred)
    out.update(name="word lookup", train_examples=len(train), n=len(rows))
    if predictions:
        out["predictions"] = pred
    return out
