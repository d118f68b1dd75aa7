"""An index folder over a knowledge base: chunks, their embeddings (dense, searched exactly with FAISS inner
product over unit vectors) and a BM25 index of the same chunks (bm25s), fused by reciprocal rank (hybrid, the
default) — BM25 is the strong baseline BEIR reports, and fusing it with dense retrieval beats either alone.

The folder (kind `index`, written whole and swapped in atomically like every tunelab artifact):
  tunelab.json      the manifest: encoder (reference, fingerprint of its files, dimension), chunking settings,
                    every source file's fingerprint, document and chunk counts
  documents.jsonl   id, source, format, text (what chunk offsets point into), fingerprint
  chunks.jsonl      document id, start, end, heading path — in the order of the embedding rows
  embeddings.npy    float32 [chunks, dim], unit length
  bm25/             the lexical index (bm25s), rebuilt from the chunks on every write

Exact search (`IndexFlatIP`) needs no training, gives the same neighbours as brute force, and removing rows is
rebuilding from `embeddings.npy` (memory-mapped); 100,000 MiniLM chunks are 150 MB and one query scans them in a
few milliseconds on two cores. `add` and `remove` write a new folder that equals a rebuild from the same
documents (chunks kept in document-id order), encoding only the new chunks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import bm25s
import faiss
import numpy as np
import torch
from bm25s.stopwords import STOPWORDS_EN
from transformers import AutoModel

from tunelab.artifacts import META_FILE, kind_of, write_folder
from tunelab.errors import UserError
from tunelab.models import (load_pretrained, load_tokenizer, max_length_of, read_meta, resolve_base,
                            sentence_embeddings)
from tunelab.rag.chunking import Chunk, chunk_document
from tunelab.rag.sources import Document, read_sources

KIND = "index"
DEFAULT_ENCODER = "builtin:minilm-l6"
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al.): score = sum over lists of 1 / (60 + rank)
CANDIDATES = 50  # per list, before fusion
MODES = ("hybrid", "dense", "bm25")
CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# a run of CJK characters, a word of other letters, or a number: "Windows系统" is "windows" and "系统"
_TERM = re.compile(rf"([{CJK_CHARS}]+)|((?:(?![{CJK_CHARS}])[^\W\d_])+)|(\d+)")


@functools.cache
def _stopwords() -> frozenset[str]:
    return frozenset(STOPWORDS_EN)


def lexical_tokens(text: str) -> list[str]:
    """BM25's terms: lower-cased words and numbers, English stopwords dropped; Chinese, Japanese and Korean runs (no
    spaces between words) as single characters and character bigrams."""
    out: list[str] = []
    stop = _stopwords()
    for cjk, word, number in _TERM.findall(text.lower()):
        if cjk:
            out += list(cjk) + [cjk[i:i + 2] for i in range(len(cjk) - 1)]
        elif word not in stop:
            out.append(word or number)
    return out


class Encoder:
    """Sentence embeddings (mean-pooled, unit length) from an encoder: a built-in, a Hugging Face folder or a
    tunelab model dir. `fingerprint`: sha256 of its config and weight files (an index refuses another encoder)."""

    def __init__(self, ref: str = DEFAULT_ENCODER, max_length: int | None = None, batch: int = 64):
        # a folder is recorded by its absolute path: the index is searched from anywhere
        self.ref = str(Path(ref).resolve()) if Path(ref).is_dir() else ref
        if max_length is None:  # a tunelab model dir embeds as it was trained; others as MiniLM's 256 tokens
            trained = Path(self.ref) / META_FILE
            max_length = max_length_of(read_meta(self.ref)) if trained.is_file() else 256
        self.max_length, self.batch = max_length, batch
        base = resolve_base(self.ref)
        self.fingerprint = files_fingerprint(Path(base.path))
        self.tokenizer = load_tokenizer(base)
        self.model = load_pretrained(AutoModel, base, dtype=torch.float32).eval()
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()  # one call at a time: a server's request threads share it (tokenizer state)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim], unit rows; batched by length (less padding), returned in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._lock, torch.inference_mode():
            for s in range(0, len(order), self.batch):
                idx = order[s:s + self.batch]
                enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length)
                hidden = self.model(**enc).last_hidden_state.float()
                out[idx] = sentence_embeddings(hidden, enc["attention_mask"]).numpy()
        return out


def files_fingerprint(folder: Path) -> str:
    """sha256 over a model folder's config and weight files (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in
                                                                    (".safetensors", ".bin", ".gguf")))
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class Hit:
    chunk: Chunk
    score: float  # hybrid: the fused reciprocal-rank score; dense: cosine similarity; bm25: BM25 score
    dense: float | None  # cosine similarity to the query (None when not among the dense candidates)
    source: str


class Index:
    """An index folder loaded for search; `build`, `add` and `remove` write one."""

    def __init__(self, path: Path, meta: dict, documents: dict[str, dict], chunks: list[Chunk],
                 embeddings: np.ndarray, encoder: Encoder | None = None):
        self.path, self.meta, self.documents, self.chunks = path, meta, documents, chunks
        self.embeddings = embeddings
        # one query at a time is bound by memory bandwidth, not compute; and FAISS's OpenMP threads, spinning
        # beside torch's after each query is encoded, made a search over 100,000 chunks 3x slower (21 ms vs 6 ms)
        faiss.omp_set_num_threads(1)
        self.dense = faiss.IndexFlatIP(int(meta["encoder"]["dim"]))
        if len(chunks):
            self.dense.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        self._encoder = encoder
        self._bm25 = None

    # ---- reading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, encoder: Encoder | None = None) -> Index:
        """An index folder -> an `Index`. Not an index, or files missing, is a `UserError`."""
        path = Path(path)
        if kind_of(path) != KIND:
            raise UserError(f"{path} is not a tunelab index (build one with `tunelab index build`)")
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            documents = {d["id"]: d for d in _read_jsonl(path / "documents.jsonl")}
            chunks = [Chunk(c["doc_id"], c["start"], c["end"], tuple(c["headings"]),
                            documents[c["doc_id"]]["text"][c["start"]:c["end"]])
                      for c in _read_jsonl(path / "chunks.jsonl")]
            embeddings = np.load(path / "embeddings.npy", mmap_mode="r")
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{path}: the index is incomplete or corrupt ({err}); rebuild it") from None
        if embeddings.shape[0] != len(chunks):
            raise UserError(f"{path}: {len(chunks)} chunks but {embeddings.shape[0]} embeddings; rebuild it")
        if encoder is not None:
            check_encoder(meta, encoder, path)
        return cls(path, meta, documents, chunks, embeddings, encoder)

    @property
    def encoder(self) -> Encoder:
        """The encoder the index was built with (loaded on first use; its files must not have changed)."""
        if self._encoder is None:
            enc = Encoder(self.meta["encoder"]["ref"])
            check_encoder(self.meta, enc, self.path)
            self._encoder = enc
        return self._encoder

    @property
    def bm25(self):
        if self._bm25 is None:
            self._bm25 = bm25s.BM25.load(str(self.path / "bm25")) if self.chunks else None
        return self._bm25

    def search(self, query: str, k: int = 10, mode: str = "hybrid", vector: np.ndarray | None = None) -> list[Hit]:
        """The `k` best chunks for `query`: `dense`, `bm25`, or both fused by reciprocal rank (`hybrid`).
        `vector`: the query's embedding when the caller has it (float32 [dim]; encoded here otherwise)."""
        if mode not in MODES:
            raise UserError(f"search mode {mode!r}: choose one of {', '.join(MODES)}")
        if not self.chunks or not query.strip():
            return []
        n = min(len(self.chunks), max(k, CANDIDATES))
        dense: dict[int, float] = {}
        if mode != "bm25":
            query_vector = self.encoder([query]) if vector is None else np.asarray(vector, np.float32)[None]
            scores, ids = self.dense.search(query_vector, n)
            dense = {int(i): float(s) for i, s in zip(ids[0], scores[0]) if i >= 0}
        lexical: dict[int, float] = {}
        if mode != "dense":
            lexical = self._bm25_search(query, n)
        if mode == "dense":
            ranked = sorted(dense.items(), key=lambda x: -x[1])
        elif mode == "bm25":
            ranked = sorted(lexical.items(), key=lambda x: -x[1])
        else:
            fused: dict[int, float] = {}
            for scores in (dense, lexical):
                for rank, i in enumerate(sorted(scores, key=lambda i: -scores[i]), start=1):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
            ranked = sorted(fused.items(), key=lambda x: (-x[1], x[0]))
        return [Hit(self.chunks[i], s, dense.get(i), self.documents[self.chunks[i].doc_id]["source"])
                for i, s in ranked[:k]]

    def _bm25_search(self, query: str, n: int) -> dict[int, float]:
        terms = [t for t in lexical_tokens(query) if t in self.bm25.vocab_dict]
        if not terms:
            return {}
        scores = self.bm25.get_scores(terms)
        top = np.argpartition(-scores, min(n, len(scores) - 1))[:n]
        return {int(i): float(scores[i]) for i in top if scores[i] > 0}

    # ---- writing ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, sources: list[str | Path], out: str | Path, encoder: str | Encoder = DEFAULT_ENCODER,
              max_chars: int = 1000, overlap: int = 1, overwrite: bool = False) -> tuple[Index, dict]:
        """Read, chunk, embed and index `sources` into the folder `out` -> (the index, a summary)."""
        if max_chars < 1 or overlap < 0:
            raise UserError(f"max_chars must be ≥ 1 and overlap ≥ 0 (got {max_chars}, {overlap})")
        enc = encoder if isinstance(encoder, Encoder) else Encoder(encoder)
        docs, report = read_sources(sources)
        if not docs:
            raise UserError("no documents to index in " + ", ".join(map(str, sources)))
        settings = {"max_chars": max_chars, "overlap": overlap}
        return _write(Path(out), enc, {}, docs, [], settings, {}, overwrite=overwrite, report=report)

    def add(self, sources: list[str | Path]) -> tuple[Index, dict]:
        """Add (or replace, by id) the documents of `sources` -> the rewritten index and a summary. Unchanged
        documents keep their chunks and embeddings; only new text is encoded."""
        docs, report = read_sources(sources)
        fresh = [d for d in docs if self.documents.get(d.id, {}).get("fingerprint") != d.fingerprint]
        read = {d.id: d for d in docs}
        kept = {}
        for i, d in self.documents.items():
            if i in read and read[i] not in fresh:  # unchanged: its chunks stay; its source is where it is now
                kept[i] = {**d, "source": read[i].source}
            elif i not in read and d["source"] not in report.sources:  # from a file not read again: untouched
                kept[i] = d
            # else: replaced, or gone from a file that was read again (a deleted FAQ row, an emptied file)
        return self._rewrite(kept, fresh, report)

    def remove(self, doc_ids: list[str]) -> tuple[Index, dict]:
        """Drop documents by id (an id the index lacks is a `UserError`) -> the rewritten index and a summary."""
        missing = [i for i in doc_ids if i not in self.documents]
        if missing:
            raise UserError(f"{self.path} has no document {missing[0]!r} (`tunelab index show` lists them)")
        kept = {i: d for i, d in self.documents.items() if i not in set(doc_ids)}
        return self._rewrite(kept, [], None)

    def _rewrite(self, kept: dict[str, dict], fresh: list[Document], report) -> tuple[Index, dict]:
        old = [(c, self.embeddings[i]) for i, c in enumerate(self.chunks) if c.doc_id in kept]
        known = {f["path"]: f["fingerprint"] for f in self.meta["sources"]}
        return _write(self.path, self.encoder, kept, fresh, old, self.meta["chunking"], known, overwrite=True,
                      report=report)


def check_encoder(meta: dict, encoder: Encoder, path: Path) -> None:
    """Refuse an encoder other than the one the index was built with (its embeddings would not compare)."""
    want = meta["encoder"]
    if encoder.fingerprint != want["fingerprint"]:
        raise UserError(f"{path} was built with the encoder {want['ref']} (fingerprint {want['fingerprint'][:12]}); "
                        f"{encoder.ref} ({encoder.fingerprint[:12]}) is another: its embeddings do not compare. "
                        "Rebuild the index with it, or use the original")


def _sources(documents: dict[str, dict], known: dict[str, str]) -> list[dict]:
    """The manifest's source files: path, fingerprint of its bytes (`known` ones as recorded), documents from it."""
    count: dict[str, int] = {}
    for d in documents.values():
        count[d["source"]] = count.get(d["source"], 0) + 1
    return [{"path": p, "fingerprint": known.get(p) or hashlib.sha256(Path(p).read_bytes()).hexdigest(),
             "documents": n} for p, n in sorted(count.items())]


def _write(out: Path, enc: Encoder, kept: dict[str, dict], fresh: list[Document], old: list[tuple[Chunk, np.ndarray]],
           settings: dict, known: dict[str, str], overwrite: bool, report) -> tuple[Index, dict]:
    """Write an index folder from kept documents (with their chunks and embeddings) and fresh ones (chunked and
    encoded now); chunks ordered by document id, then offset, whatever was added when."""
    start = time.perf_counter()
    fresh_sources = {d.source for d in fresh} | (report.sources if report is not None else set())
    new_chunks = [c for d in fresh for c in chunk_document(d, settings["max_chars"], settings["overlap"])]
    new_emb = enc([c.for_encoder() for c in new_chunks]) if new_chunks else np.zeros((0, enc.dim), np.float32)
    rows = old + list(zip(new_chunks, new_emb))
    rows.sort(key=lambda r: (r[0].doc_id, r[0].start, r[0].end))
    chunks = [c for c, _ in rows]
    embeddings = np.stack([e for _, e in rows]).astype(np.float32) if rows else np.zeros((0, enc.dim), np.float32)
    documents = {**kept, **{d.id: {"id": d.id, "source": d.source, "format": d.format, "text": d.text,
                                   "fingerprint": d.fingerprint} for d in fresh}}
    documents = {i: documents[i] for i in sorted(documents)}
    meta = {"kind": KIND, "encoder": {"ref": enc.ref, "fingerprint": enc.fingerprint, "dim": enc.dim},
            "chunking": settings,
            "sources": _sources(documents, {p: f for p, f in known.items() if p not in fresh_sources}),
            "documents": len(documents), "chunks": len(chunks), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with write_folder(out, KIND, overwrite) as tmp:
        _write_jsonl(tmp / "documents.jsonl", documents.values())
        _write_jsonl(tmp / "chunks.jsonl", ({"doc_id": c.doc_id, "start": c.start, "end": c.end,
                                             "headings": list(c.headings)} for c in chunks))
        np.save(tmp / "embeddings.npy", embeddings)
        if chunks:
            bm25 = bm25s.BM25()
            bm25.index([lexical_tokens(c.for_encoder()) or ["\x00"] for c in chunks], show_progress=False)
            bm25.save(str(tmp / "bm25"))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    index = Index.load(out, enc)
    summary = {"documents": len(documents), "chunks": len(chunks), "encoded": len(new_chunks),
               "seconds": round(time.perf_counter() - start, 2),
               "skipped": dict(report.skipped) if report is not None else {}}
    return index, summary


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
