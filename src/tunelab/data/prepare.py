"""`tunelab data prepare`: source -> dataset dir, with every row accounted for.

Pipeline: read -> pick text/label columns -> clean (ftfy, Unicode, invisible characters, social
text, whitespace) -> redact PII -> length and label checks -> exact de-dup -> near de-dup (MinHash
LSH) -> optional seeded sample -> split (stratified and group-aware, or an existing split column) ->
write `train/validation/test.jsonl`, `rejected.jsonl` (source line + reason for every dropped row),
`conflicts.json` (identical texts with different labels), `near_duplicates.jsonl` (each group) and
`dataset.json`. Invariant, checked before writing: rows_read == rows_kept + sum(dropped.values()).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from tunelab import __version__
from tunelab.artifacts import FolderLock, check_target, scratch_sibling, write_folder
from tunelab.assets import DATASET_COLUMNS, builtin_path, is_builtin
from tunelab.config import PrepareOptions
from tunelab.data.augment import augment
from tunelab.data.clean import dedup_key
from tunelab.data.dataset import DATASET_FILE, SPLITS, dataset_kind, fingerprint, write_jsonl
from tunelab.data import stream
from tunelab.data.dedup import exact_dedup
from tunelab.data.neardup import near_duplicates
from tunelab.data.pii import PiiRedactor
from tunelab.data.read import read_rows
from tunelab.data.rows import MALFORMED, RowFilter, _as_text, _excerpt
from tunelab.data.split import group_split, sample_rows
from tunelab.errors import UserError

NOT_A_DROP = {"not_sampled"}  # chosen by the user; does not count towards the drop rate


def resolve_source(source: str, opts: PrepareOptions) -> tuple[Path, str, str]:
    """-> (file path, text column, label column); built-in datasets know their own columns.

    `builtin:chatterbot` is the English dialogues; `builtin:chatterbot/LANGUAGE` another language."""
    if source.startswith("builtin:chatterbot"):
        language = source.partition("/")[2] or "english"
        path = builtin_path("builtin:chatterbot") / language
        if not path.is_dir():
            known = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
            raise UserError(f"no chatterbot language '{language}'; known: {', '.join(known)}")
        return path, opts.text_column or "text", opts.label_column or "label"
    if is_builtin(source):
        path = builtin_path(source)
        cols = DATASET_COLUMNS.get(source.removeprefix("builtin:"))
        if cols is None:
            raise UserError(f"{source} is not a dataset")
        return path, opts.text_column or cols["text"], opts.label_column or cols["label"]
    return Path(source), opts.text_column or "text", opts.label_column or "label"


def _check_columns(path: Path, columns: list[str], wanted: dict[str, str | None]) -> None:
    for role, col in wanted.items():
        if col and columns and col not in columns:
            raise UserError(f"{path}: no {role} column '{col}'; columns are: {', '.join(columns)} "
                            f"(choose with --{role}-column)")


def collect_rows(path: Path, rows, text_col: str, label_col: str, opts: PrepareOptions
                 ) -> tuple[list[dict], list[dict], dict]:
    """Read, clean and check -> (rows kept so far, rejected rows, counters). Rows carry `_line`.

    A rejected row keeps a redacted excerpt of its source text. Those redactions are not counted in `pii.*`:
    the counters count what redaction did to the rows it cleaned, and a row cleaned then rejected would count
    twice."""
    keep = RowFilter(opts, text_col, label_col)
    excerpt_pii = PiiRedactor(opts.pii.types) if opts.pii.enabled else None
    kept, rejected = [], []
    counters: Counter = Counter()
    for row in rows:
        counters["rows_read"] += 1
        counters["invalid_utf8_replaced"] += row.invalid_utf8
        example, reason = keep(row)
        if example is not None:
            kept.append(example)
            continue
        if opts.strict and reason in MALFORMED:
            raise UserError(f"{path}:{row.line}: {reason} (--strict stops at the first malformed row)")
        raw = _as_text(keep.excerpt_source(row.fields, text_col))
        rejected.append({"line": row.line, "reason": reason, "text": _excerpt(raw, excerpt_pii)})
    counters.update({f"clean.{k}": v for k, v in keep.cleaner.counts.items()})
    if keep.pii is not None:
        counters.update({f"pii.{k}": v for k, v in keep.pii.counts.items()})
    return kept, rejected, counters


def token_length_filter(rows: list[dict], cfg) -> tuple[list[dict], dict[str, list[dict]]]:
    """Drop rows outside [min_tokens, max_tokens] counted with `cfg.tokenizer` -> (kept, {reason: rows})."""
    from tunelab.models import load_tokenizer  # loads torch (~1.2 s): only a token-length filter needs it

    tok = load_tokenizer(cfg.tokenizer)
    kept, dropped = [], {"too_short_tokens": [], "too_long_tokens": []}
    batch = 4096
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        ids = tok([r["text"] for r in chunk], add_special_tokens=False, return_attention_mask=False,
                  return_token_type_ids=False)["input_ids"]
        for r, n in zip(chunk, map(len, ids)):
            if cfg.min_tokens and n < cfg.min_tokens:
                dropped["too_short_tokens"].append(r)
            elif cfg.max_tokens and n > cfg.max_tokens:
                dropped["too_long_tokens"].append(r)
            else:
                kept.append(r)
    return kept, dropped


def near_dedup(rows: list[dict], opts: PrepareOptions) -> tuple[list[dict], list[dict], list[dict], int]:
    """-> (kept rows with `_group`, dropped near-duplicates, group records, LSH candidate count).

    A group whose labels agree keeps its first row (`near_action: drop`) or all rows (`group`); a
    group with conflicting labels keeps all its rows. Kept members of a group share `_group`, so the
    split puts them on the same side."""
    d, kind = opts.dedup, dataset_kind(opts.task)
    res = near_duplicates([r[kind.near_on] for r in rows], d.threshold, d.ngram, d.num_perm, opts.seed + 1)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(res.group.tolist()):
        members.setdefault(g, []).append(i)
    kept_idx, dropped, groups = [], [], []
    for g, idx in members.items():
        if len(idx) == 1:
            kept_idx.append(idx[0])
            continue
        labels = sorted({rows[i]["label"] for i in idx})
        conflict = len(labels) > 1
        keep_all = conflict or (kind.near_action or d.near_action) == "group"
        kept_idx += idx if keep_all else idx[:1]
        dropped += [] if keep_all else [rows[i] for i in idx[1:]]
        groups.append({"lines": [rows[i]["_line"] for i in idx], "labels": labels,
                       "conflicting_labels": conflict, "kept": "all" if keep_all else rows[idx[0]]["_line"]})
    kept = []
    for i in sorted(kept_idx):
        rows[i]["_group"] = int(res.group[i])
        kept.append(rows[i])
    return kept, dropped, groups, res.candidates


def join_groups(rows: list[dict], field: str) -> None:
    """Give rows whose `field` texts are the same (case- and whitespace-insensitive), or that share a near-duplicate
    `_group`, one `_group` (in place, transitively): the split keeps each group on one side."""
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        keys = [("field", dedup_key(r[field]))] + ([("near", r["_group"])] if "_group" in r else [])
        for key in keys:
            parent[root(i)] = root(first.setdefault(key, i))
    for i, r in enumerate(rows):
        r["_group"] = ("joined", root(i))


def _check_drop_rate(report: dict, opts: PrepareOptions, path: Path) -> None:
    dropped = {k: v for k, v in report["dropped"].items() if k not in NOT_A_DROP}
    rate = sum(dropped.values()) / max(1, report["rows_read"])
    if rate > opts.max_drop_rate:
        top = ", ".join(f"{k}={v:,}" for k, v in Counter(dropped).most_common(3))
        raise UserError(f"{path}: {rate:.1%} of {report['rows_read']:,} rows would be dropped (limit "
                        f"{opts.max_drop_rate:.0%}; raise it with --max-drop-rate); top reasons: {top}")


def prepare(source: str, out: str | Path, opts: PrepareOptions | None = None, overwrite: bool = False,
            workers: int | None = None, streaming: bool | None = None) -> dict:
    """Build a dataset dir from `source` and return its `dataset.json` content.

    `out` follows the folder rule (tunelab.artifacts): a folder tunelab did not write is refused, an existing
    dataset is replaced only with `overwrite`, and then only once the new one is complete. The dataset dir
    is locked for the whole run (one writer). `streaming` (default: wherever the options allow it,
    `stream.streamable`) runs the streaming pipeline with `workers` processes (default `stream.auto_workers`);
    `streaming=False` the in-memory one. Both write the same dataset dir."""
    opts = opts or PrepareOptions()
    out = Path(out)
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    if streaming and not stream.streamable(opts):
        raise UserError(f"streaming preparation covers --task {'/'.join(stream.STREAM_KINDS)} without a token-length "
                        "filter, --max-rows or augmentation")
    check_target(out, "dataset", overwrite=True)  # a folder tunelab did not write: refused before the work
    with FolderLock(out):
        check_target(out, "dataset", overwrite)  # an earlier dataset: decided holding the lock
        path, text_col, label_col = resolve_source(source, opts)
        columns, rows = read_rows(path)
        named = {"text": text_col, "label": label_col}
        wanted = {role: named[role] for role in dataset_kind(opts.task).columns}
        _check_columns(path, columns, {**wanted, "split": opts.split_column})
        if streaming is False or not stream.streamable(opts):
            return _prepare(source, (path, text_col, label_col), rows, out, opts, overwrite)
        return _prepare_streaming(source, (path, text_col, label_col), rows, out, opts, overwrite,
                                  workers or stream.auto_workers(path))


def _prepare(source: str, resolved: tuple[Path, str, str], source_rows, out: Path, opts: PrepareOptions,
             overwrite: bool) -> dict:
    path, text_col, label_col = resolved
    rows, rejected, counters = collect_rows(path, source_rows, text_col, label_col, opts)

    def reject(dropped: list[dict], reason: str) -> None:
        rejected.extend({"line": r["_line"], "reason": reason, "text": r["text"]} for r in dropped)

    conflicts, groups, candidates = [], [], 0
    if opts.clean.min_tokens or opts.clean.max_tokens:
        rows, too_short_or_long = token_length_filter(rows, opts.clean)
        for reason, dropped in too_short_or_long.items():
            reject(dropped, reason)
    kind = dataset_kind(opts.task)
    if opts.dedup.exact:
        rows, dup_dropped, conflicts = exact_dedup(rows, kind.dedup_on)
        for reason, dropped in dup_dropped.items():
            reject(dropped, reason)
    if opts.dedup.near and rows:
        rows, near_dropped, groups, candidates = near_dedup(rows, opts)
        reject(near_dropped, "near_duplicate")
    if opts.max_rows:
        rows, rest = sample_rows(rows, opts.max_rows, "label", opts.seed)
        reject(rest, "not_sampled")
    reasons = Counter(r["reason"] for r in rejected)
    if not rows:
        raise _no_rows(path, counters, reasons)
    if kind.group_by:
        join_groups(rows, kind.group_by)
    splits, augmentation = _split(rows, opts)
    report = _report(counters, len(rows), reasons, conflicts, groups, candidates, augmentation)
    _check_drop_rate(report, opts, path)
    split_labels = {name: Counter(r["label"] for r in splits[name]) for name in SPLITS}
    meta = _meta(source, resolved, opts, kind.label_set(rows), split_labels, fingerprint(splits), report)
    with write_folder(out, "dataset", overwrite) as tmp:
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", (kind.output_row(r) for r in splits[name]))
        write_jsonl(tmp / "rejected.jsonl", sorted(rejected, key=lambda r: r["line"]))
        _write_records(tmp, groups, conflicts, meta)
    return meta


def _prepare_streaming(source: str, resolved: tuple[Path, str, str], source_rows, out: Path, opts: PrepareOptions,
                       overwrite: bool, workers: int) -> dict:
    """`_prepare` by streaming (tunelab.data.stream): rows in batches through `workers` processes, de-duplication
    on hashes and spilled signatures; the same dataset dir."""
    path, text_col, label_col = resolved
    kind = dataset_kind(opts.task)
    with scratch_sibling(out) as scratch, stream.Workers(workers, (str(path), text_col, label_col, opts)) as pool:
        spill = stream.Spill(scratch)
        try:
            for chunk in pool.chunks(source_rows):
                spill.add(chunk)
        finally:
            spill.close()
        dec = stream.decide(spill, opts, pool)
        reasons = spill.reasons.copy()
        for reason, idx in dec.dropped:
            if len(idx):
                reasons[reason] += len(idx)
        if not len(dec.final):
            raise _no_rows(path, spill.counters, reasons)
        order = stream.split_order(spill, dec, opts)
        report = _report(spill.counters, len(dec.final), reasons, dec.conflicts, dec.groups, dec.candidates, None)
        _check_drop_rate(report, opts, path)
        split_labels = {name: stream.label_counts(spill, order[name]) for name in SPLITS}
        labels = sorted({label for c in split_labels.values() for label in c}) if kind.labelled else []
        with write_folder(out, "dataset", overwrite) as tmp:
            fp = stream.write_splits(spill, order, tmp)
            stream.write_rejected(spill, dec, tmp / "rejected.jsonl")
            meta = _meta(source, resolved, opts, labels, split_labels, fp, report)
            _write_records(tmp, dec.groups, dec.conflicts, meta)
    return meta


def _no_rows(path: Path, counters: Counter, reasons: Counter) -> UserError:
    return UserError(f"no usable rows in {path} (read {counters['rows_read']}; dropped: "
                     + ", ".join(f"{k}={v}" for k, v in reasons.most_common(3)) + ")")


def _meta(source: str, resolved: tuple[Path, str, str], opts: PrepareOptions, labels: list[str],
          split_labels: dict[str, Counter], fp: str, report: dict) -> dict:
    """`dataset.json`'s content; `split_labels`: each split's label counts."""
    path, text_col, label_col = resolved
    kind = dataset_kind(opts.task)
    return {
        "kind": "dataset", "task": kind.name, "fields": list(kind.fields), "labels": labels,
        "splits": {name: sum(split_labels[name].values()) for name in SPLITS},
        "class_balance": {name: dict(sorted(split_labels[name].items())) for name in SPLITS}
        if kind.labelled else {},
        "fingerprint": fp,
        "source": {"path": str(source) if is_builtin(source) else str(path.resolve()),
                   "text_column": text_col, "label_column": label_col},
        "options": opts.model_dump(mode="json"),
        "report": report, "warnings": dataset_warnings(opts, labels, split_labels, label_col),
        "tunelab_version": __version__,
    }


def _write_records(tmp: Path, groups: list[dict], conflicts: list[dict], meta: dict) -> None:
    write_jsonl(tmp / "near_duplicates.jsonl", groups)
    (tmp / "conflicts.json").write_text(json.dumps(conflicts, ensure_ascii=False, indent=1))
    (tmp / DATASET_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2))


def _split(rows: list[dict], opts: PrepareOptions) -> tuple[dict[str, list[dict]], dict | None]:
    """The splits (an existing split column, or stratified by label for classification and random otherwise,
    near-duplicate groups kept together), and the train split's augmentation when asked -> (splits, its report)."""
    if opts.split_column:
        splits = {name: [r for r in rows if r["_split"] == name] for name in SPLITS}
    else:
        splits = group_split(rows, "label", opts.val_ratio, opts.test_ratio, opts.seed)
    if not opts.augment.enabled:
        return splits, None
    if not dataset_kind(opts.task).labelled:
        raise UserError("augment.enabled works for --task classification only")
    new_rows, augmentation = augment(splits["train"], opts.augment, opts.seed)
    merged = splits["train"] + new_rows
    order = np.random.default_rng(opts.seed).permutation(len(merged))
    splits["train"] = [merged[i] for i in order]
    return splits, augmentation


def _report(counters: Counter, rows_kept: int, reasons: Counter, conflicts: list, groups: list[dict],
            candidates: int, augmentation: dict | None) -> dict:
    """The preparation's accounting: rows read, kept and dropped by reason (`reasons`: counts in order of first
    rejection), what cleaning and redaction changed, duplicates; checked to add up (rows read == kept + dropped)."""
    dropped = dict(reasons.most_common())
    report = {"rows_read": counters["rows_read"], "rows_kept": rows_kept, "dropped": dropped,
              "repaired": {"invalid_utf8_replaced": counters["invalid_utf8_replaced"]},
              "steps": {k: v for k, v in sorted(counters.items()) if k.startswith("clean.")},
              "pii": {k.removeprefix("pii."): v for k, v in sorted(counters.items()) if k.startswith("pii.")},
              "duplicates": {"exact_dropped": dropped.get("duplicate", 0),
                             "exact_conflicting_groups": len(conflicts),
                             "near_groups": len(groups), "near_dropped": dropped.get("near_duplicate", 0),
                             "near_conflicting_groups": sum(g["conflicting_labels"] for g in groups),
                             "near_candidates_checked": candidates}}
    if augmentation is not None:
        report["augmentation"] = augmentation  # extra train rows; not part of rows_read / rows_kept
    if report["rows_read"] != report["rows_kept"] + sum(dropped.values()):
        raise AssertionError(f"row accounting does not add up: {report}")
    return report


MIN_ROWS = 100  # fewer rows in all: scores move by whole points with one row, and a fine-tuned model rarely learns
MIN_LABEL_TRAIN_ROWS = 2  # fewer train rows of a label: the model cannot learn it, and a baseline can't either


def dataset_warnings(opts: PrepareOptions, labels: list[str], split_labels: dict[str, Counter],
                     label_column: str | None = None) -> list[str]:
    """What makes the dataset unable to support its task (one sentence each, with what to do), or []:
    a single label (classification) or no entity tags (ner), a label with fewer than MIN_LABEL_TRAIN_ROWS
    train rows, an empty split, fewer than MIN_ROWS rows in all. Written into `dataset.json` as `warnings`."""
    out, kind = [], dataset_kind(opts.task)
    if kind.labelled and len(labels) == 1:
        column = label_column or opts.label_column or "label"
        out.append(f"only one label ('{labels[0]}'): a classifier needs at least two, and `tunelab train` refuses "
                   f"this dataset; check the label column ('{column}'; another with --label-column) or add rows "
                   "of the other labels")
    elif kind.labelled:
        counts = split_labels["train"]
        rare = [label for label in labels if counts[label] < MIN_LABEL_TRAIN_ROWS]
        if rare:
            out.append(f"too few train rows (fewer than {MIN_LABEL_TRAIN_ROWS}) for {len(rare)} label(s): "
                       + ", ".join(f"'{label}' ({counts[label]})" for label in rare[:5])
                       + (", ..." if len(rare) > 5 else "")
                       + ": a model cannot learn a label from that; add rows of it, or drop it")
    if kind.tagged and labels == ["O"]:
        out.append("no entity tags (every token is O): a token classifier has nothing to learn")
    total = sum(sum(c.values()) for c in split_labels.values())
    needs = {"train": "`tunelab train` has nothing to train on",
             "validation": "`tunelab train` needs validation rows to choose its best step",
             "test": "`tunelab eval` has nothing to score (it would need --split validation, which chose the model)"}
    for name, flag in (("train", None), ("validation", "--val-ratio"), ("test", "--test-ratio")):
        if sum(split_labels[name].values()):
            continue
        if opts.split_column:
            why, fix = f"no row has split '{name}' in column '{opts.split_column}'", "label some rows as " + name
        elif flag and getattr(opts, flag[2:].replace("-", "_")) == 0:
            why, fix = f"{flag} 0", f"raise {flag} (e.g. 0.1)"
        else:
            why, fix = f"{total:,} rows are too few to cut it", "add rows"
        out.append(f"the {name} split is empty ({why}): {needs[name]}; {fix}")
    if total < MIN_ROWS:
        per = " per label" if kind.labelled else ""
        out.append(f"only {total:,} rows in all: too few to fine-tune or to compare with a baseline (a score moves "
                   f"by whole points with one row); a few hundred rows{per} is a usual minimum")
    return out
