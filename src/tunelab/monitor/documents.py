"""What the monitor ingests: a document (id, timestamp, source, text), checked field by field.

A raw document is a JSON object (a JSONL line, a CSV row, an element of a POST /ingest body). `parse_document`
turns it into a `Document` or names why it cannot be one (the reason is counted and logged, and the stream goes
on). Timestamps are ISO 8601 (a time without a zone is UTC) or Unix seconds (milliseconds when over 10^11).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone

MAX_ID_CHARS = 200
MAX_SOURCE_CHARS = 200
FIELDS = ("id", "timestamp", "source", "text")


@dataclass(frozen=True)
class Document:
    id: str
    ts: float  # Unix seconds, UTC
    source: str
    text: str


class Rejected(ValueError):
    """A raw document that is not a `Document`: `reason` is a short fixed word (counted per reason)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_timestamp(value) -> float:
    """ISO 8601 text or Unix seconds (int, float or digits; milliseconds above 10^11) -> Unix seconds."""
    if isinstance(value, bool) or value is None:
        raise Rejected("bad_timestamp", repr(value))
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise Rejected("bad_timestamp", text[:40]) from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            return when.timestamp()
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Rejected("bad_timestamp", repr(value)[:40])
    seconds = value / 1000 if abs(value) > 1e11 else float(value)
    if not -62135596800 <= seconds <= 253402300799:  # years 1 to 9999
        raise Rejected("bad_timestamp", repr(value)[:40])
    return seconds


def parse_document(raw, default_source: str, fields: dict[str, str] | None = None, max_text_chars: int = 20_000,
                   ) -> Document:
    """A raw document (a dict) -> `Document`; `Rejected` with the reason otherwise. `fields` maps a document field
    to the column holding it; a document without a source takes `default_source`."""
    if not isinstance(raw, dict):
        raise Rejected("not_an_object", type(raw).__name__)
    col = {f: (fields or {}).get(f, f) for f in FIELDS}
    doc_id = raw.get(col["id"])
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise Rejected("missing_id")
    if len(doc_id) > MAX_ID_CHARS:
        raise Rejected("id_too_long", f"{len(doc_id)} characters")
    if raw.get(col["timestamp"]) is None:
        raise Rejected("missing_timestamp")
    ts = parse_timestamp(raw[col["timestamp"]])
    text = raw.get(col["text"])
    if not isinstance(text, str) or not text.strip():
        raise Rejected("missing_text")
    if len(text) > max_text_chars:
        raise Rejected("text_too_long", f"{len(text)} characters")
    source = raw.get(col["source"])
    source = source.strip()[:MAX_SOURCE_CHARS] if isinstance(source, str) and source.strip() else default_source
    return Document(doc_id.strip(), ts, source, _valid(text))


def _valid(text: str) -> str:
    """Lone surrogates (from JSON escapes) would not encode into the database: U+FFFD instead; NUL bytes removed
    (PostgreSQL text cannot hold them)."""
    return _SURROGATE.sub("\ufffd", text).replace("\x00", "")


_SURROGATE = re.compile("[\ud800-\udfff]")
