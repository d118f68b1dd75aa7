"""What every route of one server shares: settings, keys, rate limits, metrics, the models; and the checks
each inference request passes before any model work (ready, key, rate, body), as the FastAPI dependencies
the routes declare: `admitted` (key, rate limit, readiness) and `model_call(body, kind)` (admitted, the body
parsed, the model it names looked up) — one preamble per endpoint group."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fastapi import Request

from tunelab.config import DEFAULT_RATE_LIMIT, ServeConfig
from tunelab.errors import UserError
from tunelab.serve.auth import ADMIN_ENV_KEYS, Admission, KeyRing, RateLimiter, read_keys
from tunelab.serve.engine import EngineFull
from tunelab.serve.follow import Follower
from tunelab.serve.metrics import Metrics
from tunelab.serve.protocol import APIError, parse_body
from tunelab.serve.registry import Registry, Served, Spec

log = logging.getLogger("tunelab.serve")


class ServerState(Admission):
    def __init__(self, settings: ServeConfig, specs: list[Spec], keys: list[str], device: str):
        self.settings = settings
        self.keys = KeyRing(keys)
        self.rate_limit = settings.rate_limit if settings.rate_limit is not None else \
            (DEFAULT_RATE_LIMIT if keys else 0.0)
        self.limiter = RateLimiter(self.rate_limit)
        self.metrics = Metrics()
        self.registry = Registry(specs, settings, self.metrics, device)
        self.admin_keys = KeyRing(read_keys(settings.admin_keys_file, ADMIN_ENV_KEYS, "admin keys"))
        self.follower = Follower(self.registry, settings, self.metrics)
        self.draining = False
        self.load_error: str | None = None
        self.on_load_error = _log_load_error  # the server replaces it: stop, the models will never be ready
        self._loader: threading.Thread | None = None

    def start_loading(self) -> None:
        """Load the models on a background thread and return at once; `registry.ready` turns True when all are
        up. A failure sets `load_error` (a `UserError`'s message, else a generic one) and calls `on_load_error`."""
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            self.registry.load()
            self.follower.start()
        except Exception as err:
            self.load_error = str(err) if isinstance(err, UserError) else "loading the models failed"
            self.on_load_error(err)

    def close(self) -> None:
        """Stop following the registry, then every engine and micro-batcher (sequences still in an engine end with
        an error event)."""
        self.follower.close()
        self.registry.close()

    # ---- per-request checks ----------------------------------------------------------------------
    def admit(self, request: Request) -> str:
        """Key, then rate limit, then readiness. -> the caller's id (key digest prefix or client host)."""
        who = Admission.admit(self, request)
        if not self.registry.ready:
            raise APIError(503, "the models are still loading", type="server_error", code="not_ready",
                           headers={"Retry-After": "5"})
        return who

    async def parse(self, request: Request, model):
        """The body as a validated request; parsed off the event loop (a large body takes a while)."""
        return await asyncio.to_thread(parse_body, await request.body(), model)

    def overloaded(self, err: EngineFull) -> APIError:
        """Count an overload rejection; -> the 503 (`Retry-After: 1`) for the caller to raise."""
        self.metrics.rejections.labels("overload").inc()
        return APIError(503, f"{err}; retry shortly", type="server_error", code="overloaded",
                        headers={"Retry-After": "1"})


def _log_load_error(err: Exception) -> None:
    if isinstance(err, UserError):
        log.error("error: %s", err)
    else:
        log.error("loading the models failed", exc_info=err)


def state(request: Request) -> ServerState:
    """The `ServerState` of the app serving `request`."""
    return request.app.state.tunelab


async def admitted(request: Request) -> ServerState:
    """Dependency of every keyed endpoint: the key, the rate limit, readiness (401, 429, 503) -> the state."""
    st = state(request)
    st.admit(request)
    return st


@dataclass
class Call:
    """An admitted inference request: the server, its parsed body, the model it names, when it was admitted, and
    the request (whose `state.tunelab_version` the response's `X-Tunelab-Version` header shows)."""

    state: ServerState
    body: Any  # the endpoint's request model (`protocol.ChatRequest`, …)
    served: Served
    start: float  # perf_counter() when its work starts: admission; generation resets it at engine submission
    request: Request | None = None

    def __post_init__(self) -> None:
        self._show_version()

    def swapped(self) -> bool:
        """Whether the model was replaced by a new registry version since the lookup (its engine then refuses new
        work): if so, `served` becomes the one answering now -> True."""
        now = self.state.registry.models.get(self.served.id)
        if now is None or now is self.served:
            return False
        self.served = now
        self._show_version()
        return True

    def _show_version(self) -> None:
        if self.request is not None and self.served.version:
            self.request.state.tunelab_version = self.served.version

    def observe_latency(self, route: str) -> None:
        """Record the request's latency (from `start`) under `route`."""
        self.state.metrics.latency.labels(route).observe(time.perf_counter() - self.start)

    def observe_first_token(self) -> None:
        """Record the time to the first generated text (from `start`) under the model's id."""
        self.state.metrics.ttft.labels(self.served.id).observe(time.perf_counter() - self.start)


def model_call(body: type, kind: str) -> Callable[[Request], Awaitable[Call]]:
    """The preamble of an inference endpoint as a FastAPI dependency: `admitted`, then the body parsed as `body`
    (400 naming the parameter), then the model it names looked up as a `kind` model (404; 400 for a model of
    another kind)."""

    async def call(request: Request) -> Call:
        st = await admitted(request)
        start = time.perf_counter()
        req = await st.parse(request, body)
        return Call(st, req, st.registry.get(req.model, kind), start, request)

    return call


async def disconnected(request: Request, every: float = 0.25) -> None:
    """Returns when the client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
