"""Token classification (NER): rows {"tokens", "tags"} with BIO tags.

Words are split into sub-tokens by the model's tokenizer; the first sub-token of each word carries the
word's tag, the others are ignored (-100) in the loss, and a word's prediction is its first sub-token's.
Words cut off by `max_length` are predicted "O", so truncation costs recall in the reported numbers
instead of being hidden. Entity-level precision / recall / F1 come from `seqeval` (strict span match).
Applied to raw text (`tunelab predict`, /v1/entities), texts are split into words by `data.words.split_words`
and predicted BIO tags are decoded into character spans (`bio_entities`, `text_entities`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tunelab import models
from tunelab.data.words import split_words
from tunelab.errors import UserError
from tunelab.tasks.batch import pad_batch

IGNORE = -100


@dataclass
class TokenEncoded:
    """Sub-token ids per example (unpadded, truncated) with aligned labels and word numbers; `n_words` and
    `gold` count the example's words before truncation."""

    input_ids: list[list[int]]
    labels: list[list[int]]  # per sub-token: tag id on a word's first sub-token, IGNORE elsewhere
    word_index: list[list[int]]  # per sub-token: word number on first sub-tokens, -1 elsewhere
    n_words: list[int]
    gold: list[list[str]]  # the rows' tags (empty lists when unlabelled)

    @property
    def lengths(self) -> list[int]:
        """Sub-tokens per example (special tokens included); inference sorts examples by it."""
        return [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)


def entity_metrics(true: list[list[str]], pred: list[list[str]]) -> dict:
    """Gold and predicted BIO tags (per example, one per word, the two aligned) -> seqeval's micro entity P/R/F1
    (an entity counts when type and span both match), word-level token accuracy, per-type scores with support."""
    from seqeval.metrics import classification_report  # seqeval pulls in sklearn (~1.3 s); only entity scoring needs it

    report = classification_report(true, pred, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    per_type = {k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"],
                    "support": int(v["support"])}
                for k, v in report.items() if not k.endswith(" avg")}
    flat_t = [t for s in true for t in s]
    flat_p = [p for s in pred for p in s]
    return {"entity_f1": float(micro["f1-score"]), "entity_precision": float(micro["precision"]),
            "entity_recall": float(micro["recall"]),
            "token_accuracy": float(np.mean([a == b for a, b in zip(flat_t, flat_p)])) if flat_t else 0.0,
            "per_type": per_type}


class TokenClassificationTask:
    """Rows {"tokens", "tags"} -> one BIO tag per word; metric: validation entity F1 (higher is better)."""

    name = "token_classification"
    metric = "entity_f1"
    greater_is_better = True
    packing = False
    label_smoothing = 0.0  # training's targets (`train.label_smoothing`); evaluation scores the plain loss

    def __init__(self, tokenizer, labels: list[str], max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("token classification needs a fast tokenizer (word alignment)")
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.label2id = {t: i for i, t in enumerate(self.labels)}
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id

    def encode(self, rows: list[dict], labelled: bool = True) -> TokenEncoded:
        """Tokenise rows' word lists (truncated to `max_length` sub-tokens). Labelled: a tag unknown to the model
        is a `UserError`; unlabelled rows need only "tokens" and carry no targets."""
        if labelled:
            unknown = sorted({t for r in rows for t in r["tags"]} - set(self.label2id))
            if unknown:
                raise UserError(f"tags {unknown} are unknown to this model; it knows {self.labels}")
        words = [r["tokens"] for r in rows]
        enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
        out = TokenEncoded([], [], [], [], [])
        for b, r in enumerate(rows):
            labels, index, prev = [], [], None
            for w in enc.word_ids(b):
                first = w is not None and w != prev
                index.append(w if first else -1)
                labels.append(self.label2id[r["tags"][w]] if first and labelled else IGNORE)
                prev = w
            out.input_ids.append(enc["input_ids"][b])
            out.labels.append(labels)
            out.word_index.append(index)
            out.n_words.append(len(r["tokens"]))
            out.gold.append(list(r["tags"]) if labelled else [])
        return out

    def collate(self, enc: TokenEncoded, idx: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids and attention_mask [B, T]; labels [B, T], IGNORE on padding too."""
        ids, mask = pad_batch([enc.input_ids[i] for i in idx], self.pad_id)
        labels = torch.full(ids.shape, IGNORE, dtype=torch.long)
        for row, i in enumerate(idx):
            labels[row, :len(enc.labels[i])] = torch.as_tensor(enc.labels[i])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def units(enc: TokenEncoded, idx: list[int]) -> int:
        """Loss terms in these examples: labelled first sub-tokens (words lost to truncation do not count)."""
        return sum(sum(x != IGNORE for x in enc.labels[i]) for i in idx)

    @staticmethod
    def _logits(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, -batch["input_ids"].shape[1]:]  # prompt tuning prepends virtual positions

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum (not mean) of cross-entropies over the labelled sub-tokens, so accumulation can normalise by `units`."""
        logits = self._logits(model, batch)
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="sum",
                               ignore_index=IGNORE, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def word_distributions(self, model, enc: TokenEncoded, batch_size: int
                           ) -> tuple[list[np.ndarray], float, int]:
        """The one inference loop (evaluation, prediction, ensembles): -> (per example [words, labels] softmax
        probabilities at each word's first sub-token, NaN rows for words lost to truncation), loss sum, loss
        terms (both 0 for unlabelled examples)."""
        model.eval()
        device = next(model.parameters()).device
        dists = [np.full((n, len(self.labels)), np.nan, dtype=np.float32) for n in enc.n_words]
        total, count = 0.0, 0
        order = np.argsort(enc.lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            batch = {k: v.to(device) for k, v in self.collate(enc, idx).items()}
            logits = self._logits(model, batch).float()
            total += float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum",
                                           ignore_index=IGNORE))
            count += self.units(enc, idx)
            probs = torch.softmax(logits, -1).cpu().numpy()
            for row, i in enumerate(idx):
                for pos, w in enumerate(enc.word_index[i]):
                    if w >= 0:
                        dists[i][w] = probs[row, pos]
        return dists, total, count

    def decode(self, dists: list[np.ndarray]) -> tuple[list[list[str]], list[list[float]]]:
        """Per-word distributions -> (one tag per word, that tag's probability); a word lost to truncation (a NaN
        row) is "O" with probability 1."""
        tags, probs = [], []
        for d in dists:
            seen = ~np.isnan(d).any(axis=1)
            best = np.nan_to_num(d, nan=-1.0).argmax(axis=1)
            tags.append([self.labels[b] if ok else "O" for b, ok in zip(best, seen)])
            probs.append([float(d[k, b]) if ok else 1.0 for k, (b, ok) in enumerate(zip(best, seen))])
        return tags, probs

    def _run(self, model, enc: TokenEncoded, batch_size: int) -> tuple[list[list[str]], list[list[float]], float, int]:
        """-> (one tag per word of each example, its probability; see `decode`), loss sum, loss terms."""
        dists, total, count = self.word_distributions(model, enc, batch_size)
        return (*self.decode(dists), total, count)

    def through_model_forward(self) -> None:
        """Nothing to change: the loss is the model's forward already."""

    def evaluate(self, model, enc: TokenEncoded, batch_size: int, predictions: bool = False) -> dict:
        """Entity-level P/R/F1 (seqeval), token accuracy, per-type scores and the mean token loss (and with
        `predictions`, the predicted tags per example under `predictions`)."""
        pred, _, total, count = self._run(model, enc, batch_size)
        metrics = entity_metrics(enc.gold, pred)
        metrics["loss"] = total / max(1, count)
        if predictions:
            metrics["predictions"] = pred
        return metrics

    def tags(self, model, enc: TokenEncoded, batch_size: int) -> list[list[str]]:
        """Encoded word lists -> one predicted tag per word."""
        return self._run(model, enc, batch_size)[0]

    def text_entities(self, model, texts: list[str], batch_size: int) -> list[dict]:
        """Raw texts -> per text {"entities": [{"type", "text", "start", "end", "score"}], "tokens": model tokens},
        in input order. Texts are split by `split_words` (the rule text + span NER data was prepared with);
        `start`/`end` are character offsets into the text, `text[start:end]` is the entity's text."""
        words = [split_words(t) for t in texts]
        enc = self.encode(word_rows(words), labelled=False)
        tags, probs = self.decode(self.word_distributions(model, enc, batch_size)[0])
        return text_spans(texts, words, tags, probs, enc.lengths)


def word_rows(words: list[list[tuple[str, int, int]]]) -> list[dict]:
    """`split_words` output per text -> unlabelled NER rows {"tokens"}."""
    return [{"tokens": [w for w, _, _ in ws]} for ws in words]


def text_spans(texts: list[str], words: list[list[tuple[str, int, int]]], tags: list[list[str]],
               probs: list[list[float]], n_tokens: list[int]) -> list[dict]:
    """Per text its predicted word tags -> {"entities": [{"type", "text", "start", "end", "score"}], "tokens"},
    character offsets into the text (see `TokenClassificationTask.text_entities`)."""
    out = []
    for text, ws, t, p, n in zip(texts, words, tags, probs, n_tokens):
        spans = [(ws[e["start"]][1], ws[e["end"] - 1][2], e) for e in bio_entities(t, p)]
        out.append({"entities": [{"type": e["type"], "text": text[a:b], "start": a, "end": b, "score": e["score"]}
                                 for a, b, e in spans], "tokens": n})
    return out


def bio_entities(tags: list[str], probs: list[float]) -> list[dict]:
    """Per-word BIO tags (+ each tag's probability) -> [{"type", "start", "end", "score"}], `start`/`end` word
    indices (end exclusive), `score` the mean probability of the entity's words (6 places).

    Lenient, like seqeval's default: an entity starts at B-X, or at an I-X that does not continue an X entity
    (after O, or after another type); it continues on I-X. Any other tag ("O", or one that is not B-/I-) ends it."""
    found: list[dict] = []
    current: tuple[str, int] | None = None  # (type, first word) of the open entity

    def close(end: int) -> None:
        if current is not None:
            kind, first = current
            found.append({"type": kind, "start": first, "end": end,
                          "score": round(float(np.mean(probs[first:end])), 6)})

    for i, tag in enumerate(tags):
        prefix, _, kind = tag.partition("-")
        if prefix == "I" and kind and current is not None and current[0] == kind:
            continue
        close(i)
        current = (kind, i) if prefix in ("B", "I") and kind else None
    close(len(tags))
    return found


def build(cfg, meta: dict, train_rows: list[dict]):
    """The run's model with a token-classification head over the dataset's BIO tags (see
    `tunelab.tasks.TaskSpec.build`)."""
    mc = cfg.model
    model, tok, base, new = models.load_token_classifier(mc.base, meta["labels"], mc.trust_remote_code,
                                                         models.dropout_of(mc))
    return model, tok, base, new, TokenClassificationTask(tok, models.labels_of(model), mc.max_length)
