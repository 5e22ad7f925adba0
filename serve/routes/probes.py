"""Liveness, readiness and Prometheus metrics: what an orchestrator and a scraper call (the first two need no key)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve.schemas import HealthResponse
from serve.state import ServiceState, service

router = APIRouter(tags=["probes"])
State = Annotated[ServiceState, Depends(service)]


@router.get("/health", response_model=HealthResponse)
async def health(state: State) -> dict[str, Any]:
    """Liveness (and Label Studio's health check): the process answers."""
    return {"status": "UP", "model_version": state.runtime.model_version}


@router.get("/ready", response_model=HealthResponse,
            responses={503: {"description": "not ready: starting, stopping or the batch worker is gone"}})
async def ready(state: State) -> Any:
    """Readiness: the model is loaded and warmed up and the batch worker runs."""
    if state.ready and state.batcher.running:
        return {"status": "READY", "model_version": state.runtime.model_version}
    return JSONResponse({"status": "NOT_READY", "model_version": state.runtime.model_version}, 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def prometheus_metrics(state: State) -> Response:
    """Prometheus metrics of this process."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
