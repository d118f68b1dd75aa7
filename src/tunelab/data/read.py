"""Readers: a source file -> a stream of `Row(line, fields)` with 1-based source line numbers.

Formats by suffix: .csv, .tsv, .jsonl/.ndjson, .json (array), .parquet, .txt (one document per
blank-line-separated paragraph, field `text`), .yml/.yaml (chatterbot dialogues: one row per
conversation, fields `conversation` and `category`); folders: a `datasets` save, or a folder of .txt /
.yml files (one document per .txt file, field `text`, or the dialogues of every .yml). Text is decoded as UTF-8;
invalid bytes become U+FFFD and the row is flagged (`Row.invalid_utf8`), never a crash. Lines that
cannot be parsed at all come back as rows with `error` set, so the caller can count and reject them.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import UserError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
           ".parquet": "parquet", ".txt": "txt", ".yml": "yaml", ".yaml": "yaml", ".conll": "conll",
           ".bio": "conll", ".iob": "conll"}


@dataclass
class Row:
    line: int
    fields: dict = field(default_factory=dict)
    error: str | None = None  # a reason code when the line could not be parsed
    invalid_utf8: bool = False

    def __reduce__(self):  # pickled as a tuple: batches of rows go to worker processes
        return Row, (self.line, self.fields, self.error, self.invalid_utf8)


def detect_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot read {path}: unknown file type '{path.suffix}' "
                        f"(supported: {', '.join(sorted(FORMATS))})")
    return fmt


def read_rows(path: str | Path) -> tuple[list[str], Iterator[Row]]:
    """Open `path` and return (column names, row iterator). Errors a user can cause are `UserError`s."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
            return _read_hf_saved(path)
        if any(path.rglob("*.txt")):
            return ["text", "file"], _read_txt_folder(path)
        if any(path.rglob("*.yml")):
            return ["conversation", "category"], _read_yaml_dialogues(sorted(path.rglob("*.yml")))
        raise UserError(f"{path} is a folder but not a saved `datasets` dataset nor a folder of .txt/.yml "
                        "files; give a CSV/TSV/JSONL/JSON/Parquet/TXT file or such a folder")
    fmt = detect_format(path)
    if fmt in ("csv", "tsv"):
        return _read_csv(path, "\t" if fmt == "tsv" else _sniff_delimiter(path))
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "json":
        return _read_json_array(path)
    if fmt == "txt":
        return ["text"], _read_txt_paragraphs(path)
    if fmt == "yaml":
        return ["conversation", "category"], _read_yaml_dialogues([path])
    if fmt == "conll":
        return ["tokens", "tags"], _read_conll(path)
    return _read_parquet(path)


def read_delimited(path: str | Path, delimiter: str) -> tuple[list[str], Iterator[Row]]:
    """A delimited text file whatever its suffix (e.g. RecBole's `.inter` / `.item` atomic files): (columns, rows)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    return _read_csv(path, delimiter)


def _text_stream(path: Path) -> io.TextIOWrapper:
    return io.TextIOWrapper(open(path, "rb"), encoding="utf-8-sig", errors="replace", newline="")


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], Iterator[Row]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    stream = _text_stream(path)
    reader = csv.reader(stream, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        stream.close()
        raise UserError(f"{path} is empty (no header row)") from None
    except csv.Error as err:
        stream.close()
        raise UserError(f"{path}: cannot parse the header row: {err}") from None
    header = [h.strip() for h in header]

    def rows() -> Iterator[Row]:
        with stream:
            start = reader.line_num + 1
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error:
                    yield Row(line=start, error="bad_csv_row")
                    start = reader.line_num + 1
                    continue
                line, start = start, reader.line_num + 1
                if not values:
                    continue  # a blank line is not a row
                if len(values) != len(header):
                    yield Row(line=line, error="wrong_field_count")
                    continue
                fields = dict(zip(header, values))
                yield Row(line=line, fields=fields, invalid_utf8=any("\ufffd" in v for v in values))

    return header, rows()


def _read_txt_paragraphs(path: Path) -> Iterator[Row]:
    """One row per paragraph (blank-line separated); `line` is the paragraph's first line."""
    with _text_stream(path) as f:
        buf, start = [], 0
        for n, line in enumerate(f, start=1):
            if line.strip():
                if not buf:
                    start = n
                buf.append(line)
            elif buf:
                text = "".join(buf)
                yield Row(line=start, fields={"text": text}, invalid_utf8="\ufffd" in text)
                buf = []
        if buf:
            text = "".join(buf)
            yield Row(line=start, fields={"text": text}, invalid_utf8="\ufffd" in text)


def _read_conll(path: Path) -> Iterator[Row]:
    """CoNLL-style: `TOKEN ... TAG` per line (first and last column), blank line between sentences,
    `-DOCSTART-` lines skipped; one row per sentence, `line` = its first line."""
    with _text_stream(path) as f:
        tokens, tags, start, bad = [], [], 0, False
        for n, line in enumerate(f, start=1):
            parts = line.split()
            if parts and parts[0] == "-DOCSTART-":
                continue
            if parts:
                if not tokens and not bad:
                    start = n
                if len(parts) < 2:
                    bad = True
                else:
                    tokens.append(parts[0])
                    tags.append(parts[-1])
                continue
            if tokens or bad:
                yield Row(line=start, error="bad_conll_line") if bad else Row(line=start, fields={
                    "tokens": tokens, "tags": tags})
            tokens, tags, bad = [], [], False
        if tokens or bad:
            yield Row(line=start, error="bad_conll_line") if bad else Row(line=start, fields={
                "tokens": tokens, "tags": tags})


def _read_txt_folder(path: Path) -> Iterator[Row]:
    """One row per .txt file (sorted by path); `line` numbers the files."""
    for n, f in enumerate(sorted(path.rglob("*.txt")), start=1):
        text = f.read_bytes().decode("utf-8-sig", errors="replace")
        yield Row(line=n, fields={"text": text, "file": str(f.relative_to(path))}, invalid_utf8="\ufffd" in text)


def _read_yaml_dialogues(files: list[Path]) -> Iterator[Row]:
    """chatterbot-corpus YAML: `conversations` is a list of turn lists; rows number conversations."""
    n = 0
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8", errors="replace")) or {}
        except yaml.YAMLError:
            n += 1
            yield Row(line=n, error="bad_yaml")
            continue
        category = ", ".join(map(str, doc.get("categories") or [])) or f.stem
        for conv in doc.get("conversations") or []:
            n += 1
            if isinstance(conv, list):
                yield Row(line=n, fields={"conversation": conv, "category": category})
            else:
                yield Row(line=n, error="not_a_conversation")


def _sniff_delimiter(path: Path) -> str:
    """The most frequent of , ; | TAB in the header line (a .csv file is not always comma-separated)."""
    with _text_stream(path) as f:
        header = f.readline()
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _read_hf_saved(path: Path) -> tuple[list[str], Iterator[Row]]:
    """A folder from `Dataset.save_to_disk` (or a DatasetDict: rows get a `split` column)."""
    from datasets import DatasetDict, load_from_disk  # ~1 s to import; only a saved HF dataset needs it

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UserError(f"cannot read the saved dataset in {path}: {err}") from None
    parts = list(ds.items()) if isinstance(ds, DatasetDict) else [(None, ds)]
    columns = list(parts[0][1].column_names) + (["split"] if isinstance(ds, DatasetDict) else [])

    def rows() -> Iterator[Row]:
        n = 0
        for split, part in parts:
            for batch in part.iter(batch_size=8192):
                keys = list(batch)
                for values in zip(*batch.values()):
                    n += 1
                    fields = dict(zip(keys, values))
                    if split is not None:
                        fields["split"] = split
                    yield Row(line=n, fields=fields)

    return columns, rows()


def _read_jsonl(path: Path) -> tuple[list[str], Iterator[Row]]:
    stream = _text_stream(path)
    first = None
    lines = enumerate(stream, start=1)
    for n, text in lines:
        if text.strip():
            first = (n, text)
            break
    if first is None:
        stream.close()
        raise UserError(f"{path} is empty (no JSON lines)")
    columns = _columns_of(parse_json_line(*first))

    def rows() -> Iterator[Row]:
        with stream:
            yield parse_json_line(*first)
            for n, text in lines:
                if text.strip():
                    yield parse_json_line(n, text)

    return columns, rows()


def parse_json_line(n: int, text: str) -> Row:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return Row(line=n, error="bad_json")
    if not isinstance(obj, dict):
        return Row(line=n, error="not_an_object")
    return Row(line=n, fields=obj, invalid_utf8="\ufffd" in text)


def _columns_of(row: Row) -> list[str]:
    return list(row.fields) if row.error is None else []


def _read_json_array(path: Path) -> tuple[list[str], Iterator[Row]]:
    raw = path.read_bytes().decode("utf-8-sig", errors="replace")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects")
    columns = list(data[0]) if data and isinstance(data[0], dict) else []
    # A JSON array has no meaningful line numbers; the 1-based item index stands in for them.
    return columns, (Row(line=i, fields=o) if isinstance(o, dict) else Row(line=i, error="not_an_object")
                     for i, o in enumerate(data, start=1))


def _read_parquet(path: Path) -> tuple[list[str], Iterator[Row]]:
    import pyarrow.parquet as pq  # ~0.25 s; only Parquet files need it

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path} is not a readable Parquet file: {err}") from None
    columns = pf.schema_arrow.names

    def rows() -> Iterator[Row]:
        n = 0
        for batch in pf.iter_batches(batch_size=8192):
            for obj in batch.to_pylist():
                n += 1
                yield Row(line=n, fields=obj)

    return columns, rows()
