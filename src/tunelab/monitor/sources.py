"""Where documents come from: a folder of JSONL/CSV files (new files and lines appended to them), standard input,
and POST /ingest (in `http.py`). A source hands the pipeline `Work`: raw documents, and for a file the position
after them, which the pipeline commits with them (see `store.Store.ingest`).

A folder's files are read from their committed position, complete lines only (a line still being written waits
for its newline; in a CSV file, a quoted field running over lines waits for its closing quote). A file whose first
line changed (replaced under the same name) or that became shorter than its position is read again from the start
(its documents already stored count as duplicates, not twice).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.monitor.documents import Rejected

log = logging.getLogger("tunelab.monitor")

MAX_LINE_BYTES = 1 << 20  # a longer line is one rejected document (line_too_long)
BYTES_PER_DOC = 4096  # read per round: this per document wanted (at least 64 KiB), more only for one long line


@dataclass
class Work:
    """Raw documents (dicts, or `Rejected` for lines that are no document), the source they came from, and for a
    file the position after them; `done` (optional) receives the pipeline's counts once they are committed."""

    items: list
    source: str
    position: tuple[str, int, str] | None = None
    done: Future | None = field(default=None, repr=False)


def _fingerprint(first_line: bytes) -> str:
    return hashlib.sha1(first_line[:1024]).hexdigest()


class FolderReader:
    """Reads new lines of the folder's files; `poll()` -> `Work` items, one per file with new lines."""

    def __init__(self, path: Path, patterns: list[str], store, max_docs: int):
        self.path, self.patterns, self.store, self.max_docs = Path(path), patterns, store, max_docs
        self.positions: dict[str, tuple[int, str]] = {}

    def files(self) -> list[Path]:
        found = {p for pattern in self.patterns for p in self.path.glob(pattern) if p.is_file()}
        return sorted(found)

    def poll(self) -> list[Work]:
        work = []
        for f in self.files():
            try:
                w = self._read(f)
            except OSError as err:  # removed or unreadable meanwhile: tried again next round
                log.warning("cannot read %s: %s", f, err)
                continue
            if w is not None:
                work.append(w)
        return work

    def committed(self, work: Work) -> None:
        key, offset, fp = work.position
        self.positions[key] = (offset, fp)

    def _start(self, key: str, size: int, first: bytes) -> int:
        known = self.positions.get(key)
        if known is None:
            known = self.store.position(key)
        if known is None:
            return 0
        offset, fp = known
        if fp != _fingerprint(first) or offset > size:
            log.warning("%s was replaced or shortened: reading it again from the start (stored documents are "
                        "skipped as duplicates)", key)
            return 0
        return offset

    def _read(self, path: Path) -> Work | None:
        key = str(path.resolve())
        csv_file = path.suffix.lower() in (".csv", ".tsv")
        with open(path, "rb") as f:
            first = f.readline(MAX_LINE_BYTES)
            if not first.endswith(b"\n") and len(first) < MAX_LINE_BYTES:
                return None  # not even one complete line yet (an over-long one is skipped below)
            size = f.seek(0, io.SEEK_END)
            offset = self._start(key, size, first)
            if csv_file and offset == 0:
                offset = len(first)
            if offset >= size:
                return None
            f.seek(offset)
            chunk = f.read(max(1 << 16, self.max_docs * BYTES_PER_DOC))
            if b"\n" not in chunk and offset + len(chunk) < size:  # one line longer than that: up to the limit
                chunk += f.read(MAX_LINE_BYTES - len(chunk))
                if b"\n" not in chunk:  # over the limit: skipped whole, once its newline is there
                    end = _next_newline(f)
                    return None if end is None else Work([Rejected("line_too_long")], path.name,
                                                         (key, end, _fingerprint(first)))
        items, used = self._parse(chunk, first if csv_file else None, path.suffix.lower() == ".tsv")
        if used == 0:
            return None
        return Work(items, path.name, (key, offset + used, _fingerprint(first)))

    def _parse(self, chunk: bytes, header: bytes | None, tsv: bool) -> tuple[list, int]:
        """Documents from the complete lines of `chunk` (at most `max_docs`) -> (items, bytes used)."""
        end = chunk.rfind(b"\n") + 1
        items, used = [], 0
        lines = chunk[:end].splitlines(keepends=True)
        if header is None:
            for line in lines:
                if len(items) >= self.max_docs:
                    break
                used += len(line)
                if line.strip():
                    items.append(_json_line(line))
            return items, used
        columns = next(csv.reader([header.decode("utf-8-sig", "replace")], delimiter="\t" if tsv else ","))
        record = b""
        for line in lines:
            record += line
            if record.count(b'"') % 2:  # inside a quoted field: the record goes on
                continue
            if len(items) >= self.max_docs:
                break
            used += len(record)
            if record.strip():
                items.append(_csv_record(record, columns, tsv))
            record = b""
        return items, used


def _next_newline(f) -> int | None:
    """The file offset just after the next newline from `f`'s position, or None before the end of the file."""
    while True:
        block = f.tell(), f.read(1 << 20)
        if not block[1]:
            return None
        nl = block[1].find(b"\n")
        if nl >= 0:
            return block[0] + nl + 1


def _json_line(line: bytes):
    if len(line) > MAX_LINE_BYTES:
        return Rejected("line_too_long")
    try:
        return json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return Rejected("not_json")


def _csv_record(record: bytes, columns: list[str], tsv: bool):
    try:
        values = next(csv.reader([record.decode("utf-8", "replace")], delimiter="\t" if tsv else ",", strict=True))
    except (csv.Error, StopIteration):
        return Rejected("bad_csv_row")
    if len(values) != len(columns):
        return Rejected("bad_csv_row", f"{len(values)} fields, the header has {len(columns)}")
    return dict(zip(columns, values))


class FolderSource(threading.Thread):
    """Polls a folder and hands its new lines to `submit`, waiting for each file's work to commit before reading on."""

    def __init__(self, reader: FolderReader, submit, poll_s: float, stop: threading.Event):
        super().__init__(name="monitor-folder", daemon=True)
        self.reader, self.submit, self.poll_s, self.stop_event = reader, submit, poll_s, stop

    def run(self) -> None:
        while not self.stop_event.is_set():
            work = self.reader.poll()
            for w in work:
                w.done = Future()
                self.submit(w)
                try:
                    w.done.result()
                except Exception as err:  # noqa: BLE001 - the pipeline logged it; read again from the position
                    log.error("ingest of %s failed: %s", w.source, err)
                    self.stop_event.wait(self.poll_s)
                    break
                self.reader.committed(w)
                if self.stop_event.is_set():
                    return
            if not work:
                self.stop_event.wait(self.poll_s)


class StdinSource(threading.Thread):
    """JSON lines from a binary stream, each handed on as it arrives (the pipeline batches them); `finished` is set
    at the end of the stream."""

    def __init__(self, stream, submit, stop: threading.Event):
        super().__init__(name="monitor-stdin", daemon=True)
        self.stream, self.submit, self.stop_event = stream, submit, stop
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                line = self.stream.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # the rest of the over-long line
                        line = self.stream.readline(MAX_LINE_BYTES)
                    self.submit(Work([Rejected("line_too_long")], "stdin"))
                elif line.strip():
                    self.submit(Work([_json_line(line)], "stdin"))
        finally:
            self.finished.set()
