"""POST /v1/recommend: a recommender dir's items for a user or a history (`tunelab.recommend.serving`). Scoring
runs on a worker thread (the event loop stays free); an unknown user or item is never an error (the answer's
`strategy` and `unknown_items` say what happened)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from tunelab.serve.protocol import Recommendation, RecommendedItem, RecommendRequest
from tunelab.serve.state import Call, model_call

router = APIRouter()


@router.post("/v1/recommend")
async def recommend(call: Annotated[Call, Depends(model_call(RecommendRequest, "recommend"))]):
    """`{"model", "user"?, "history"?, "history_texts"?, "k", "exclude_seen"}` -> a `Recommendation`. Errors are
    `model_call`'s (401, 429, 503 loading, 400 body, 404, 400 for a model of another kind)."""
    body = call.body
    answer = await asyncio.to_thread(call.served.recommender.recommend, body.user, body.history,
                                     body.history_texts, body.k, body.exclude_seen)
    call.observe_latency("/v1/recommend")
    return Recommendation(model=call.served.id, strategy=answer["strategy"], user_known=answer["user_known"],
                          unknown_items=answer["unknown_items"], latency_ms=answer["latency_ms"],
                          data=[RecommendedItem(rank=n + 1, **row) for n, row in enumerate(answer["items"])]
                          ).response()
