"""The ASGI app: routes, the guard in front of them, and the error envelope for everything that fails.

`Guard` (pure ASGI, outermost) counts every request by route and status, answers 503 while draining and
413 for bodies over the limit before a byte of them is parsed. Exception handlers turn every error —
ours, Starlette's 404/405, and any bug (500, traceback to the log only) — into OpenAI's envelope.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tunelab.config import ServeConfig
from tunelab.serve.protocol import APIError
from tunelab.serve.registry import Spec
from tunelab.serve.routes import encoders, generation, system
from tunelab.serve.state import ServerState

log = logging.getLogger("tunelab.serve")

ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/entities", "/v1/embeddings", "/health",
          "/ready", "/metrics", "/"}
OPEN_WHILE_DRAINING = {"/health", "/ready", "/metrics"}


def create_app(settings: ServeConfig, specs: list[Spec], keys: list[str], device: str = "cpu") -> FastAPI:
    st = ServerState(settings, specs, keys, device)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.start_loading()
        yield
        st.close()

    app = FastAPI(title="tunelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tunelab = st
    for module in (generation, encoders, system):
        app.include_router(module.router)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        message = {404: "no such route", 405: "method not allowed"}.get(err.status_code, "bad request")
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(APIError(400, "invalid request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)
        body = APIError(500, "internal server error", type="server_error").body()
        return JSONResponse(body, status_code=500)

    return Guard(app, st)


class Guard:
    """Pure ASGI middleware: request metrics, drain refusal, body size limit."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state  # the server (drain, load errors) and tests reach the state here

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.state.draining and path not in OPEN_WHILE_DRAINING:
                self.state.metrics.rejections.labels("draining").inc()
                return await _reply(counted_send, APIError(503, "the server is shutting down", type="server_error",
                                                           code="shutting_down", headers={"Connection": "close"}))
            limit = self.state.settings.max_body_bytes
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await self._too_large(counted_send, limit)
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body = await _read_capped(receive, limit)
                if body is None:
                    return await self._too_large(counted_send, limit)
                receive = _replay(body, receive)
            await self.app(scope, receive, counted_send)
        finally:
            self.state.metrics.requests.labels(route, str(status["code"])).inc()

    async def _too_large(self, send, limit: int):
        self.state.metrics.rejections.labels("body_too_large").inc()
        await _reply(send, APIError(413, f"the request body is over the limit of {limit} bytes",
                                    code="request_too_large", headers={"Connection": "close"}))


async def _reply(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_capped(receive, limit: int) -> bytes | None:
    """A chunked body, or None once it passes `limit`."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
