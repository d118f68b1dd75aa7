"""Streaming, parallel `data prepare`: the dataset dir the in-memory pipeline writes, byte for byte, in bounded memory.

Pass 1, in worker processes: the parent reads the source in batches of rows; each worker cleans, redacts and checks
a batch (`RowFilter`) and computes, for every kept row, what de-duplication needs: a 128-bit hash of its de-dup
key, its MinHash signature (8-bit, `neardup.bbit`) and LSH band keys, plus its written forms (split-file line,
fingerprint entry, text). The parent appends those to files in a scratch folder beside the output (one per kind of
record, one per LSH band) and keeps only fixed-size arrays per row (source line, label, key hash, file offsets):
tens of bytes a row, whatever the text length.
Pass 2: exact de-duplication in the parent, by sorting the key hashes; near de-duplication in the workers, band by
band from the band files, then the candidate pairs by ranges of their first row, checked against signatures read
back and shingles recomputed from the spilled texts of those rows only; the split (`split_units`, as the in-memory
path); the split files and `rejected.jsonl` copied from the spilled lines.

Kinds whose decisions need every row in memory (ner's tag set, retrieval's query groups) and options that do (a
token-length filter, sampling, augmentation) keep the in-memory pipeline (`prepare.py`).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunelab.artifacts import release_inherited_locks
from tunelab.data.clean import dedup_key
from tunelab.data.dataset import SPLITS, dataset_kind
from tunelab.data.neardup import (band_keys, band_pairs, bbit, code_pairs, exact_jaccard, groups_of, has_shingles,
                                  lsh_params, minhash, pair_codes, plausible_mask, shingles)
from tunelab.data.pii import PiiRedactor
from tunelab.data.rows import MALFORMED, RowFilter, _as_text, _excerpt
from tunelab.data.split import split_units
from tunelab.errors import UserError

BATCH_ROWS = 4096
STREAM_KINDS = ("classification", "text", "sft")


def streamable(opts) -> bool:
    """Whether `opts` can be prepared by streaming (else the in-memory pipeline)."""
    return (opts.task in STREAM_KINDS and not (opts.clean.min_tokens or opts.clean.max_tokens)
            and not opts.max_rows and not opts.augment.enabled)


def auto_workers(path: Path) -> int:
    """Worker processes for a source: one (in-process) below 16 MB, else up to the CPUs there are (at most 8)."""
    try:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    except OSError:
        size = 0
    return 1 if size < 16 << 20 else max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                 else os.cpu_count() or 1))


# ---- pass 1: one batch of source rows -> a Chunk (in a worker) ------------------------------------------------

@dataclass
class Chunk:
    """What a worker returns for one batch: counters, rejected rows' records, and per kept row its arrays and
    spilled bytes (`blob` holds each kept row's split line, fingerprint entry and text JSON; `seg` their lengths)."""

    counters: Counter
    reasons: list[str] = field(default_factory=list)
    rejected_lines: list[int] = field(default_factory=list)
    rejected_blob: bytes = b""
    rejected_len: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    labels: list = field(default_factory=list)
    splits: list = field(default_factory=list)
    blob: bytes = b""
    seg: np.ndarray | None = None
    key: np.ndarray | None = None
    sig: np.ndarray | None = None  # 8-bit MinHash signatures (`neardup.bbit`)
    bands: np.ndarray | None = None
    valid: np.ndarray | None = None


class BatchWorker:
    """Turns batches of `Row`s into `Chunk`s: the in-memory pipeline's row filter, plus the per-row work of
    de-duplication. One per worker process (or one in the parent with a single worker)."""

    def __init__(self, path: str, text_col: str, label_col: str, opts):
        self.path, self.text_col, self.opts = path, text_col, opts
        self.kind = dataset_kind(opts.task)
        self.keep = RowFilter(opts, text_col, label_col)
        self.excerpt_pii = PiiRedactor(opts.pii.types) if opts.pii.enabled else None
        self.lsh = lsh_params(opts.dedup.threshold, opts.dedup.num_perm)

    def __call__(self, rows: list) -> Chunk:
        chunk, kept = Chunk(Counter()), []
        rejected = []
        for row in rows:
            chunk.counters["rows_read"] += 1
            chunk.counters["invalid_utf8_replaced"] += row.invalid_utf8
            example, reason = self.keep(row)
            if example is not None:
                kept.append(example)
                continue
            if self.opts.strict and reason in MALFORMED:
                raise UserError(f"{self.path}:{row.line}: {reason} (--strict stops at the first malformed row)")
            raw = _as_text(self.keep.excerpt_source(row.fields, self.text_col))
            record = {"line": row.line, "reason": reason, "text": _excerpt(raw, self.excerpt_pii)}
            rejected.append(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            chunk.reasons.append(reason)
            chunk.rejected_lines.append(row.line)
        chunk.rejected_blob = b"".join(rejected)
        chunk.rejected_len = [len(r) for r in rejected]
        chunk.counters.update({f"clean.{k}": v for k, v in self.keep.cleaner.counts.items()})
        self.keep.cleaner.counts.clear()
        if self.keep.pii is not None:
            chunk.counters.update({f"pii.{k}": v for k, v in self.keep.pii.counts.items()})
            self.keep.pii.counts.clear()
        self._kept(chunk, kept)
        return chunk

    def _kept(self, chunk: Chunk, kept: list[dict]) -> None:
        kind, d = self.kind, self.opts.dedup
        parts, seg = [], np.zeros((len(kept), 3), dtype=np.int32)
        for i, r in enumerate(kept):
            negatives = [r["negatives"]] if r.get("negatives") else []
            pieces = (json.dumps(kind.output_row(r), ensure_ascii=False).encode() + b"\n",
                      json.dumps([r["text"], r["label"], r.get("messages"), r.get("tags"), *negatives],
                                 ensure_ascii=False).encode(),
                      json.dumps(r["text"], ensure_ascii=False).encode())
            parts.extend(pieces)
            seg[i] = [len(p) for p in pieces]
        chunk.blob, chunk.seg = b"".join(parts), seg
        chunk.lines = [r["_line"] for r in kept]
        chunk.labels = [r["label"] for r in kept]
        chunk.splits = [r.get("_split") for r in kept] if self.opts.split_column else []
        if d.exact:
            digests = b"".join(hashlib.blake2b(dedup_key(r[kind.dedup_on]).encode(), digest_size=16).digest()
                               for r in kept)
            chunk.key = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
        if d.near:
            h, offsets = shingles([r[kind.near_on] for r in kept], d.ngram)
            sig = minhash(h, offsets, d.num_perm, self.opts.seed + 1)
            chunk.sig, chunk.bands = bbit(sig), band_keys(sig, *self.lsh)
            chunk.valid = has_shingles(sig)


_WORKER: BatchWorker | None = None


def _init_worker(args: tuple, parent: int) -> None:
    """A worker process starts: it dies with its parent (Linux), leaves Ctrl-C to the parent, and holds none of the
    parent's folder locks."""
    global _WORKER
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphans when the parent is killed
        if os.getppid() != parent:  # the parent died before that
            os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    release_inherited_locks()
    _WORKER = BatchWorker(*args)


def _run_batch(rows: list) -> Chunk:
    return _WORKER(rows)


def _batches(rows: Iterator, size: int) -> Iterator[list]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Workers:
    """`n` worker processes, each holding a `BatchWorker(*worker_args)`, for both passes; with n == 1 everything runs
    in the calling process. A worker that dies (killed, out of memory) fails the run with one message, never a hang."""

    def __init__(self, n: int, worker_args: tuple):
        self.n, self.worker_args, self.pool = n, worker_args, None

    def __enter__(self) -> "Workers":
        self.local = BatchWorker(*self.worker_args)  # here first: a configuration error is reported as itself
        if self.n > 1:
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ProcessPoolExecutor(self.n, mp_context=context, initializer=_init_worker,
                                            initargs=(self.worker_args, os.getpid()))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def chunks(self, rows: Iterator, batch_rows: int | None = None) -> Iterator[Chunk]:
        """The `Chunk` of each batch of `rows` (`batch_rows`, default BATCH_ROWS), in source order; at most two
        batches per worker in flight (the source is never read far ahead of the work)."""
        batches = _batches(rows, batch_rows or BATCH_ROWS)
        if self.pool is None:
            yield from map(self.local, batches)
            return
        pending: deque = deque()
        with self._died():
            for batch in batches:
                pending.append(self.pool.submit(_run_batch, batch))
                if len(pending) >= 2 * self.n:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def map(self, fn, items: list) -> list:
        """`[fn(x) for x in items]`, spread over the workers (`fn` a module-level function)."""
        if self.pool is None:
            return [fn(x) for x in items]
        with self._died():
            return list(self.pool.map(fn, items))

    @contextmanager
    def _died(self):
        try:
            yield
        except BrokenProcessPool:
            raise UserError(f"a data preparation worker process died (killed, or out of memory?); run again, with "
                            f"fewer --workers than {self.n} if memory is short") from None


# ---- the parent's side: spill files and per-row arrays --------------------------------------------------------

class Spill:
    """Pass 1's results: per-row arrays in memory, bytes in files under `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = {name: open(folder / name, "wb") for name in ("rows", "rejected", "sig")}
        self.counters: Counter = Counter()
        self.reasons: Counter = Counter()  # rejection reasons in order of first appearance (the report's order)
        self.label_names: list = []
        self._added = 0
        self._label_code: dict = {}
        self._lists: dict[str, list] = {k: [] for k in ("lines", "labels", "splits", "seg", "key", "valid",
                                                        "rej_lines", "rej_len")}

    def add(self, chunk: Chunk) -> None:
        self._added += 1
        if self._added % 64 == 0:
            release_free_memory()
        self.counters.update(chunk.counters)
        self.reasons.update(chunk.reasons)
        lists = self._lists
        lists["rej_lines"].append(np.asarray(chunk.rejected_lines, dtype=np.int64))
        lists["rej_len"].append(np.asarray(chunk.rejected_len, dtype=np.int64))
        self.files["rejected"].write(chunk.rejected_blob)
        if not chunk.lines:
            return
        code = self._label_code
        for label in set(chunk.labels) - code.keys():
            code[label] = len(self.label_names)
            self.label_names.append(label)
        lists["labels"].append(np.fromiter((code[x] for x in chunk.labels), np.int32, len(chunk.labels)))
        lists["lines"].append(np.asarray(chunk.lines, dtype=np.int64))
        lists["seg"].append(chunk.seg)
        if chunk.splits:
            lists["splits"].append(np.array([SPLITS.index(s) for s in chunk.splits], dtype=np.int8))
        self.files["rows"].write(chunk.blob)
        if chunk.key is not None:
            lists["key"].append(chunk.key)
        if chunk.sig is not None:
            lists["valid"].append(chunk.valid)
            self.files["sig"].write(chunk.sig.tobytes())
            for b in range(chunk.bands.shape[1]):  # one file per band (opened per batch: there may be hundreds)
                with open(self.folder / f"band{b}", "ab") as f:
                    f.write(np.ascontiguousarray(chunk.bands[:, b]).tobytes())

    def close(self) -> None:
        """Flush the files and turn the per-chunk lists into arrays (offsets into the files included)."""
        for f in self.files.values():
            f.close()

        def joined(name: str, dtype, shape=(0,)) -> np.ndarray:
            parts = self._lists.pop(name)
            return np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype)

        self.lines, self.labels = joined("lines", np.int64), joined("labels", np.int32)
        self.splits, self.key = joined("splits", np.int8), joined("key", np.uint64, (0, 2))
        self.valid, self.seg = joined("valid", bool), joined("seg", np.int32, (0, 3))
        self.row_offset = np.concatenate([[0], np.cumsum(self.seg.sum(axis=1, dtype=np.int64))]).astype(np.int64)
        self.rej_lines = joined("rej_lines", np.int64)
        self.rej_offset = np.concatenate([[0], np.cumsum(joined("rej_len", np.int64))]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lines)

    def reader(self, name: str) -> "_Reader":
        return _Reader(self.folder / name)

    def text_json(self, i: int, reader: "_Reader") -> bytes:
        """Kept row i's text (cleaned) as the JSON string spilled in the rows file."""
        return reader.read(int(self.row_offset[i] + self.seg[i, 0] + self.seg[i, 1]), int(self.seg[i, 2]))

    def text(self, i: int, reader: "_Reader") -> str:
        return json.loads(self.text_json(i, reader))


class _Reader:
    """Positioned reads from one spill file (os.pread: the page cache is not this process's memory)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def release_free_memory() -> None:
    """Hand freed heap back to the OS (glibc): results unpickled on the pool's thread leave freed blocks in that
    thread's arena, which would otherwise count as this process's memory for the whole run."""
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


# ---- pass 2: de-duplication and the split, on arrays -----------------------------------------------------------

@dataclass
class Decisions:
    """Pass 2's outcome over the kept rows of pass 1 (indices into `Spill`)."""

    final: np.ndarray  # rows kept, ascending
    unit: np.ndarray  # per final row: its split unit (near-duplicate group), numbered by first appearance
    dropped: list[tuple[str, np.ndarray]]  # (reason, rows), in the order the in-memory pipeline rejects them
    conflicts: list[dict]
    groups: list[dict]
    candidates: int


def exact_duplicates(spill: Spill) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """-> (kept mask, duplicate rows, conflicting-label rows, conflicting groups' members), as `dedup.exact_dedup`:
    in a group of equal keys the first row stays when labels agree, the whole group goes when they do not. Rows
    whose key's first half is unique are set aside first (one sort of 8 bytes a row); the rest are grouped."""
    n = len(spill)
    keep = np.ones(n, dtype=bool)
    none = np.zeros(0, np.int64)
    if n == 0:
        return keep, none, none, []
    first = spill.key[:, 0]
    order = np.argsort(first, kind="stable")
    same = first[order][1:] == first[order][:-1]
    shared = np.zeros(n, dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    rows = np.sort(order[shared])
    del order, same, shared
    if not len(rows):
        return keep, none, none, []
    key = spill.key[rows]
    order = np.lexsort((np.arange(len(rows)), key[:, 1], key[:, 0]))
    k = key[order]
    start = np.flatnonzero(np.concatenate([[True], (k[1:] != k[:-1]).any(axis=1)]))
    size = np.diff(np.concatenate([start, [len(rows)]]))
    labels = spill.labels[rows[order]]
    lo, hi = np.minimum.reduceat(labels, start), np.maximum.reduceat(labels, start)
    group_of = np.repeat(np.arange(len(start)), size)
    multi = size[group_of] > 1
    conflict = (lo != hi)[group_of] & multi
    later = multi & ~conflict & (np.arange(len(rows)) != start[group_of])
    keep[rows[order[later | conflict]]] = False
    conflicting = np.flatnonzero((lo != hi) & (size > 1))
    conflict_groups = sorted((np.sort(rows[order[start[g]:start[g] + size[g]]]) for g in conflicting.tolist()),
                             key=lambda m: m[0])
    return keep, np.sort(rows[order[later]]), np.sort(rows[order[conflict]]), conflict_groups


PARTITION_ROWS = 1_000_000  # one partition of candidate pairs (by pair code modulo) per this many rows
TASK_PAIRS = 1 << 21  # pairs per check task at most: bounds a worker's signatures and shingles in memory


@dataclass(frozen=True)
class NearJob:
    """What pass 2's near-duplicate tasks read: the scratch folder (band keys, 8-bit signatures, the rows file with
    `row_offset.npy` and `seg.npy` to find texts in it, `near_rows.npy`: the kept rows being grouped, `valid.npy`)
    and the settings."""

    folder: Path
    n: int  # rows being grouped; a pair (i, j) of them is coded i * n + j
    num_perm: int
    threshold: float
    ngram: int
    partitions: int  # the candidate pairs are handled in this many parts (code modulo), one at a time


def _band_task(args: tuple) -> None:
    """One band's star pairs -> their `pair_codes`, written to one file per partition (code modulo partitions:
    a bucket's pairs all share its smallest row, so ranges of first rows would be uneven)."""
    job, band = args
    rows = np.load(job.folder / "near_rows.npy")
    valid = np.load(job.folder / "valid.npy")[rows]
    codes = pair_codes(band_pairs(np.fromfile(job.folder / f"band{band}", dtype=np.uint64)[rows], valid), job.n)
    part_of = codes % job.partitions
    for part in range(job.partitions):
        np.save(job.folder / f"pairs-{band}-{part}.npy", codes[part_of == part])


def read_signatures(folder: Path, rows: np.ndarray, num_perm: int, block: int = 1 << 16) -> np.ndarray:
    """The 8-bit MinHash signatures of kept rows `rows` (sorted), read from the signature file block by block."""
    out = np.empty((len(rows), num_perm), dtype=np.uint8)
    total = (folder / "sig").stat().st_size // num_perm
    with open(folder / "sig", "rb") as f:
        for start in range(0, total, block):
            lo, hi = np.searchsorted(rows, [start, start + block])
            if lo == hi:
                continue
            f.seek(start * num_perm)
            count = min(block, total - start)
            data = np.fromfile(f, dtype=np.uint8, count=count * num_perm).reshape(count, num_perm)
            out[lo:hi] = data[rows[lo:hi] - start]
    return out


def read_shingles(folder: Path, rows: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """The shingles of kept rows `rows` -> (hashes, offsets), as `neardup.shingles` returns them, recomputed from
    their spilled texts (the field near de-duplication compares is `text` for every kind that streams: a
    document's shingles depend on its own text only)."""
    row_offset, seg = (np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("row_offset", "seg"))
    with _Reader(folder / "rows") as reader:
        texts = [json.loads(reader.read(int(row_offset[i] + seg[i, 0] + seg[i, 1]), int(seg[i, 2])))
                 for i in rows.tolist()]
    return shingles(texts, ngram)


def _check_task(args: tuple) -> np.ndarray:
    """Candidate pair codes -> those that are near-duplicates: the estimate from signatures rules out the far ones,
    the exact Jaccard of the shingle sets decides the rest (as `neardup.near_duplicates`)."""
    job, codes = args
    rows = np.load(job.folder / "near_rows.npy", mmap_mode="r")
    pairs = code_pairs(codes, job.n)
    docs = np.unique(pairs)
    sig = read_signatures(job.folder, np.asarray(rows[docs]), job.num_perm)
    keep = plausible_mask(sig, np.searchsorted(docs, pairs), job.threshold, job.num_perm)
    codes, pairs = codes[keep], pairs[keep]
    if not len(codes):
        return codes
    docs = np.unique(pairs)
    h, offsets = read_shingles(job.folder, np.asarray(rows[docs]), job.ngram)
    return codes[exact_jaccard(h, offsets, np.searchsorted(docs, pairs)) >= job.threshold]


def _distinct_codes(files: list[Path]) -> np.ndarray:
    """The distinct pair codes in `files` (removed once read), sorted: one buffer, sorted in place."""
    sizes = [np.load(f, mmap_mode="r").shape[0] for f in files]
    codes = np.empty(sum(sizes), dtype=np.int64)
    at = 0
    for f, size in zip(files, sizes):
        codes[at:at + size] = np.load(f)
        at += size
        f.unlink()
    codes.sort()
    new = np.empty(len(codes), dtype=bool)
    new[:1] = True
    np.not_equal(codes[1:], codes[:-1], out=new[1:])
    return codes[new]


def near_groups(spill: Spill, rows: np.ndarray, opts, workers: Workers) -> tuple[np.ndarray, int]:
    """The near-duplicate group of each of `rows` (named by its smallest member's position in `rows`) and the
    number of LSH candidate pairs, as `neardup.near_duplicates` finds them on those rows' texts. Bands, then the
    candidates part by part, go through the workers; the parent holds one part's pairs at a time."""
    d = opts.dedup
    bands, _ = lsh_params(d.threshold, d.num_perm)
    job = NearJob(spill.folder, len(rows), d.num_perm, d.threshold, d.ngram, -(-len(rows) // PARTITION_ROWS))
    np.save(job.folder / "near_rows.npy", rows)
    np.save(job.folder / "valid.npy", spill.valid)
    np.save(job.folder / "row_offset.npy", spill.row_offset)
    np.save(job.folder / "seg.npy", spill.seg)
    workers.map(_band_task, [(job, b) for b in range(bands)])
    candidates, kept = 0, []
    for part in range(job.partitions):
        codes = _distinct_codes([job.folder / f"pairs-{b}-{part}.npy" for b in range(bands)])
        candidates += len(codes)
        tasks = max(2 * workers.n, -(-len(codes) // TASK_PAIRS))
        kept += workers.map(_check_task, [(job, part) for part in np.array_split(codes, tasks)])
    kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return groups_of(len(rows), code_pairs(kept, len(rows))), candidates


def decide(spill: Spill, opts, workers: Workers) -> Decisions:
    """Exact and near de-duplication and the split units, over pass 1's arrays."""
    kind, d = dataset_kind(opts.task), opts.dedup
    rows = np.arange(len(spill))
    dropped, conflicts, groups, candidates = [], [], [], 0
    with spill.reader("rows") as reader:
        if d.exact:
            keep, dups, conflicting, conflict_groups = exact_duplicates(spill)
            dropped += [("duplicate", dups), ("conflicting_label_duplicate", conflicting)]
            for members in conflict_groups:
                conflicts.append({"text": spill.text(int(members[0]), reader),
                                  "labels": sorted({spill.label_names[c] for c in spill.labels[members].tolist()}),
                                  "lines": spill.lines[members].tolist()})
            rows = rows[keep]
        if not (d.near and len(rows)):
            return Decisions(rows, np.arange(len(rows)), dropped, conflicts, groups, candidates)
        group, candidates = near_groups(spill, rows, opts, workers)
    keep_all_action = (kind.near_action or d.near_action) == "group"
    multi = np.flatnonzero(np.bincount(group, minlength=len(rows))[group] > 1)
    multi = multi[np.argsort(group[multi], kind="stable")]
    starts = np.flatnonzero(np.concatenate([[True], group[multi][1:] != group[multi][:-1]])) if len(multi) else []
    keep = np.ones(len(rows), dtype=bool)
    for members in np.split(multi, starts[1:]) if len(multi) else []:
        labels = sorted({spill.label_names[c] for c in spill.labels[rows[members]].tolist()},
                        key=lambda x: (x is not None, x or ""))
        conflict = len(labels) > 1
        keep_all = conflict or keep_all_action
        if not keep_all:
            keep[members[1:]] = False
        lines = spill.lines[rows[members]].tolist()
        groups.append({"lines": lines, "labels": labels, "conflicting_labels": conflict,
                       "kept": "all" if keep_all else lines[0]})
    dropped.append(("near_duplicate", rows[~keep]))
    kept = np.flatnonzero(keep)
    group = group[kept]
    first = group == kept  # a group's smallest member is always kept: units in order of first appearance
    unit_of = np.zeros(len(rows), dtype=np.int64)
    unit_of[kept[first]] = np.arange(int(first.sum()))
    return Decisions(rows[keep], unit_of[group], dropped, conflicts, groups, candidates)


def split_order(spill: Spill, dec: Decisions, opts) -> dict[str, np.ndarray]:
    """Each split's rows (indices into `Spill`) in written order: an existing split column's rows in source order,
    else `split_units` on the near-duplicate groups, stratified by label."""
    if opts.split_column:
        code = spill.splits[dec.final]
        return {name: dec.final[code == c] for c, name in enumerate(SPLITS)}
    # units are numbered by first appearance: a unit's first row is where the running maximum grows
    firsts = np.flatnonzero(np.diff(np.maximum.accumulate(dec.unit), prepend=-1) > 0)
    names = [spill.label_names[c] or "" for c in range(len(spill.label_names))]
    rank = {name: r for r, name in enumerate(sorted(set(names)))}
    code_rank = np.array([rank[name] for name in names], dtype=np.int64)
    unit_label = code_rank[spill.labels[dec.final[firsts]]] if len(firsts) else np.zeros(0, np.int64)
    order = split_units(dec.unit, unit_label, opts.val_ratio, opts.test_ratio, opts.seed)
    return {name: dec.final[order[name]] for name in SPLITS}


def label_counts(spill: Spill, rows: np.ndarray) -> Counter:
    """The labels of `rows` counted (None for unlabelled kinds)."""
    counts = np.bincount(spill.labels[rows], minlength=len(spill.label_names))
    return Counter({spill.label_names[c]: int(n) for c, n in enumerate(counts.tolist()) if n})


# ---- writing: split files and rejected.jsonl from the spilled lines ---------------------------------------------

def write_splits(spill: Spill, order: dict[str, np.ndarray], folder: Path, buffer_rows: int = 4096) -> str:
    """Write `NAME.jsonl` of each split from the spilled lines -> the dataset fingerprint
    (`dataset.fingerprint`'s sha256 over the same entries)."""
    digest = hashlib.sha256()
    with spill.reader("rows") as reader:
        for name in SPLITS:
            prefix = json.dumps([name]).encode()[:-1] + b", "  # an entry is [name, text, label, ...]
            with open(folder / f"{name}.jsonl", "wb") as f:
                for start in range(0, len(order[name]), buffer_rows):
                    rows = order[name][start:start + buffer_rows]
                    lines, entries = [], []
                    for offset, a, b in zip(spill.row_offset[rows].tolist(), spill.seg[rows, 0].tolist(),
                                            spill.seg[rows, 1].tolist()):
                        data = reader.read(offset, a + b)
                        lines.append(data[:a])
                        entries.append(data[a + 1:])  # the spilled entry without its "[": the name goes first
                    f.write(b"".join(lines))
                    if entries:
                        digest.update(prefix + prefix.join(entries))
    return digest.hexdigest()[:16]


def write_rejected(spill: Spill, dec: Decisions, path: Path, buffer_rows: int = 4096) -> None:
    """`rejected.jsonl`: the rows the filter rejected (spilled records) and those de-duplication dropped (records
    built from their spilled text), by source line."""
    dropped = [(reason, rows) for reason, rows in dec.dropped if len(rows)]
    dedup_rows = np.concatenate([rows for _, rows in dropped]) if dropped else np.zeros(0, np.int64)
    dedup_reason = np.repeat(np.arange(len(dropped)), [len(rows) for _, rows in dropped])
    n_filtered = len(spill.rej_lines)
    lines = np.concatenate([spill.rej_lines, spill.lines[dedup_rows]])
    order = np.argsort(lines, kind="stable")
    with spill.reader("rejected") as rejected, spill.reader("rows") as rows, open(path, "wb") as f:
        for start in range(0, len(order), buffer_rows):
            buffer = []
            for k in order[start:start + buffer_rows].tolist():
                if k < n_filtered:
                    begin = int(spill.rej_offset[k])
                    buffer.append(rejected.read(begin, int(spill.rej_offset[k + 1]) - begin))
                    continue
                text = spill.text_json(int(dedup_rows[k - n_filtered]), rows)
                reason = dropped[dedup_reason[k - n_filtered]][0]
                buffer.append(b'{"line": %d, "reason": "%s", "text": %s}\n' % (int(lines[k]), reason.encode(), text))
            f.write(b"".join(buffer))
