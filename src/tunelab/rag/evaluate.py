"""`tunelab eval-rag`: an index (and optionally a chat model answering from it) scored on a question set.

A question set is JSON Lines: `question`, `in_scope` (does the knowledge base answer it?), for in-scope questions
the `doc` id and the `heading` of the entry that answers it and a reference `answer`, and optionally `history`
(earlier turns, OpenAI-style messages) for follow-ups. A chunk is relevant to a question when it belongs to that
document and sits under that heading.

Scores:
- retrieval, for BM25 alone, dense alone and hybrid, over the in-scope questions: MRR@10 (1 / rank of the first
  relevant chunk, 0 past 10) and recall@{1,5,10} (the share of questions with a relevant chunk in the top k);
- hand-off, out-of-scope questions being the positive class: precision, recall and F1 of the retrieval gate alone
  (the best dense score under the threshold) and, with a model, of the whole assistant (gate, then the check);
- answers (with a model): the supported-answer rate (in-scope questions answered, not handed off, every checked
  sentence backed by a cited passage), ROUGE-L of the answers (citation markers taken out) against the
  references (handed-off questions score 0), and the latency of retrieval and of a whole answer (p50 / p95).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tunelab.errors import UserError
from tunelab.evaluate.language import rouge_l
from tunelab.rag.answer import Assistant, without_markers
from tunelab.rag.index import MODES

K = 10


def load_questions(path: str | Path) -> list[dict]:
    """The question set; a line that is not a question object is a `UserError` naming it."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the questions ({err})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or \
                not isinstance(row.get("in_scope"), bool):
            raise UserError(f"{path}:{n}: a question needs `question` (text) and `in_scope` (true or false)")
        if row["in_scope"] and not all(isinstance(row.get(k), str) for k in ("doc", "heading", "answer")):
            raise UserError(f"{path}:{n}: an in-scope question needs the `doc` and `heading` that answer it and a "
                            "reference `answer`")
        history = row.get("history") or []
        if not isinstance(history, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str) for m in history):
            raise UserError(f"{path}:{n}: `history` is a list of messages ({{\"role\": \"user\" or \"assistant\", "
                            "\"content\": text}})")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no questions")
    return rows


def messages_of(q: dict) -> list[dict]:
    return [*(q.get("history") or []), {"role": "user", "content": q["question"]}]


def relevant_chunks(assistant: Assistant, q: dict) -> set[tuple[str, int, int]]:
    return {(c.doc_id, c.start, c.end) for c in assistant.index.chunks
            if c.doc_id == q["doc"] and q["heading"] in c.headings}


def retrieval_scores(assistant: Assistant, questions: list[dict]) -> dict:
    """Per mode: MRR@10 and recall@{1,5,10} over the in-scope questions whose entry the index holds."""
    index, scored = assistant.index, [q for q in questions if q["in_scope"]]
    wanted = [relevant_chunks(assistant, q) for q in scored]
    missing = sum(1 for w in wanted if not w)
    queries = [assistant.query(messages_of(q)) for q in scored]
    vectors = assistant.encoder(queries)
    out: dict = {"questions": len(scored) - missing, "entries_not_in_index": missing}
    for mode in MODES:
        ranks, seconds = [], []
        for query, vector, want in zip(queries, vectors, wanted):
            if not want:
                continue
            t = time.perf_counter()
            hits = index.search(query, K, mode, vector=vector)
            seconds.append(time.perf_counter() - t)
            found = [r for r, h in enumerate(hits, start=1) if (h.chunk.doc_id, h.chunk.start, h.chunk.end) in want]
            ranks.append(found[0] if found else None)
        n = max(len(ranks), 1)
        out[mode] = {"mrr@10": round(sum(1 / r for r in ranks if r) / n, 4),
                     **{f"recall@{k}": round(sum(1 for r in ranks if r and r <= k) / n, 4) for k in (1, 5, 10)},
                     "search_ms_p50": round(float(np.median(seconds)) * 1000, 2) if seconds else None}
    return out


def prf(predicted: list[bool], actual: list[bool]) -> dict:
    """Precision, recall and F1 of `predicted` against `actual` (True: the positive class)."""
    tp = sum(p and a for p, a in zip(predicted, actual))
    fp = sum(p and not a for p, a in zip(predicted, actual))
    fn = sum(a and not p for p, a in zip(predicted, actual))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "tp": tp, "fp": fp,
            "fn": fn}


def answer_scores(assistant: Assistant, questions: list[dict], answer: Callable[[list[dict]], str]) -> tuple[dict,
                                                                                                          list[dict]]:
    """Every question through the assistant (retrieval, gate, `answer` from the prompt's messages, check) ->
    (scores, one row per question)."""
    rows = []
    for q in questions:
        t = time.perf_counter()
        retrieval = assistant.retrieve(messages_of(q))
        if not assistant.grounded(retrieval):
            verdict, raw = assistant.handoff("no_relevant_passage"), None
        else:
            raw = answer(assistant.prompt(messages_of(q), retrieval))
            verdict = assistant.check(raw, retrieval)
        rows.append({"id": q.get("id"), "in_scope": q["in_scope"], "question": q["question"], "model_answer": raw,
                     "reply": verdict.text, "handoff": verdict.handoff, "citations": verdict.citations,
                     "rouge_l": round(rouge_l(without_markers(verdict.text), q["answer"]), 4)
                     if q["in_scope"] and verdict.handoff is None else 0.0,
                     "seconds": round(time.perf_counter() - t, 3)})
    inside = [r for r in rows if r["in_scope"]]
    seconds = [r["seconds"] for r in rows]
    return {"supported_answer_rate": round(sum(r["handoff"] is None for r in inside) / max(len(inside), 1), 4),
            "rouge_l": round(float(np.mean([r["rouge_l"] for r in inside])) if inside else 0.0, 4),
            "handoff": prf([r["handoff"] is not None for r in rows], [not r["in_scope"] for r in rows]),
            "handoff_reasons": {k: sum(r["handoff"] == k for r in rows) for k in
                                ("no_relevant_passage", "unsupported_answer", "model_declined")},
            "answer_seconds_p50": round(float(np.percentile(seconds, 50)), 3),
            "answer_seconds_p95": round(float(np.percentile(seconds, 95)), 3)}, rows


def evaluate_rag(assistant: Assistant, questions: list[dict],
                 answer: Callable[[list[dict]], str] | None = None) -> dict:
    """The report: retrieval per mode, the retrieval gate's hand-off, and with `answer` the whole assistant."""
    gate = [not assistant.grounded(assistant.retrieve(messages_of(q))) for q in questions]
    report = {"kind": "rag-report", "questions": len(questions), "in_scope": sum(q["in_scope"] for q in questions),
              "settings": {k: v for k, v in vars(assistant.settings).items() if k != "handoff"},
              "retrieval": retrieval_scores(assistant, questions),
              "handoff_gate": prf(gate, [not q["in_scope"] for q in questions])}
    if answer is not None:
        report["answers"], report["rows"] = answer_scores(assistant, questions, answer)
    return report
