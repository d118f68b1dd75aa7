"""Recommendations for one request, as `tunelab recommend show` and `POST /v1/recommend` answer them.

A request names a user of the model's data, or gives a history (item ids of the catalogue, or item texts, oldest
first), or nothing. The strategy, in order: a known user → the model with their stored history (plus any items
given); item ids → the model on that history; texts only → the text profile (a text model, or a hybrid's text
member); nothing usable → popularity. Never an error for an unknown user or unknown items: they are reported back
(`unknown_items`) and the next strategy answers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tunelab.recommend import store
from tunelab.recommend.metrics import top_k
from tunelab.recommend.models import Text


class Recommendations:
    def __init__(self, path: str | Path):
        self.loaded = store.load(path)
        self.popularity = np.zeros(len(self.loaded.items), np.float32)
        for h in self.loaded.histories:
            np.add.at(self.popularity, h, 1.0)
        self.text = _text_model(self.loaded.model)
        self.loaded.model.warm()

    @property
    def model_name(self) -> str:
        return self.loaded.meta["model"]

    def recommend(self, user: str | None = None, items: list[str] | None = None, texts: list[str] | None = None,
                  k: int = 10, exclude_seen: bool = True) -> dict:
        start = time.perf_counter()
        rec = self.loaded
        known = [rec.item_index[i] for i in items or [] if i in rec.item_index]
        unknown = [i for i in items or [] if i not in rec.item_index]
        idx = rec.user_index.get(user, -1) if user is not None else -1
        history = np.array(known, dtype=np.int64)
        if idx >= 0:
            history = np.concatenate([rec.histories[idx], history])
            strategy = self.model_name
        elif len(history):
            strategy = self.model_name
        elif texts and self.text is not None:
            strategy = "text-profile"
        else:
            strategy = "popularity"
        allowed = np.ones((1, len(rec.items)), bool)
        if exclude_seen:
            allowed[0, history] = False
        if strategy == "text-profile":
            scores = self.text.score_texts(list(texts))[None]
        elif strategy == "popularity":
            scores = self.popularity[None]
        else:
            users = np.array([idx if idx >= 0 and not known else -1])
            scores = rec.model.score([history], users, allowed)
        top = top_k(scores, allowed, k)[0]
        out = [{"item": rec.items[i]["item"], "title": rec.items[i].get("title", ""),
                "score": round(float(scores[0, i]), 6)} for i in top if i >= 0]
        return {"items": out, "strategy": strategy, "user_known": idx >= 0, "unknown_items": unknown,
                "latency_ms": round(1000 * (time.perf_counter() - start), 3)}


def _text_model(model) -> Text | None:
    if isinstance(model, Text):
        return model
    for member in getattr(model, "members", []):
        if isinstance(member, Text):
            return member
    stage1 = getattr(model, "stage1", None)
    return _text_model(stage1) if stage1 is not None else None
