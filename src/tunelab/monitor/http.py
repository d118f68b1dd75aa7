"""The monitor's HTTP side: POST /ingest, the dashboard (/ and /api/…), /metrics, /health, /ready.

It stands behind `tunelab serve`'s protections: the same `Guard` (keys, loopback Host without keys, JSON-only
bodies, body limit before reading) and the same per-connection limits (header size and count, slow clients,
connection cap); it binds loopback unless it has keys. With keys, every route but /health, /ready, /metrics and the
dashboard page itself needs one (the page asks for it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
from concurrent.futures import Future
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tunelab.config import DEFAULT_RATE_LIMIT, MonitorHttp
from tunelab.monitor.sources import Work
from tunelab.serve.app import Guard, install_error_handlers
from tunelab.serve.auth import Admission, KeyRing, RateLimiter
from tunelab.serve.protocol import APIError, bad_request

log = logging.getLogger("tunelab.monitor")

ROUTES = {"/ingest", "/", "/api/overview", "/api/series", "/api/alerts", "/api/documents", "/metrics", "/health",
          "/ready"}


class HttpState(Admission):
    """What the routes share, shaped for `serve.app.Guard` (settings, keys, authenticate, draining, metrics)."""

    def __init__(self, settings: MonitorHttp, keys: list[str], monitor):
        self.settings, self.keys, self.monitor = settings, KeyRing(keys), monitor
        self.metrics = monitor.metrics
        self.draining = False
        self.rate_limit = settings.rate_limit if settings.rate_limit is not None else \
            (DEFAULT_RATE_LIMIT if keys else 0)
        self.limiter = RateLimiter(self.rate_limit)
        self.on_load_error = None  # the draining server sets it; the monitor loads before it listens

def _state(request: Request) -> HttpState:
    return request.app.state.monitor


async def admitted(request: Request) -> HttpState:
    st = _state(request)
    st.admit(request)
    return st


router = APIRouter()


@router.post("/ingest")
async def ingest(request: Request, st: Annotated[HttpState, Depends(admitted)]):
    """POST /ingest `{"documents": [{id, timestamp, text, source?}, …]}` (or a list of them, or one) -> once stored:
    `{"stored", "duplicates", "rejected", "reasons": {reason: n}}`. 400 for a body that is not that shape, 413 over
    `max_documents`, 503 (Retry-After) while the pipeline's queue is full."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the body is not JSON: send {\"documents\": [{\"id\", \"timestamp\", \"text\"}, …]}") \
            from None
    docs = body.get("documents") if isinstance(body, dict) and "documents" in body else \
        body if isinstance(body, list) else [body]
    if not isinstance(docs, list):
        raise bad_request("'documents' must be a list of document objects", param="documents")
    limit = st.settings.max_documents
    if len(docs) > limit:
        raise APIError(413, f"{len(docs)} documents in one request; at most {limit} (send several requests)",
                       code="too_many_documents")
    if st.monitor.cfg.sentiment is None:
        raise APIError(404, "this monitor scores no documents (no sentiment.model in its config)",
                       code="no_documents")
    work = Work(docs, "http", done=Future())
    try:
        st.monitor.pipeline.submit(work, block=False)
    except queue.Full:
        st.metrics.rejections.labels("queue_full").inc()
        raise APIError(503, "the monitor is behind; retry shortly", type="server_error", code="overloaded",
                       headers={"Retry-After": "1"}) from None
    try:
        counts = await asyncio.wrap_future(work.done)
    except Exception:  # noqa: BLE001 - logged by the pipeline; nothing of the batch was stored
        raise APIError(503, "the documents could not be stored; nothing of them was: retry", type="server_error",
                       code="store_failed", headers={"Retry-After": "1"}) from None
    return JSONResponse(counts)


@router.get("/api/overview")
async def overview(st: Annotated[HttpState, Depends(admitted)]):
    return JSONResponse(await asyncio.to_thread(st.monitor.views.overview))


@router.get("/api/series")
async def series(st: Annotated[HttpState, Depends(admitted)], entity: str = Query("*", max_length=200),
                 windows: int = Query(168, ge=1, le=5000)):
    return JSONResponse(await asyncio.to_thread(st.monitor.views.series, entity, windows))


@router.get("/api/alerts")
async def alerts(st: Annotated[HttpState, Depends(admitted)], limit: int = Query(100, ge=1, le=1000),
                 entity: str | None = Query(None, max_length=200)):
    return JSONResponse(await asyncio.to_thread(st.monitor.views.alerts, limit, entity))


@router.get("/api/documents")
async def documents(st: Annotated[HttpState, Depends(admitted)], entity: str | None = Query(None, max_length=200),
                    limit: int = Query(20, ge=1, le=200), negative: bool = False):
    return JSONResponse(await asyncio.to_thread(st.monitor.views.documents, entity, limit, negative))


@router.get("/")
async def dashboard():
    page = resources.files("tunelab.monitor").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                       "script-src 'unsafe-inline'; img-src 'self' data:",
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@router.get("/metrics")
async def metrics(request: Request):
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    st = _state(request)
    if st.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ready"}


def create_app(settings: MonitorHttp, keys: list[str], monitor) -> Guard:
    """The monitor's ASGI app (the monitor's threads are started and stopped by the caller), wrapped in `Guard`."""
    app = FastAPI(title="tunelab monitor", docs_url=None, redoc_url=None, openapi_url=None)
    st = HttpState(settings, keys, monitor)
    app.state.monitor = st
    app.include_router(router)
    install_error_handlers(app)
    return Guard(app, st, ROUTES)
