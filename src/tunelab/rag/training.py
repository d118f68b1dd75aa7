"""Training data built from a knowledge base (`tunelab index training-data`), for the two models of a support
assistant:

- **retrieval pairs** (`data prepare --task retrieval`): each entry whose heading is a question (an FAQ entry, a
  "How do I …?" section, an FAQ table row) gives (the question, each of its chunks without the heading) — the
  encoder learns to match a question with the text that answers it, not with its own heading;
- **SFT conversations** (`data prepare --task sft`): the question with the passages the assistant would retrieve
  for it, in the assistant's own prompt, and the answer it should give: the entry's first sentences, each citing
  the passage it comes from with [n]. A `handoff_share` of the questions get passages from which the entry was
  removed, and the hand-off message as the answer — so the model learns to hand off when the passages do not say.

Nothing here reads an evaluation set: the questions are the knowledge base's own headings.
"""

from __future__ import annotations

import random
import re

from tunelab.rag.answer import Assistant, Retrieval
from tunelab.rag.chunking import Chunk, sentences

_QUESTION = re.compile(r"[?？]\s*$")


def question_entries(chunks: list[Chunk]) -> dict[tuple[str, tuple[str, ...]], list[Chunk]]:
    """The chunks of each entry whose innermost heading is a question, by (document, heading path)."""
    out: dict[tuple[str, tuple[str, ...]], list[Chunk]] = {}
    for c in chunks:
        if c.headings and _QUESTION.search(c.headings[-1]):
            out.setdefault((c.doc_id, c.headings), []).append(c)
    return out


def body(chunk: Chunk) -> str:
    """A chunk's text without its heading lines, whitespace collapsed."""
    lines = [ln for ln in chunk.text.splitlines() if ln.strip() and ln.strip() not in chunk.headings]
    return " ".join(" ".join(lines).split())


def retrieval_pairs(chunks: list[Chunk]) -> list[dict]:
    return [{"query": heads[-1], "passage": text} for (_, heads), parts in question_entries(chunks).items()
            for text in (body(c) for c in parts) if text]


def cited_answer(text: str, n: int, max_chars: int = 400) -> str:
    """The first sentences of `text` (at least one, up to `max_chars`), each ending with the marker [n] (before its
    closing punctuation)."""
    out: list[str] = []
    for a, b in sentences(text, 0, len(text), max_chars):
        if out and sum(len(s) for s in out) + (b - a) > max_chars:
            break
        s = text[a:b]
        out.append(f"{s[:-1]} [{n}]{s[-1]}" if s[-1] in ".!?。！？" else f"{s} [{n}]")
    return " ".join(out)


def sft_conversations(assistant: Assistant, handoff_share: float = 0.25, seed: int = 0) -> list[dict]:
    """One conversation per question entry: grounded (its answer cites the entry's passage) or, for a seeded
    `handoff_share` of them, with the entry's chunks taken out of the passages and the hand-off as the answer.
    An entry the retrieval does not find in the top k is skipped (its answer would cite nothing)."""
    rng, k = random.Random(seed), assistant.settings.top_k
    rows = []
    for (doc, heads), parts in question_entries(assistant.index.chunks).items():
        question, own = heads[-1], {(c.doc_id, c.start) for c in parts}
        messages = [{"role": "user", "content": question}]
        hits = assistant.index.search(question, k + len(parts), "hybrid")
        if rng.random() < handoff_share:
            others = [h for h in hits if (h.chunk.doc_id, h.chunk.start) not in own][:k]
            reply, shown = assistant.settings.handoff, others
        else:
            shown = hits[:k]
            n = next((i for i, h in enumerate(shown, start=1) if (h.chunk.doc_id, h.chunk.start) in own), None)
            text = body(shown[n - 1].chunk) if n else ""
            if not text:
                continue
            reply = cited_answer(text, n)
        prompt = assistant.prompt(messages, Retrieval(question, shown, 1.0))
        rows.append({"messages": [*prompt, {"role": "assistant", "content": reply}]})
    return rows
