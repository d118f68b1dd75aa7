"""POST /v1/classify, /v1/entities and /v1/embeddings: texts in, one result per text out, through the model's
micro-batcher (many concurrent requests share one forward)."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Annotated

from fastapi import APIRouter, Depends

from tunelab.serve.engine import EngineFull
from tunelab.serve.protocol import (Classification, ClassifyRequest, Embedding, EmbeddingRequest, EncoderResults,
                                    EntitiesRequest, Entity, InputUsage, JSONBody, TextEntities, bad_request)
from tunelab.serve.state import Call, model_call

router = APIRouter()


async def _encode(call: Call) -> list[dict]:
    """The texts of an admitted request through its model's micro-batcher -> one result per text.
    400 for no text or more than `encoder_batch` texts; 503 when the batcher is full. (The errors before it,
    401, 429, 503 loading, 400 body, 404 and 400 for a model of another kind, are `model_call`'s.)"""
    texts, limit = call.body.texts(), call.state.settings.encoder_batch
    if not texts:
        raise bad_request("input: give at least one text", param="input")
    if len(texts) > limit:
        raise bad_request(f"input: {len(texts)} texts; at most {limit} per request", param="input")
    try:
        fut = call.served.batcher.submit(texts)
    except EngineFull as err:
        if not call.swapped():  # a registry model swapped since the lookup: its new version takes the request
            raise call.state.overloaded(err) from None
        try:
            fut = call.served.batcher.submit(texts)
        except EngineFull as err2:
            raise call.state.overloaded(err2) from None
    return await asyncio.wrap_future(fut)


def _answer(call: Call, route: str, results: list[dict], data: list) -> JSONBody:
    call.observe_latency(route)
    tokens = sum(r["tokens"] for r in results)
    return EncoderResults(model=call.served.id, data=data,
                          usage=InputUsage(prompt_tokens=tokens, total_tokens=tokens)).response()


@router.post("/v1/classify")
async def classify(call: Annotated[Call, Depends(model_call(ClassifyRequest, "classify"))]):
    """POST /v1/classify, `{"model", "input": text or [texts]}` -> one `Classification` (`label`,
    `probabilities` per label) per text, in order, with token usage. Errors: those of `_encode`."""
    results = await _encode(call)
    return _answer(call, "/v1/classify", results, [
        Classification(index=i, label=r["label"], probabilities=r["probabilities"]) for i, r in enumerate(results)])


@router.post("/v1/entities")
async def entities(call: Annotated[Call, Depends(model_call(EntitiesRequest, "entities"))]):
    """POST /v1/entities, the body of /v1/classify -> one `TextEntities` (each `Entity`: type, text, character
    offsets start/end, score) per text, in order, with token usage. Errors: those of `_encode`."""
    results = await _encode(call)
    return _answer(call, "/v1/entities", results, [
        TextEntities(index=i, entities=[Entity(**e) for e in r["entities"]]) for i, r in enumerate(results)])


@router.post("/v1/embeddings")
async def embeddings(call: Annotated[Call, Depends(model_call(EmbeddingRequest, "embed"))]):
    """POST /v1/embeddings, `{"model", "input", "encoding_format", "dimensions"}` -> one unit-length `Embedding`
    per text, in order (floats, or base64). Errors: those of `_encode`; 400 when `dimensions` is not the
    model's."""
    results = await _encode(call)
    req, dims = call.body, len(results[0]["embedding"])
    if req.dimensions is not None and req.dimensions != dims:
        raise bad_request(f"dimensions: '{call.served.id}' gives {dims}-dimensional embeddings", param="dimensions")

    def encode(v: list[float]) -> list[float] | str:
        if req.encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()  # little-endian float32, as OpenAI
        return v

    return _answer(call, "/v1/embeddings", results, [
        # the engine's own floats: built without validating each of them again (32 x 768 floats: ~2 ms)
        Embedding.model_construct(index=i, embedding=encode(r["embedding"])) for i, r in enumerate(results)])
