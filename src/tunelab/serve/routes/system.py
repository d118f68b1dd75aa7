"""GET /v1/models, /health (liveness), /ready (models loaded), /metrics (Prometheus), / (playground); POST
/admin/reload (registry models check their aliases now)."""

from __future__ import annotations

import asyncio
import json
from importlib import resources

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tunelab.errors import UserError
from tunelab.serve.protocol import APIError, ModelList, Status, bad_request
from tunelab.serve.state import ServerState, admitted, state

router = APIRouter()


@router.get("/v1/models")
async def list_models(st: Annotated[ServerState, Depends(admitted)]):
    """GET /v1/models -> a `ModelList` (`ModelCard`s: id, object, created, owned_by, tunelab_kind), in argument
    order. 401 (key), 429 (rate limit), 503 while the models load."""
    return ModelList(data=st.registry.listing()).body()


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, st: Annotated[ServerState, Depends(admitted)]):
    """GET /v1/models/{id} (an id may hold `/`) -> that model's `ModelCard`; 404 when there is none, else the
    errors of /v1/models."""
    for m in st.registry.listing():
        if m.id == model_id:
            return m.body()
    raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")


@router.post("/admin/reload")
async def admin_reload(request: Request):
    """POST /admin/reload (`Authorization: Bearer ADMIN_KEY`), optional body `{"model": id}` -> `{"models": [{id,
    alias, version, swapped, error, previous}]}`: every model served from a registry alias (or `model`) checks its
    alias now and swaps to the version it names (loaded and warmed beside the old one; a failure keeps the old one
    and is reported here). 404 when the server has no admin keys, 401 for a wrong one, 400 for a model that
    follows no alias."""
    st = state(request)
    if not st.admin_keys.enabled:
        raise APIError(404, "admin endpoints are off: start the server with --admin-keys-file or "
                       "TUNELAB_ADMIN_KEYS", code="not_found")
    if st.admin_keys.identify(request.headers.get("authorization")) is None:
        st.metrics.rejections.labels("auth").inc()
        raise APIError(401, "a valid admin key is required (Authorization: Bearer ADMIN_KEY)",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not st.registry.ready:
        raise APIError(503, "the models are still loading", type="server_error", code="not_ready",
                       headers={"Retry-After": "5"})
    body = await request.body()
    try:
        model = (json.loads(body) if body.strip() else {}).get("model")
    except (ValueError, AttributeError):
        raise bad_request("the body must be a JSON object, e.g. {\"model\": \"ID\"} or {}") from None
    try:
        result = await asyncio.to_thread(st.follower.reload, model)
    except UserError as err:
        raise bad_request(str(err), param="model") from None
    return JSONResponse({"models": result})


@router.get("/health")
async def health():
    """GET /health (liveness): 200 `{"status": "ok"}` while the process answers, loading and draining included;
    no key."""
    return Status(status="ok").body()


@router.get("/ready")
async def ready(request: Request):
    """GET /ready: 200 `{"status": "ready", "models": [ids]}` once every model is loaded, else 503 with status
    `loading`, `failed` (loading failed) or `draining`; no key."""
    st = state(request)
    if st.registry.ready and not st.draining:
        return Status(status="ready", models=[m.id for m in st.registry.listing()]).body()
    status = "draining" if st.draining else ("failed" if st.load_error else "loading")
    return JSONResponse(Status(status=status).body(), status_code=503)


@router.get("/metrics")
async def metrics(request: Request):
    """GET /metrics: this server's metrics in Prometheus' text format; no key, answered while draining too."""
    return Response(state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", include_in_schema=False)
async def playground():
    """GET /: the playground page (static/index.html), sent with `Cache-Control: no-cache`; no key."""
    page = resources.files("tunelab.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
