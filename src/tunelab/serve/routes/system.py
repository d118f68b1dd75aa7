"""GET /v1/models, /health (liveness), /ready (models loaded), /metrics (Prometheus), / (playground)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tunelab.serve.protocol import APIError
from tunelab.serve.state import state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request):
    st = state(request)
    st.admit(request)
    return {"object": "list", "data": st.registry.listing()}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    st = state(request)
    st.admit(request)
    for m in st.registry.listing():
        if m["id"] == model_id:
            return m
    raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    st = state(request)
    if st.registry.ready and not st.draining:
        return {"status": "ready", "models": [m["id"] for m in st.registry.listing()]}
    status = "draining" if st.draining else ("failed" if st.load_error else "loading")
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", include_in_schema=False)
async def playground():
    page = resources.files("tunelab.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
