"""The ASGI app: routes, the guard in front of them, and the error envelope for everything that fails.

`Guard` (pure ASGI, outermost) counts every request by route and status, answers 503 while draining, 403 to
a keyless server addressed by a non-loopback Host (DNS rebinding), and — before a byte of a body is read —
401 without a valid key, 415 unless the body is declared `application/json` (a web page cannot send that
cross-origin without a preflight) and 413 for bodies over the limit. Exception handlers turn every error —
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
from starlette.requests import ClientDisconnect

from tunelab.config import ServeConfig
from tunelab.serve.auth import is_loopback_host
from tunelab.serve.protocol import APIError
from tunelab.serve.registry import Spec
from tunelab.serve.routes import encoders, generation, recommend, system, tokenizer
from tunelab.serve.state import ServerState

log = logging.getLogger("tunelab.serve")

ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/entities", "/v1/embeddings",
          "/tokenize", "/detokenize", "/tokenizer_info", "/health", "/ready", "/metrics", "/", "/admin/reload"}
ADMIN = "/admin/"  # its routes check the admin keys themselves (the API keys do not open them)
OPEN_WHILE_DRAINING = {"/health", "/ready", "/metrics"}


def create_app(settings: ServeConfig, specs: list[Spec], keys: list[str], device: str = "cpu") -> FastAPI:
    """The app serving `specs` (no `keys`: no authentication, loopback Host only), returned wrapped in `Guard`,
    whose `.state` is the `ServerState`. The lifespan starts loading the models in the background (the app
    answers at once; /ready says when they are up) and stops their engines at shutdown."""
    st = ServerState(settings, specs, keys, device)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.start_loading()
        yield
        st.close()

    app = FastAPI(title="tunelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tunelab = st
    for module in (generation, encoders, recommend, tokenizer, system):
        app.include_router(module.router)

    install_error_handlers(app)
    return Guard(app, st)


def install_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's envelope: ours (`APIError`), Starlette's 404/405, a body that does not validate (400)
    and any bug (500, its traceback to the log only)."""

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

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, err: ClientDisconnect):
        return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)  # never sent

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)
        body = APIError(500, "internal server error", type="server_error").body()
        return JSONResponse(body, status_code=500)


class Guard:
    """Pure ASGI middleware: request metrics, drain refusal, Host check (keyless), and for requests with a
    body, before any of it is read: the key, the JSON media type, the size limit."""

    def __init__(self, app, state, routes: set[str] = ROUTES):
        # `state`: a `ServerState`, or another app's state with the same `settings.max_body_bytes`, `keys`,
        # `authenticate`, `draining` and `metrics.requests` / `.rejections`; the server (drain, load errors) and
        # tests reach it here. `routes`: the paths counted under their own name in the request metric.
        self.app, self.state, self.routes = app, state, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        # the metric's route label takes a fixed set of values, so that arbitrary paths cannot add series
        route = path if path in self.routes else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}  # what is counted when the app fails before it starts a response

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                version = scope.get("state", {}).get("tunelab_version")
                if version:  # the registry version that answered (set by the route once it has its model)
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-tunelab-version", version.encode())]}
            await send(message)

        try:
            if self.state.draining and path not in OPEN_WHILE_DRAINING:
                self.state.metrics.rejections.labels("draining").inc()
                return await _reply(counted_send, APIError(503, "the server is shutting down", type="server_error",
                                                           code="shutting_down", headers={"Connection": "close"}))
            headers = dict(scope["headers"])
            with_body = scope["method"] in ("POST", "PUT", "PATCH")
            try:
                self._check_origin(headers)
                if with_body:  # before a byte of the body is read
                    if not path.startswith(ADMIN):
                        self.state.authenticate(_text(headers.get(b"authorization")))
                    self._check_json(headers)
            except APIError as err:
                err.headers.setdefault("Connection", "close")
                return await _reply(counted_send, err)
            limit = self.state.settings.max_body_bytes
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await self._too_large(counted_send, limit)
            if length is None and with_body:  # chunked: read it here, capped, then replay it to the app
                body = await _read_capped(receive, limit)
                if body is None:
                    return await self._too_large(counted_send, limit)
                receive = _replay(body, receive)
            await self.app(scope, receive, counted_send)
        finally:
            self.state.metrics.requests.labels(route, str(status["code"])).inc()

    def _check_origin(self, headers: dict) -> None:
        """Without keys, only loopback Host values: a web page cannot reach this server through a DNS name
        that it re-points at 127.0.0.1 (DNS rebinding)."""
        host = headers.get(b"host")
        if self.state.keys.enabled or host is None or is_loopback_host(_text(host)):
            return
        self.state.metrics.rejections.labels("host").inc()
        raise APIError(403, "this server has no API keys and answers only requests addressed to a loopback host "
                       "(localhost, 127.0.0.1, [::1]); set API keys to serve other names", code="host_not_allowed")

    def _check_json(self, headers: dict) -> None:
        """POST bodies must say they are JSON: a web page can send `text/plain` to any server without asking
        (no CORS preflight), but not `application/json`."""
        media = _text(headers.get(b"content-type")).split(";")[0].strip().lower()
        if media != "application/json":
            self.state.metrics.rejections.labels("content_type").inc()
            raise APIError(415, "send the body as JSON with the header Content-Type: application/json",
                           code="unsupported_media_type")

    async def _too_large(self, send, limit: int):
        self.state.metrics.rejections.labels("body_too_large").inc()
        await _reply(send, APIError(413, f"the request body is over the limit of {limit} bytes",
                                    code="request_too_large", headers={"Connection": "close"}))


def _text(value: bytes | None) -> str:
    # header bytes are latin-1 in ASGI; any byte decodes, so a malformed header cannot raise here
    return value.decode("latin-1") if value is not None else ""


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
