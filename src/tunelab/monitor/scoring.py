"""Scoring a batch of texts: sentiment from a classification model dir or its ONNX export, entities from a watch-list
of names with aliases and/or an NER model dir.

A document's score is p(positive) - p(negative) (in [-1, 1]; without a positive label, -p(negative)); it counts as
negative when the model's top label is the negative one.

Watch-list aliases match as whole words where they begin or end with a Latin letter or digit (`UAL` is not found
in `UALR`), anywhere otherwise (a Chinese name inside a Chinese sentence, which has no spaces); an alias written all
in capitals (a ticker) matches only in capitals, any other alias in any case.
"""

from __future__ import annotations

import re

from tunelab.config import MonitorEntities, MonitorSentiment
from tunelab.errors import UserError
from tunelab.models import max_length_of
from tunelab.monitor.store import OVERALL
from tunelab.serve.registry import check_specs, load_encoder
from tunelab.tasks.classification import ClassificationTask, softmax
from tunelab.tasks.token_classification import TokenClassificationTask

MAX_ENTITY_CHARS = 200


def _encoder(ref: str, kind: str, what: str):
    import torch  # the models run on the GPU when there is one

    spec = check_specs([ref], None)[0]
    if spec.kind != kind:
        raise UserError(f"{what} {ref} serves '{spec.kind}', not '{kind}': give a "
                        f"{'classification' if kind == 'classify' else 'NER'} model dir or its ONNX export")
    task = "classification" if kind == "classify" else "token_classification"
    return load_encoder(spec, "cuda" if torch.cuda.is_available() else "cpu", task)


def _label(labels: list[str], given: str | None, names: tuple[str, ...], what: str, required: bool) -> int | None:
    if given is not None:
        if given not in labels:
            raise UserError(f"sentiment.{what}_label '{given}' is not a label of the model ({', '.join(labels)})")
        return labels.index(given)
    found = [i for i, lab in enumerate(labels) if lab.strip().lower() in names]
    if found:
        return found[0]
    if required:
        raise UserError(f"the sentiment model has no label named {' or '.join(names)} ({', '.join(labels)}): "
                        f"set sentiment.{what}_label")
    return None


class SentimentScorer:
    """texts -> (label, negative, score) each, batched by length."""

    def __init__(self, cfg: MonitorSentiment):
        self.model, tok, meta = _encoder(cfg.model, "classify", "sentiment.model")
        self.labels = list(meta["labels"])
        self.task = ClassificationTask(tok, self.labels, max_length_of(meta))
        self.neg = _label(self.labels, cfg.negative_label, ("negative", "neg"), "negative", True)
        self.pos = _label(self.labels, cfg.positive_label, ("positive", "pos"), "positive", False)
        self.batch_size = cfg.batch_size

    def __call__(self, texts: list[str]) -> list[tuple[str, bool, float]]:
        if not texts:
            return []
        import torch  # loaded with the model already; here only for no_grad

        enc = self.task.encode([{"text": t} for t in texts], labelled=False)
        with torch.inference_mode():
            probs = softmax(self.task.logits(self.model, enc, self.batch_size))
        out = []
        for p in probs:
            top = int(p.argmax())
            score = (float(p[self.pos]) if self.pos is not None else 0.0) - float(p[self.neg])
            out.append((self.labels[top], top == self.neg, round(score, 6)))
        return out


class EntityFinder:
    """texts -> the entity names each mentions (watch-list names, and NER names), sorted, without repeats."""

    def __init__(self, cfg: MonitorEntities):
        self.canonical: dict[str, str] = {}  # alias as matched (lower-cased unless all capitals) -> its name
        exact, folded = [], []
        for item in cfg.watchlist:
            for alias in dict.fromkeys([item.name, *item.aliases]):
                alias = alias.strip()
                if not alias:
                    continue
                capitals = alias.upper() == alias and alias.lower() != alias
                (exact if capitals else folded).append(alias)
                self.canonical[alias if capitals else alias.lower()] = item.name
        self.exact = _alternation(exact, 0)
        self.folded = _alternation(folded, re.IGNORECASE)
        self.names = [item.name for item in cfg.watchlist]
        self.ner = None
        if cfg.ner_model:
            model, tok, meta = _encoder(cfg.ner_model, "entities", "entities.ner_model")
            self.ner = (model, TokenClassificationTask(tok, list(meta["labels"]), max_length_of(meta)))
            self.ner_types = set(cfg.ner_types)

    def __call__(self, texts: list[str]) -> list[list[str]]:
        found = [set() for _ in texts]
        for i, text in enumerate(texts):
            for pattern, fold in ((self.exact, False), (self.folded, True)):
                if pattern is not None:
                    for m in pattern.finditer(text):
                        found[i].add(self.canonical[m.group(0).lower() if fold else m.group(0)])
        if self.ner is not None and texts:
            import torch  # loaded with the model already

            model, task = self.ner
            with torch.inference_mode():
                tagged = task.text_entities(model, texts, 16)
            for i, t in enumerate(tagged):
                found[i].update(self._name(e["text"]) for e in t["entities"] if e["type"] in self.ner_types)
        return [sorted(f - {"", OVERALL}) for f in found]

    def _name(self, text: str) -> str:
        text = " ".join(text.split()).strip(" .,;:!?\"'()[]")[:MAX_ENTITY_CHARS]
        if len(text) < 2:
            return ""
        return self.canonical.get(text) or self.canonical.get(text.lower()) or text


def _alternation(aliases: list[str], flags: int):
    if not aliases:
        return None
    parts = []
    for alias in sorted(set(aliases), key=len, reverse=True):  # the longest alias first: "United Airlines" > "United"
        head = r"(?<![A-Za-z0-9_])" if re.match(r"[A-Za-z0-9_]", alias[0]) else ""
        tail = r"(?![A-Za-z0-9_])" if re.match(r"[A-Za-z0-9_]", alias[-1]) else ""
        parts.append(head + re.escape(alias) + tail)
    return re.compile("|".join(parts), flags)
