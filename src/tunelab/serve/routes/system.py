"""GET /v1/models, /health (liveness), /ready (models loaded), /metrics (Prometheus), / (playground)."""

from __future__ import annotations

from importlib import resources

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tunelab.serve.protocol import APIError, ModelList, Status
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
