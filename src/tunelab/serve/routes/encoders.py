"""POST /v1/classify, /v1/entities and /v1/embeddings: texts in, one result per text out, through the model's
micro-batcher (many concurrent requests share one forward)."""

from __future__ import annotations

import asyncio
import base64
import struct
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tunelab.serve.engine import EngineFull
from tunelab.serve.protocol import ClassifyRequest, EmbeddingRequest, EntitiesRequest, bad_request
from tunelab.serve.state import state

router = APIRouter()


async def _encode(request: Request, model: type, kind: str):
    """The shared part of the routes: checks, then the texts through the model's micro-batcher.
    -> (state, request body, served model, results, start time). Raises 401 (key), 429 (rate limit),
    503 (loading, or the batcher full), 400 (body; no text, or over `encoder_batch` texts; a model of
    another kind) and 404 (no such model)."""
    st = state(request)
    st.admit(request)
    start = time.perf_counter()
    req = await st.parse(request, model)
    served = st.registry.get(req.model, kind)
    texts = req.texts()
    if not texts:
        raise bad_request("input: give at least one text", param="input")
    if len(texts) > st.settings.encoder_batch:
        raise bad_request(f"input: {len(texts)} texts; at most {st.settings.encoder_batch} per request",
                          param="input")
    try:
        fut = served.batcher.submit(texts)
    except EngineFull as err:
        raise st.overloaded(err) from None
    return st, req, served, await asyncio.wrap_future(fut), start


def _usage(results: list) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


@router.post("/v1/classify")
async def classify(request: Request):
    """POST /v1/classify, `{"model", "input": text or [texts]}` -> one `{"label", "probabilities": {label: p}}`
    per text, in order, with token usage. Errors: those of `_encode`."""
    st, req, served, results, start = await _encode(request, ClassifyRequest, "classify")
    st.metrics.latency.labels("/v1/classify").observe(time.perf_counter() - start)
    return JSONResponse({"object": "list", "model": served.id, "usage": _usage(results),
                         "data": [{"object": "classification", "index": i, "label": r["label"],
                                   "probabilities": r["probabilities"]} for i, r in enumerate(results)]})


@router.post("/v1/entities")
async def entities(request: Request):
    """POST /v1/entities, the body of /v1/classify -> one `{"entities": [{"type", "text", "start", "end",
    "score"}]}` per text (character offsets), in order, with token usage. Errors: those of `_encode`."""
    st, req, served, results, start = await _encode(request, EntitiesRequest, "entities")
    st.metrics.latency.labels("/v1/entities").observe(time.perf_counter() - start)
    return JSONResponse({"object": "list", "model": served.id, "usage": _usage(results),
                         "data": [{"object": "entities", "index": i, "entities": r["entities"]}
                                  for i, r in enumerate(results)]})


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    """POST /v1/embeddings, `{"model", "input", "encoding_format", "dimensions"}` -> one unit-length embedding per
    text, in order (floats, or base64). Errors: those of `_encode`; 400 when `dimensions` is not the model's."""
    st, req, served, results, start = await _encode(request, EmbeddingRequest, "embed")
    dims = len(results[0]["embedding"])
    if req.dimensions is not None and req.dimensions != dims:
        raise bad_request(f"dimensions: '{served.id}' gives {dims}-dimensional embeddings", param="dimensions")
    st.metrics.latency.labels("/v1/embeddings").observe(time.perf_counter() - start)

    def encode(v: list[float]):
        if req.encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()  # little-endian float32, as OpenAI
        return v

    return JSONResponse({"object": "list", "model": served.id, "usage": _usage(results),
                         "data": [{"object": "embedding", "index": i, "embedding": encode(r["embedding"])}
                                  for i, r in enumerate(results)]})
