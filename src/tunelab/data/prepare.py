"""`tunelab data prepare`: source -> dataset dir, with every row accounted for.

Pipeline: read -> pick text/label columns -> clean -> drop empty/missing -> exact de-dup ->
(optional seeded sample) -> stratified split -> write `train/validation/test.jsonl`,
`rejected.jsonl` (source line + reason for every dropped row) and `dataset.json`.
Invariant (checked before writing): rows_read == rows_kept + sum(dropped.values()).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tunelab import __version__
from tunelab.assets import DATASET_COLUMNS, atomic_dir, builtin_path, is_builtin
from tunelab.data.clean import clean_text
from tunelab.data.dedup import exact_dedup
from tunelab.data.read import read_rows
from tunelab.data.split import sample_rows, stratified_split
from tunelab.errors import UserError

SPLITS = ("train", "validation", "test")


@dataclass
class PrepareOptions:
    text_column: str | None = None
    label_column: str | None = None
    seed: int = 0
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    max_rows: int | None = None


def resolve_source(source: str, opts: PrepareOptions) -> tuple[Path, str, str]:
    """-> (file path, text column, label column); built-in datasets know their own columns."""
    if is_builtin(source):
        path = builtin_path(source)
        cols = DATASET_COLUMNS.get(source.removeprefix("builtin:"))
        if cols is None:
            raise UserError(f"{source} is not a classification dataset")
        return path, opts.text_column or cols["text"], opts.label_column or cols["label"]
    return Path(source), opts.text_column or "text", opts.label_column or "label"


def _check_columns(path: Path, columns: list[str], wanted: dict[str, str]) -> None:
    for role, col in wanted.items():
        if columns and col not in columns:
            raise UserError(f"{path}: no {role} column '{col}'; columns are: {', '.join(columns)} "
                            f"(choose with --{role}-column)")


def _as_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def collect_rows(path: Path, text_col: str, label_col: str) -> tuple[list[dict], list[dict], dict]:
    """Read and clean -> (rows kept so far, rejected rows, counters). Rows carry `_line`."""
    columns, rows = read_rows(path)
    _check_columns(path, columns, {"text": text_col, "label": label_col})
    kept, rejected = [], []
    counters = Counter()
    for row in rows:
        counters["rows_read"] += 1
        if row.error:
            rejected.append({"line": row.line, "reason": row.error})
            continue
        counters["invalid_utf8_repaired"] += row.invalid_utf8
        raw_text, raw_label = row.fields.get(text_col), row.fields.get(label_col)
        text, label = _as_text(raw_text), _as_text(raw_label)
        reason = None
        if raw_text is not None and text is None:
            reason = "text_wrong_type"
        elif raw_label is not None and label is None:
            reason = "label_wrong_type"
        elif text is None or not (text := clean_text(text)):
            reason = "empty_text"
        elif label is None or not (label := label.strip()):
            reason = "missing_label"
        if reason:
            rejected.append({"line": row.line, "reason": reason, "text": _as_text(raw_text)})
            continue
        kept.append({"text": text, "label": label, "_line": row.line})
    return kept, rejected, counters


def fingerprint(splits: dict[str, list[dict]]) -> str:
    """sha256 over the written content of all splits (order-sensitive)."""
    h = hashlib.sha256()
    for name in SPLITS:
        for r in splits[name]:
            h.update(json.dumps([name, r["text"], r["label"]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def prepare(source: str, out: str | Path, opts: PrepareOptions | None = None) -> dict:
    """Build a dataset dir from `source` and return its `dataset.json` content."""
    opts = opts or PrepareOptions()
    path, text_col, label_col = resolve_source(source, opts)
    rows, rejected, counters = collect_rows(path, text_col, label_col)
    rows, dup_dropped, conflicts = exact_dedup(rows)
    for reason, dropped in dup_dropped.items():
        rejected += [{"line": r["_line"], "reason": reason, "text": r["text"]} for r in dropped]
    if opts.max_rows:
        rows, rest = sample_rows(rows, opts.max_rows, "label", opts.seed)
        rejected += [{"line": r["_line"], "reason": "not_sampled", "text": r["text"]} for r in rest]
    if not rows:
        reasons = Counter(r["reason"] for r in rejected).most_common(3)
        raise UserError(f"no usable rows in {path} (read {counters['rows_read']}; dropped: "
                        + ", ".join(f"{k}={v}" for k, v in reasons) + ")")
    splits = stratified_split(rows, "label", opts.val_ratio, opts.test_ratio, opts.seed)
    labels = sorted({r["label"] for r in rows})
    dropped = dict(Counter(r["reason"] for r in rejected).most_common())
    report = {"rows_read": counters["rows_read"], "rows_kept": len(rows), "dropped": dropped,
              "repaired": {"invalid_utf8": counters["invalid_utf8_repaired"]},
              "conflicting_label_groups": len(conflicts)}
    if report["rows_read"] != report["rows_kept"] + sum(dropped.values()):
        raise AssertionError(f"row accounting does not add up: {report}")
    meta = {
        "task": "classification", "text_field": "text", "label_field": "label", "labels": labels,
        "splits": {name: len(splits[name]) for name in SPLITS},
        "class_balance": {name: dict(sorted(Counter(r["label"] for r in splits[name]).items()))
                          for name in SPLITS},
        "fingerprint": fingerprint(splits),
        "source": {"path": str(source) if is_builtin(source) else str(path.resolve()),
                   "text_column": text_col, "label_column": label_col},
        "options": {"seed": opts.seed, "val_ratio": opts.val_ratio, "test_ratio": opts.test_ratio,
                    "max_rows": opts.max_rows},
        "report": report, "tunelab_version": __version__,
    }
    with atomic_dir(Path(out)) as tmp:
        for name in SPLITS:
            _write_jsonl(tmp / f"{name}.jsonl", ({"text": r["text"], "label": r["label"]} for r in splits[name]))
        _write_jsonl(tmp / "rejected.jsonl", sorted(rejected, key=lambda r: r["line"]))
        (tmp / "conflicts.json").write_text(json.dumps(conflicts, ensure_ascii=False, indent=1))
        (tmp / "dataset.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2))
    return meta


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---- reading a prepared dataset dir ------------------------------------------------------------

def load_meta(data_dir: str | Path) -> dict:
    d = Path(data_dir)
    meta_path = d / "dataset.json"
    if not meta_path.is_file():
        raise UserError(f"{d} is not a dataset dir (no dataset.json); create one with `tunelab data prepare`")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path} is corrupt: {err}") from None


def load_split(data_dir: str | Path, split: str) -> list[dict]:
    """Rows {"text", "label"} of one split of a prepared dataset dir."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    load_meta(data_dir)
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; prepare the dataset again")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows
