"""Grounded answers over an index: what to retrieve for a conversation, the prompt that puts the passages in front
of a chat model with numbered markers, and the check of the model's answer against those passages.

The rules, stated once:
- **Retrieval query**: the latest user turn; a short follow-up (fewer than `followup_terms` content words) is
  followed by the previous user turn, so "and in a loop?" is searched as what it follows up.
- **Hand-off before generating**: when the best dense similarity of the query to any chunk is under `min_score`,
  nothing in the knowledge base is about the question; the model is not asked.
- **Supported answer**: every answer sentence with at least `min_terms` lexical terms must be backed by one passage
  of the prompt — one it cites with [n] (a marker after the sentence's full stop counts for it), or any when it
  cites none — where backed means that at least `min_overlap` of the sentence's terms occur in the passage, that
  their embeddings' cosine similarity is at least `min_similarity`, and that every number the sentence states is in
  the passage. One unsupported sentence, a marker naming a passage that was not in the prompt, an answer that is
  the hand-off message, or an empty answer hands off. No NLI model is available offline: a sentence that keeps the
  passage's words and numbers but negates it ("you can not ask for a refund") passes this check.
- **Citations**: the passages the answer's sentences cite and are backed by, numbered as in the prompt, with their
  document, heading path, character offsets and score (the dense similarity to the query).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from tunelab.config import DEFAULT_HANDOFF, RAG_MIN_SCORE, RAG_TOP_K
from tunelab.rag.chunking import sentences
from tunelab.rag.index import CJK_CHARS, Hit, Index, lexical_tokens

_MARKER = re.compile(r"\[(\d{1,2})\]")
_CJK = re.compile(f"[{CJK_CHARS}]")
_TRAILING_MARKERS = re.compile(r"([.!?。！？])((?:\s*\[\d{1,2}\])+)")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass(frozen=True)
class AnswerSettings:
    top_k: int = RAG_TOP_K  # passages put into the prompt
    min_score: float = RAG_MIN_SCORE  # the best chunk's cosine similarity to the query under which it hands off
    min_overlap: float = 0.5  # share of an answer sentence's terms that its passage must contain
    min_similarity: float = 0.5  # cosine similarity an answer sentence must have with its passage
    min_terms: int = 3  # sentences with fewer lexical terms ("Yes.", "See [1].") are not checked
    followup_terms: int = 6  # a user turn with fewer content words (`words`) is read with the turn before it
    handoff: str = DEFAULT_HANDOFF


@dataclass
class Retrieval:
    query: str
    hits: list[Hit]
    best: float  # the best dense similarity of the query to any chunk

    def citation(self, n: int) -> dict:
        """Passage [n] (1-based, as in the prompt) as a response's citation."""
        h = self.hits[n - 1]
        return {"index": n, "document": h.chunk.doc_id, "heading": " > ".join(h.chunk.headings),
                "start": h.chunk.start, "end": h.chunk.end,
                # the dense similarity to the question; None for a passage only BM25 found
                "score": None if h.dense is None else round(float(h.dense), 4), "source": h.source}


@dataclass
class Verdict:
    """The checked answer: `text` (the model's, or the hand-off message), the citations, and `handoff` (None, or
    why: `no_relevant_passage`, `unsupported_answer`, `model_declined`)."""
    text: str
    citations: list[dict]
    handoff: str | None
    # per checked sentence: the sentence, its best passage, overlap, similarity, numbers held, supported
    sentences: list[dict] = field(default_factory=list)

    @property
    def flag(self) -> dict | None:
        return None if self.handoff is None else {"reason": self.handoff}


class Assistant:
    """Retrieval, prompt and check over one index (its encoder embeds queries and answer sentences)."""

    def __init__(self, index: Index, settings: AnswerSettings = AnswerSettings()):
        self.index, self.settings = index, settings
        self.encoder = index.encoder  # loaded now, not by the first request

    # ---- retrieval -------------------------------------------------------------------------------
    def query(self, messages: list[dict]) -> str:
        """The retrieval query of a conversation (OpenAI-style messages; the last user turn is the question)."""
        users = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
        if not users:
            return ""
        latest = users[-1]
        if len(users) > 1 and words(latest) < self.settings.followup_terms:
            return f"{latest}\n{users[-2]}"  # latest first: the encoder truncates a long earlier turn, not it
        return latest

    def retrieve(self, messages: list[dict]) -> Retrieval:
        query = self.query(messages)
        if not query:
            return Retrieval("", [], 0.0)
        vector = self.encoder([query])[0]
        top = self.index.search(query, 1, "dense", vector=vector)
        hits = self.index.search(query, self.settings.top_k, "hybrid", vector=vector)
        return Retrieval(query, hits, top[0].score if top else 0.0)

    def handoff(self, reason: str) -> Verdict:
        return Verdict(self.settings.handoff, [], reason)

    def grounded(self, retrieval: Retrieval) -> bool:
        """Whether the knowledge base has something on the question (else: hand off without asking the model)."""
        return bool(retrieval.hits) and retrieval.best >= self.settings.min_score

    # ---- prompt ----------------------------------------------------------------------------------
    def prompt(self, messages: list[dict], retrieval: Retrieval) -> list[dict]:
        """The conversation for the chat model: a system turn with the instructions and the numbered passages (a
        caller's own leading system turn appended to it), then the conversation as it was."""
        ours = system_prompt(retrieval.hits, self.settings.handoff)
        if messages and messages[0]["role"] == "system":  # one system turn (some chat templates allow no second)
            return [{"role": "system", "content": f"{ours}\n\n{messages[0]['content']}"}, *messages[1:]]
        return [{"role": "system", "content": ours}, *messages]

    # ---- the check -------------------------------------------------------------------------------
    def check(self, answer: str, retrieval: Retrieval) -> Verdict:
        s, hits = self.settings, retrieval.hits
        text = answer.strip()
        if not text or _same(text, s.handoff):
            return self.handoff("model_declined")
        if not hits:
            return self.handoff("unsupported_answer")
        units = []  # (sentence, its markers, its text without them)
        text = _markers_inside(text)
        for a, b in sentences(text, 0, len(text), 10_000):
            t = text[a:b]
            marks = sorted({int(m) for m in _MARKER.findall(t)})
            if any(not 1 <= m <= len(hits) for m in marks):  # a source that was not in the prompt
                return Verdict(s.handoff, [], "unsupported_answer", [{"sentence": t, "supported": False}])
            units.append((t, marks, _MARKER.sub(" ", t)))
        checked = [u for u in units if len(lexical_tokens(u[2])) >= s.min_terms]
        # a sentence too short to check ("Yes [1].") stands on the passages it cites
        backing = {m for u in units if u not in checked for m in u[1]}
        if not checked:
            return Verdict(text, [retrieval.citation(n) for n in sorted(backing)], None) if backing else \
                self.handoff("unsupported_answer")
        passages = [h.chunk.for_encoder() for h in hits]
        sims = self._similarities([plain for _, _, plain in checked], passages)
        report = []
        for i, (t, marks, plain) in enumerate(checked):
            row = max((_backing(plain, passages[j], float(sims[i, j]), j + 1, s) for j in
                       ([m - 1 for m in marks] or range(len(hits)))), key=lambda r: (r["supported"], r["score"]))
            report.append({"sentence": t, **row})
            backing |= set(marks) if marks else {row["passage"]}
        if not all(r["supported"] for r in report):
            return Verdict(s.handoff, [], "unsupported_answer", report)
        return Verdict(text, [retrieval.citation(n) for n in sorted(backing)], None, report)

    def _similarities(self, answer: list[str], passages: list[str]) -> np.ndarray:
        """[answer sentences, passages]: each answer sentence's best cosine similarity with a passage as a whole
        or with one of its sentences (a one-sentence answer is diluted against a whole passage)."""
        parts, owner = [], []
        for j, p in enumerate(passages):
            for a, b in [(0, len(p))] + sentences(p, 0, len(p), 10_000):
                parts.append(p[a:b])
                owner.append(j)
        vectors = self.encoder(answer + parts)
        pair = vectors[:len(answer)] @ vectors[len(answer):].T
        sims = np.full((len(answer), len(passages)), -1.0, dtype=np.float32)
        for k, j in enumerate(owner):
            sims[:, j] = np.maximum(sims[:, j], pair[:, k])
        return sims


def without_markers(text: str) -> str:
    """`text` with its citation markers ([n]) taken out."""
    return " ".join(_MARKER.sub(" ", text).split())


def _markers_inside(text: str) -> str:
    """Markers written after a sentence's closing punctuation moved before it ("… 30 days. [1] Write …" → "… 30
    days [1]. Write …"): the sentence splitter would give them to the next sentence."""
    return _TRAILING_MARKERS.sub(lambda m: f" {' '.join(m.group(2).split())}{m.group(1)}", text)


def _backing(sentence: str, passage: str, similarity: float, n: int, s: AnswerSettings) -> dict:
    """How passage [n] backs an answer sentence: the share of the sentence's terms it holds, their similarity,
    whether it holds every number the sentence states, and so whether it supports it."""
    terms = set(lexical_tokens(sentence))
    overlap = len(terms & set(lexical_tokens(passage))) / max(len(terms), 1)
    numbers = set(_NUMBER.findall(sentence)) <= set(_NUMBER.findall(passage))
    ok = overlap >= s.min_overlap and similarity >= s.min_similarity and numbers
    return {"passage": n, "overlap": round(overlap, 3), "similarity": round(similarity, 3), "numbers": numbers,
            "supported": ok, "score": overlap + similarity}


def words(text: str) -> float:
    """About how many content words `text` has: its lexical terms (stopwords dropped), a run of Chinese, Japanese
    or Korean characters counting one word per two characters (they are written without spaces)."""
    cjk = len(_CJK.findall(text))
    return sum(1 for t in lexical_tokens(text) if not _CJK.search(t)) + cjk / 2


def system_prompt(hits: list[Hit], handoff: str) -> str:
    """The instructions and the numbered passages ([1] heading path, then the chunk's text)."""
    blocks = []
    for n, h in enumerate(hits, start=1):
        where = " > ".join(h.chunk.headings) or h.chunk.doc_id
        blocks.append(f"[{n}] {where}\n{' '.join(h.chunk.text.split())}")
    return ("You are a customer-support assistant. Answer the user's last question using only the numbered "
            "passages below, in a few sentences, and cite the passage each sentence comes from like [1]. If the "
            f"passages do not answer the question, reply exactly: {handoff}\n\nPassages:\n\n" + "\n\n".join(blocks))


def _same(text: str, handoff: str) -> bool:
    """Whether an answer is the hand-off message (give or take punctuation and case, or its first sentence)."""
    def norm(s: str) -> str:
        return " ".join(lexical_tokens(s))
    said, whole = norm(text), norm(handoff)
    first = norm(handoff.split(". ", 1)[0])
    return bool(said) and (said in (whole, first) or whole in said)
