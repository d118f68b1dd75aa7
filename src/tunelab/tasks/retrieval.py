"""Retrieval: contrastive fine-tuning of a sentence encoder on (query, passage) pairs.

Rows {"query", "passage"} (with optional hard `negatives`). Queries and passages go through the same encoder and the
same pooling `tunelab.rag.index.Encoder` indexes with (`models.sentence_embeddings`: the mean over real tokens, unit
length), so a trained model dir embeds for an index exactly as it was trained. The loss is the multiple-negatives
ranking loss (InfoNCE, as sentence-transformers' MultipleNegativesRankingLoss): each query's cosine similarities to
every passage of its batch — the batch's positives, then the batch's hard negatives — times `scale`, and the
cross-entropy of its own positive among them. A candidate that is relevant to a query but not its own positive (the
same passage text in another pair of the batch, or another passage paired with the same query text) is masked out
of that query's row: it is no negative.

Hard negatives come from the data (`negatives`) and, with `model.retrieval.hard_negatives: K`, are mined once before
training: every distinct train passage is embedded by the base encoder, and each train query takes the K passages
ranked highest for it that are not relevant to it (nor the same text as one that is), ties broken by passage order.

Evaluation ranks the split's distinct passages (the corpus) for each of its distinct queries: MRR@10, recall@1/5/10
(a query's relevant set: every passage paired with it in the split) and `loss`, the contrastive loss of each query
against the whole corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tunelab import models
from tunelab.data.clean import dedup_key
from tunelab.errors import UserError
from tunelab.evaluate.metrics import ranking_metrics, top_indices
from tunelab.tasks.batch import pad_batch
from tunelab.tasks.causal_lm import PROMPT_LEARNING

MINE_CHUNK = 1024  # queries scored against the corpus at once while mining (bounds the [queries, passages] matrix)
EVAL_CELLS = 1 << 25  # query-passage scores held at once while evaluating (128 MB of float32)


@dataclass
class PairsEncoded:
    """Each distinct text of a split once (`texts` and their `tokens`, by text id), and per pair the ids of its
    query, passage and hard negatives; `relevant`: per query id, the ids of the passages paired with it."""

    texts: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    query: list[int] = field(default_factory=list)
    passage: list[int] = field(default_factory=list)
    negatives: list[list[int]] = field(default_factory=list)
    relevant: dict[int, set[int]] = field(default_factory=dict)

    @property
    def lengths(self) -> list[int]:
        """Tokens per pair (query and passage): length-grouped batching reads it."""
        return [len(self.tokens[q]) + len(self.tokens[p]) for q, p in zip(self.query, self.passage)]

    def __len__(self) -> int:
        return len(self.query)


class RetrievalTask:
    """Rows {"query", "passage"} -> a sentence encoder trained by in-batch contrast; metric: validation MRR@10
    (higher is better)."""

    name = "retrieval"
    metric = "mrr@10"
    greater_is_better = True
    packing = False

    def __init__(self, tokenizer, max_length: int, scale: float = 20.0, hard_negatives: int = 0):
        self.tokenizer, self.max_length, self.scale = tokenizer, max_length, scale
        self.hard_negatives = hard_negatives
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.labels: list[str] = []  # no label set
        self.mined: dict[str, list[str]] = {}  # query text -> mined hard negatives (`mine`)
        self.model_meta = {"retrieval": {"scale": scale, "hard_negatives": hard_negatives,
                                         "pooling": "mean, unit length"}}

    # ---- rows -> tensors -------------------------------------------------------------------------
    def encode(self, rows: list[dict]) -> PairsEncoded:
        """Tokenise each distinct text once (truncated to `max_length`); mined negatives join their query's pairs."""
        enc, ids = PairsEncoded(), {}
        # one relevant set per question: wordings that differ only in case or spacing (kept apart by data prepare,
        # as they are worth training on) share it, so neither's passage is a negative of the other
        groups: dict[str, set[int]] = {}

        def text_id(text: str) -> int:
            return ids.setdefault(text, len(ids))

        for r in rows:
            q, p = text_id(r["query"]), text_id(r["passage"])
            negatives = [*(r.get("negatives") or []), *self.mined.get(r["query"], [])]
            enc.query.append(q)
            enc.passage.append(p)
            enc.negatives.append(list(dict.fromkeys(text_id(n) for n in negatives if n != r["passage"])))
            enc.relevant[q] = groups.setdefault(dedup_key(r["query"]), set())
            enc.relevant[q].add(p)
        enc.texts = list(ids)
        enc.tokens = (self.tokenizer(enc.texts, truncation=True, max_length=self.max_length)["input_ids"]
                      if enc.texts else [])
        return enc

    def collate(self, enc: PairsEncoded, idx: list[int]) -> dict[str, torch.Tensor]:
        """The pairs `idx`: queries [B, Tq]; candidates [B + N, Tp] (the B positives, then the batch's hard
        negatives, each distinct text once); `exclude` [B, B + N]: candidates that are relevant to a query without
        being its own positive (masked out of its softmax)."""
        cands = [enc.passage[i] for i in idx]
        seen = set(cands)
        for i in idx:
            for n in enc.negatives[i]:
                if n not in seen:
                    seen.add(n)
                    cands.append(n)
        exclude = torch.zeros((len(idx), len(cands)), dtype=torch.bool)
        for row, i in enumerate(idx):
            relevant = enc.relevant[enc.query[i]]
            for col, c in enumerate(cands):
                exclude[row, col] = col != row and c in relevant
        q_ids, q_mask = pad_batch([enc.tokens[enc.query[i]] for i in idx], self.pad_id)
        p_ids, p_mask = pad_batch([enc.tokens[c] for c in cands], self.pad_id)
        return {"query_ids": q_ids, "query_mask": q_mask, "passage_ids": p_ids, "passage_mask": p_mask,
                "exclude": exclude}

    @staticmethod
    def units(enc: PairsEncoded, idx: list[int]) -> int:
        """Loss terms in these pairs: one per query."""
        return len(idx)

    # ---- loss ------------------------------------------------------------------------------------
    @staticmethod
    def embed(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit sentence embeddings [B, dim] (mean over real tokens): what `rag.index.Encoder` computes."""
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return models.sentence_embeddings(hidden.float(), mask)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over the batch's queries of the cross-entropy of its positive among the batch's candidates."""
        q = self.embed(model, batch["query_ids"], batch["query_mask"])
        p = self.embed(model, batch["passage_ids"], batch["passage_mask"])
        return contrastive_loss(q, p, batch["exclude"], self.scale)

    def through_model_forward(self) -> None:
        """Nothing to change: the embeddings are the model's forward already."""

    # ---- embeddings, mining, evaluation ------------------------------------------------------------
    @torch.no_grad()
    def embed_tokens(self, model, tokens: list[list[int]], batch_size: int) -> torch.Tensor:
        """Unit embeddings [len(tokens), dim] (float32, CPU) in input order; batched by length."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        order = np.argsort([len(t) for t in tokens], kind="stable")
        out: torch.Tensor | None = None
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            ids, mask = pad_batch([tokens[i] for i in idx], self.pad_id)
            vectors = self.embed(model, ids.to(device), mask.to(device)).cpu()
            if out is None:
                out = torch.zeros((len(tokens), vectors.shape[1]), dtype=torch.float32)
            out[idx] = vectors
        model.train(was_training)
        return out if out is not None else torch.zeros((0, 0))

    def mine(self, model, rows: list[dict], batch_size: int = 64) -> int:
        """Mine `hard_negatives` per distinct query of `rows` with `model` as it is now (see the module docstring);
        `encode` adds them to the query's pairs. -> how many were mined."""
        if not self.hard_negatives or not rows:
            return 0
        self.mined = {}
        enc = self.encode(rows)
        queries, corpus = sorted(enc.relevant), sorted(set(enc.passage))
        q_vec = self.embed_tokens(model, [enc.tokens[q] for q in queries], batch_size)
        p_vec = self.embed_tokens(model, [enc.tokens[p] for p in corpus], batch_size)
        keys = [dedup_key(enc.texts[p]) for p in corpus]
        for start in range(0, len(queries), MINE_CHUNK):
            scores = (q_vec[start:start + MINE_CHUNK] @ p_vec.T).numpy()
            for row, q in enumerate(queries[start:start + MINE_CHUNK]):
                relevant = {dedup_key(enc.texts[p]) for p in enc.relevant[q]}
                # enough candidates that K remain once the relevant ones (at most one per key) are left out
                top = top_indices(scores[row], self.hard_negatives + len(enc.relevant[q]))
                picked = [enc.texts[corpus[j]] for j in top if keys[j] not in relevant]
                self.mined[enc.texts[q]] = picked[:self.hard_negatives]
        self.model_meta["retrieval"]["mined"] = count = sum(map(len, self.mined.values()))
        return count

    def vectors(self, model, enc: PairsEncoded, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int],
                                                                             list[int]]:
        """Unit embeddings of the split's distinct queries and passages, with their text ids."""
        queries, corpus = sorted(enc.relevant), sorted(set(enc.passage))
        q_vec = self.embed_tokens(model, [enc.tokens[q] for q in queries], batch_size)
        p_vec = self.embed_tokens(model, [enc.tokens[p] for p in corpus], batch_size)
        return q_vec, p_vec, queries, corpus

    def evaluate(self, model, enc: PairsEncoded, batch_size: int, per_query: bool = False) -> dict:
        """MRR@10, recall@1/5/10 and the corpus-wide contrastive `loss` over the split's distinct queries; with
        `per_query`, each query's reciprocal rank (within 10) under `reciprocal_ranks` (for intervals). Scored a
        block of queries at a time: the [queries, passages] matrix is never whole (a large split stays in RAM)."""
        q_vec, p_vec, queries, corpus = self.vectors(model, enc, batch_size)
        column = {p: j for j, p in enumerate(corpus)}
        relevant = [{column[p] for p in enc.relevant[q]} for q in queries]
        rows = max(1, EVAL_CELLS // max(1, len(corpus)))
        rr, loss = [], 0.0
        sums = dict.fromkeys(ranking_metrics(np.zeros((0, 1)), [])["scores"], 0.0)  # an empty split scores 0
        for a in range(0, len(queries), rows):
            scores = (q_vec[a:a + rows] @ p_vec.T).numpy()
            out = ranking_metrics(scores, relevant[a:a + rows])
            rr += out["reciprocal_ranks"]
            for k, v in out["scores"].items():
                sums[k] += v * len(scores)
            logits = torch.from_numpy(scores) * self.scale
            wanted = torch.zeros_like(logits, dtype=torch.bool)
            for row, cols in enumerate(relevant[a:a + rows]):
                wanted[row, list(cols)] = True
            loss += float((torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~wanted, -torch.inf),
                                                                         1)).sum())
        n = max(1, len(queries))
        metrics = {**{k: v / n for k, v in sums.items()}, "loss": loss / n, "queries": len(queries),
                   "passages": len(corpus)}
        if per_query:
            metrics["reciprocal_ranks"] = rr
        return metrics


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, exclude: torch.Tensor, scale: float) -> torch.Tensor:
    """Sum over queries of -log softmax(scale * q·p)[own positive]: q [B, dim] and p [B + N, dim] unit vectors,
    query i's positive is p[i]; candidates marked in `exclude` [B, B + N] take no part in query i's softmax."""
    logits = (q @ p.T).float() * scale
    logits = logits.masked_fill(exclude, -torch.inf)
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device), reduction="sum")


def build(cfg, meta: dict, train_rows: list[dict]):
    """A sentence encoder (the base's bare body, AutoModel) and the retrieval task; with
    `model.retrieval.hard_negatives`, the negatives are mined here with the base, before any training."""
    from transformers import AutoModel  # transformers loads when a model does (start-up)

    mc = cfg.model
    if cfg.method.name in PROMPT_LEARNING:
        raise UserError(f"method {cfg.method.name} adds virtual tokens, which would shift the mean-pooled embeddings "
                        "an index computes without them; use full (or lora, freeze, adapter) for retrieval")
    if mc.base == "scratch":
        raise UserError("retrieval fine-tunes a pretrained encoder; model.base: scratch builds decoders only")
    base = models.resolve_base(mc.base)
    tok = models.load_tokenizer(base, mc.trust_remote_code)
    model = models.load_pretrained(AutoModel, base, dtype=torch.float32, trust_remote_code=mc.trust_remote_code,
                                   **models.dropout_kwargs(base, models.dropout_of(mc), mc.trust_remote_code))
    rc = mc.retrieval
    task = RetrievalTask(tok, mc.max_length, rc.scale, rc.hard_negatives)
    task.mine(model, train_rows, cfg.train.eval_batch_size)
    return model, tok, base, [], task
