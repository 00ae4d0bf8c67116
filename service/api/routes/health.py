"""Liveness, readiness and Prometheus metrics: always open (no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
            summary="Bundle loaded and engine warmed (200); 'degraded' (still 200) when Redis is down")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    bundle, engine, store, host = state.bundle, state.engine, state.history, state.host
    store_state = await store.state() if store is not None else None
    engine_ready = bool(engine is not None and engine.ready)
    if bundle is None or not engine_ready:
        status = "starting" if state.starting else "unavailable"
    elif store_state == "down":
        # Requests that carry their own history still work, so stay in rotation.
        status = "degraded"
    else:
        status = "ready"
    body = Readiness(status=status, model_version=bundle.version if bundle is not None else None,
                     bundle_loaded=bundle is not None, engine=engine.name if engine is not None else None,
                     engine_ready=engine_ready, history_store=store.kind if store is not None else None,
                     history_store_state=store_state,
                     loaded_versions=host.loaded_versions if host is not None else [],
                     loading_version=host.loading if host is not None else None,
                     refused_versions=dict(host.refused) if host is not None else {})
    return JSONResponse(body.model_dump(), status_code=200 if status in ("ready", "degraded") else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "the Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)
