"""Knowledge-base sources -> `Document`s: Markdown, plain text, HTML, and FAQ tables (CSV or JSON Lines with
question and answer columns, one document per row), given as files or folders of them.

A document's `text` is what offsets point into: a text file as read (UTF-8, newlines normalised), the text of an
HTML page (tags dropped, blocks on their own lines), an FAQ row as "question\\nanswer". Its `headings` are
(offset, level, title) of the Markdown / HTML headings in that text; an FAQ row's question is its heading. Its
`id` is its path relative to the folder given (the file name for a file given directly), `#N` added for the row
of an FAQ table; ids are what `index add` and `index remove` name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tunelab.errors import UserError

FORMATS = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".html": "html", ".htm": "html",
           ".csv": "faq", ".jsonl": "faq"}
QUESTION_COLUMNS = ("question", "q", "query", "title")
ANSWER_COLUMNS = ("answer", "a", "response", "reply")
_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)  # `## C#` keeps its #
_FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


@dataclass
class Document:
    id: str
    source: str  # the absolute path of the file it came from
    format: str  # markdown | text | html | faq
    text: str
    headings: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, level, title), by offset

    @property
    def fingerprint(self) -> str:
        """sha256 of the format, text and headings: whether a document changed (a heading added to HTML changes
        the chunks, not the text)."""
        return hashlib.sha256(json.dumps([self.format, self.text, self.headings]).encode()).hexdigest()


@dataclass
class ReadReport:
    files: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (rows or files)
    sources: set[str] = field(default_factory=set)  # absolute paths of the files read (even those giving nothing)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


def read_sources(paths: list[str | Path]) -> tuple[list[Document], ReadReport]:
    """Files and folders (read recursively; unknown suffixes and hidden files skipped) -> their documents, sorted by
    id, and what was read and skipped. A missing path, or two documents with one id, is a `UserError`."""
    report, docs = ReadReport(), {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise UserError(f"{given}: no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            rel = path.name if root.is_file() else path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts) or path.suffix.lower() not in FORMATS:
                if root.is_file():
                    raise UserError(f"{given}: not a knowledge-base file (Markdown, text, HTML, CSV or JSONL)")
                report.skip(f"not a {'/'.join(sorted(set(FORMATS)))} file")
                continue
            report.files += 1
            report.sources.add(str(path.resolve()))
            for doc in read_file(path, rel, report):
                if doc.id in docs:
                    raise UserError(f"two documents would have the id {doc.id!r} ({docs[doc.id].source} and "
                                    f"{doc.source}); give their folders separately so their ids differ")
                docs[doc.id] = doc
    return [docs[k] for k in sorted(docs)], report


def read_file(path: Path, doc_id: str, report: ReadReport) -> list[Document]:
    """One file -> its documents (an FAQ table: one per usable row)."""
    fmt = FORMATS[path.suffix.lower()]
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not text
    text = raw.decode("utf-8-sig", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
        report.skip("files with invalid UTF-8 bytes (replaced, still indexed)")
    source = str(path.resolve())
    if fmt == "faq":
        return _faq(text, path, doc_id, source, report)
    if fmt == "html":
        body, headings = html_text(text)
        if not body.strip():
            report.skip("empty files")
            return []
        return [Document(doc_id, source, fmt, body, headings)]
    if not text.strip():
        report.skip("empty files")
        return []
    return [Document(doc_id, source, fmt, text, markdown_headings(text) if fmt == "markdown" else [])]


def markdown_headings(text: str) -> list[tuple[int, int, str]]:
    """(offset, level, title) of the ATX headings (`# Title`) outside fenced code blocks."""
    fences = [m.start() for m in _FENCE.finditer(text)]
    spans = list(zip(fences[::2], fences[1::2] + [len(text)] * (len(fences) % 2)))
    return [(m.start(), len(m.group(1)), m.group(2).strip()) for m in _MD_HEADING.finditer(text)
            if not any(a <= m.start() < b for a, b in spans)]


class _HTMLText(HTMLParser):
    """The reader of `html_text`: a stack of the open elements says whether text is inside a skipped element
    (scripts, styles, navigation, a heading's permalink) and, on a page that marks its main content (`<main>` or
    `role="main"`), whether it is inside it: a documentation site's menus, sidebars and footers are not its
    knowledge."""

    BLOCKS = {"p", "div", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer", "br", "dt",
              "dd", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "title", "td", "th"}
    SKIP = {"script", "style", "noscript", "template", "nav", "aside", "button"}
    SKIP_ROLES = {"navigation", "search", "banner", "contentinfo", "button", "menu"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track",
            "wbr"}

    def __init__(self, main_only: bool):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.headings: list[tuple[int, int, str]] = []
        self._open: list[tuple[str, bool, bool]] = []  # (tag, skipped, main) of each open element
        self._skip = 0
        self._main = 0 if main_only else 1
        self.saw_main = False  # a main element (`<main>`, role="main") was opened
        self._heading: tuple[int, int] | None = None  # (level, offset) of the heading being read

    def _newline(self) -> None:
        if self.parts and not self.parts[-1].endswith("\n"):
            self._put("\n")

    def _put(self, s: str) -> None:
        self.parts.append(s)
        self.length += len(s)

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        if tag not in self.VOID:
            skipped = (tag in self.SKIP or a.get("role", "") in self.SKIP_ROLES or a.get("aria-hidden") == "true"
                       or "headerlink" in a.get("class", "").split())
            main = tag == "main" or a.get("role") == "main"
            self._open.append((tag, skipped, main))
            self._skip += skipped
            self._main += main
            self.saw_main |= main and not self._skip
        if self._skip or not self._main:
            return
        if tag in self.BLOCKS:
            self._newline()
            if len(tag) == 2 and tag[0] == "h" and tag[1].isdigit():
                self._heading = (int(tag[1]), self.length)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):  # close up to the nearest open `tag` (HTML leaves some open)
            if self._open[i][0] == tag:
                for _, skipped, main in self._open[i:]:
                    self._skip -= skipped
                    self._main -= main
                del self._open[i:]
                break
        if tag in self.BLOCKS and not self._skip:
            if self._heading and tag == f"h{self._heading[0]}":
                level, start = self._heading
                title = "".join(self.parts)[start:].strip()
                if title:
                    self.headings.append((start, level, " ".join(title.split())))
                self._heading = None
            self._newline()

    def handle_data(self, data):
        if self._skip or not self._main:
            return
        words = " ".join(data.split())
        if words:
            if self.parts and not self.parts[-1].endswith(("\n", " ")) and data[:1].isspace():
                self._put(" ")
            self._put(words)
            if data[-1:].isspace():
                self._put(" ")


def html_text(html: str) -> tuple[str, list[tuple[int, int, str]]]:
    """An HTML page's text (scripts, styles, navigation and permalinks dropped; only the main content where the
    page marks it and it has text; whitespace collapsed, each block on its own line) and its headings (h1-h6) as
    offsets into that text."""
    def parse(main_only: bool) -> _HTMLText:
        parser = _HTMLText(main_only)
        parser.feed(html)
        parser.close()
        return parser

    parser = parse(main_only=True)
    if not (parser.saw_main and "".join(parser.parts).strip()):  # no main element, or an empty one: the whole page
        parser = parse(main_only=False)
    return "".join(parser.parts), parser.headings


def _faq(text: str, path: Path, doc_id: str, source: str, report: ReadReport) -> list[Document]:
    rows: list[dict | None] = []
    if path.suffix.lower() == ".csv":
        try:  # newline="": quoted answers keep their line breaks
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as err:
            raise UserError(f"{path}: not a readable CSV file ({err})") from None
    else:
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None  # counted all the same, so that row numbers follow the file's lines
            rows.append(row if isinstance(row, dict) or row is None else {})
    docs = []
    for n, row in enumerate(rows, start=1):
        if row is None:
            report.skip("FAQ rows that are not JSON")
            continue
        lower = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
        q = next((lower[c] for c in QUESTION_COLUMNS if isinstance(lower.get(c), str) and lower[c].strip()), None)
        a = next((lower[c] for c in ANSWER_COLUMNS if isinstance(lower.get(c), str) and lower[c].strip()), None)
        if q is None or a is None:
            report.skip("FAQ rows without a question and an answer")
            continue
        q, a = " ".join(q.split()), a.strip()
        docs.append(Document(f"{doc_id}#{n}", source, "faq", f"{q}\n{a}", [(0, 1, q)]))
    return docs
