"""The retrieval report: a fine-tuned sentence encoder, its base encoder (before tuning) and BM25 on the same split.

The split's distinct passages are the corpus and its distinct queries the questions; a query's relevant passages are
all those paired with it in the split. Each side ranks the whole corpus for each query: the encoders by cosine
similarity of their mean-pooled unit embeddings (`tasks.retrieval.RetrievalTask`), BM25 (bm25s, the terms of
`rag.index.lexical_tokens`, as an index folder's lexical side) by its score. Scores: MRR@10 and recall@1/5/10, with
95% intervals over resampled queries and paired comparisons of each query's reciprocal rank (significance.py).
"""

from __future__ import annotations

import bm25s
import numpy as np
import torch
from transformers import AutoModel

from tunelab.config import EvalConfig
from tunelab.evaluate import significance as sg
from tunelab.evaluate.metrics import ranking_metrics
from tunelab.models import load_pretrained, max_length_of, resolve_base
from tunelab.rag.index import lexical_tokens
from tunelab.tasks.retrieval import RetrievalTask

KEY = "mrr@10"


def retrieval_report(model, tok, meta: dict, rows: list[dict], eval_cfg: EvalConfig, seed: int) -> dict:
    """The model's scores on `rows` and `baselines` {"base", "bm25"} (name and the same scores each); with
    `eval_cfg.bootstrap`, `statistics`, `intervals` and paired `comparisons` on MRR@10."""
    task = RetrievalTask(tok, max_length_of(meta), scale=(meta.get("retrieval") or {}).get("scale", 20.0))
    enc = task.encode(rows)
    report = {**task.evaluate(model, enc, eval_cfg.batch_size, per_query=True), "n": len(enc.relevant)}
    rr = {"model": report.pop("reciprocal_ranks")}
    base_ref = meta["base"]["ref"]
    base = load_pretrained(AutoModel, resolve_base(base_ref), dtype=torch.float32)
    before = task.evaluate(base.to(next(model.parameters()).device), enc, eval_cfg.batch_size, per_query=True)
    rr["base"] = before.pop("reciprocal_ranks")
    lexical = bm25_scores(enc)
    rr["bm25"] = lexical.pop("reciprocal_ranks")
    report["baselines"] = {
        "base": {"name": f"base {base_ref.removeprefix('builtin:')} (before tuning)", **before, "train_examples": 0},
        "bm25": {"name": "BM25 (bm25s)", **lexical["scores"], "train_examples": 0}}
    _statistics(report, rr, eval_cfg.bootstrap, seed)
    return report


def bm25_scores(enc) -> dict:
    """BM25's ranking of the split's corpus for each of its queries (as `RetrievalTask.scores` orders them) ->
    `ranking_metrics`."""
    queries, corpus = sorted(enc.relevant), sorted(set(enc.passage))
    retriever = bm25s.BM25()
    retriever.index([lexical_tokens(enc.texts[p]) or ["\x00"] for p in corpus], show_progress=False)
    scores = np.zeros((len(queries), len(corpus)), dtype=np.float32)
    for row, q in enumerate(queries):
        terms = [t for t in lexical_tokens(enc.texts[q]) if t in retriever.vocab_dict]
        if terms:  # no known term: every passage scores 0 (ranked by position, found by chance at most)
            scores[row] = retriever.get_scores(terms)
    column = {p: j for j, p in enumerate(corpus)}
    return ranking_metrics(scores, [{column[p] for p in enc.relevant[q]} for q in queries])


def _statistics(report: dict, rr: dict[str, list[float]], resamples: int, seed: int) -> None:
    """95% intervals of MRR@10 (over resampled queries) for the model and each baseline, and the paired
    comparisons of the model's reciprocal ranks with each baseline's."""
    if not resamples:
        return
    report["statistics"] = sg.settings(resamples, seed, "query")
    report["intervals"] = {KEY: sg.mean_interval(rr["model"], resamples, seed)}
    report["comparisons"] = {}
    for k in report["baselines"]:
        report["baselines"][k]["intervals"] = {KEY: sg.mean_interval(rr[k], resamples, seed)}
        c = sg.compare_means(rr["model"], rr[k], resamples, seed)
        report["comparisons"][k] = {"rows": c.pop("rows"), KEY: c}
