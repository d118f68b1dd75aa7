"""Documents -> chunks for retrieval: split at headings, then packed from whole sentences up to `max_chars`
characters, consecutive chunks of a section sharing `overlap` sentences. A chunk is a span [start, end) of its
document's text (`doc.text[start:end]` is its text, exactly), with the path of headings it sits under.

Sentences end at . ! ? followed by whitespace, at 。！？ (Chinese needs no space after them), and at blank lines;
a sentence longer than `max_chars` is cut at whitespace (or anywhere, for text without spaces).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunelab.errors import UserError
from tunelab.rag.sources import Document

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])|\n[ \t]*\n\s*")


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    start: int
    end: int
    headings: tuple[str, ...]
    text: str

    @property
    def key(self) -> str:
        """A stable id: the document's and the span's."""
        return f"{self.doc_id}:{self.start}-{self.end}"

    def for_encoder(self) -> str:
        """The text embedded and indexed: the heading path, then the chunk (a heading tells what a passage is about)."""
        path = " > ".join(h for h in self.headings if h not in self.text[:200])
        return f"{path}\n{self.text}" if path else self.text


def sentences(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Spans of the sentences of text[start:end], whitespace trimmed, none longer than `max_chars`."""
    spans, at = [], start
    for m in _SENTENCE_END.finditer(text, start, end):
        spans.append((at, m.start()))
        at = m.end()
    spans.append((at, end))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        while b - a > max_chars:  # a run-on sentence: cut at the last whitespace that fits (a newline first)
            window = text[a + 1:a + max_chars]
            at = window.rfind("\n")
            at = at if at >= 0 else max((i for i, c in enumerate(window) if c.isspace()), default=-1)
            cut = a + 1 + at if at >= 0 else a + max_chars
            while cut > a and text[cut - 1].isspace():
                cut -= 1
            cut = cut if cut > a else a + max_chars
            out.append((a, cut))
            a = cut
            while a < b and text[a].isspace():
                a += 1
        if b > a:
            out.append((a, b))
    return out


def chunk_document(doc: Document, max_chars: int = 1000, overlap: int = 1) -> list[Chunk]:
    """A document's chunks, in order. Each section (from a heading to the next) is packed on its own."""
    if max_chars < 1 or overlap < 0:
        raise UserError(f"chunking: max_chars must be ≥ 1 and overlap ≥ 0 (got {max_chars}, {overlap})")
    bounds = [(0, 0, "")] + [h for h in doc.headings if h[0] > 0] if not doc.headings or doc.headings[0][0] > 0 \
        else list(doc.headings)
    chunks: list[Chunk] = []
    path: list[tuple[int, str]] = []  # (level, title) of the headings above
    for i, (offset, level, title) in enumerate(bounds):
        if title:
            path = [p for p in path if p[0] < level] + [(level, title)]
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(doc.text)
        heads = tuple(t for _, t in path)
        sents = sentences(doc.text, offset, end, max_chars)
        first = 0
        while first < len(sents):
            last = first
            while last + 1 < len(sents) and sents[last + 1][1] - sents[first][0] <= max_chars:
                last += 1
            a, b = sents[first][0], sents[last][1]
            chunks.append(Chunk(doc.id, a, b, heads, doc.text[a:b]))
            if last + 1 >= len(sents):
                break
            first = max(first + 1, last + 1 - overlap)  # the next one repeats the last `overlap` sentences,
            while first <= last and sents[last + 1][1] - sents[first][0] > max_chars:  # as many as leave room
                first += 1
    return chunks
