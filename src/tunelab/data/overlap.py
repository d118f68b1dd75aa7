"""Decontamination check: how many rows of one dataset also occur (exactly or nearly) in another.

Typical use: a user's own test set against a training set, or a benchmark against a corpus.
A side is a file (CSV/TSV/JSONL/JSON/Parquet/saved dataset) or a prepared dataset dir, optionally
`DIR:split` for one of its splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunelab.data.clean import dedup_key
from tunelab.data.dataset import SPLITS, load_split
from tunelab.data.neardup import near_duplicates
from tunelab.data.read import read_rows
from tunelab.errors import UserError


def load_texts(spec: str, text_column: str = "text") -> list[str]:
    """Texts of `spec`: a file, a dataset dir (all splits) or `DIR:split`."""
    path, _, split = spec.partition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    p = Path(path)
    if (p / "dataset.json").is_file():
        return [r["text"] for s in ([split] if split else SPLITS) for r in load_split(p, s)]
    if split:
        raise UserError(f"{path} is not a prepared dataset dir, so ':{split}' means nothing")
    columns, rows = read_rows(p)
    if columns and text_column not in columns:
        raise UserError(f"{p}: no text column '{text_column}'; columns are: {', '.join(columns)}")
    return [t for r in rows if not r.error and isinstance(t := r.fields.get(text_column), str) and t.strip()]


# MinHash functions of the check's own: shingles are hashed by content, so with the seed `data prepare` uses (its seed
# + 1) this check would miss exactly the pairs the split's de-duplication missed; with others it can find them.
OVERLAP_SEED = 7919


def overlap(a: list[str], b: list[str], threshold: float = 0.7, ngram: int = 2, num_perm: int = 64,
            examples: int = 10, seed: int = OVERLAP_SEED) -> dict:
    """Rows of `b` with an exact (normalised) or near duplicate in `a`, with a few examples."""
    keys_a = {dedup_key(t) for t in a}
    exact = [i for i, t in enumerate(b) if dedup_key(t) in keys_a]
    res = near_duplicates(a + b, threshold, ngram, num_perm, seed)
    groups_with_a = set(res.group[:len(a)].tolist())
    in_a_group = np.isin(res.group[len(a):], list(groups_with_a))
    exact_set = set(exact)
    near = [i for i in np.flatnonzero(in_a_group).tolist() if i not in exact_set]
    first_a = {}
    for i, g in enumerate(res.group[:len(a)].tolist()):
        first_a.setdefault(g, i)
    shown = [{"b": b[i], "a": a[first_a[int(res.group[len(a) + i])]]} for i in near[:examples]]
    return {"rows_a": len(a), "rows_b": len(b), "exact": len(exact), "near": len(near),
            "contaminated": len(exact) + len(near),
            "contaminated_share": (len(exact) + len(near)) / max(1, len(b)), "threshold": threshold,
            "near_examples": shown, "exact_examples": [b[i] for i in exact[:examples]]}
