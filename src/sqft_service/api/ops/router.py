"""``GET /ready`` (open, like ``/health``) and ``GET /metrics`` (behind the API key when keys are set).

``/ready`` tells an orchestrator or load balancer whether to send work here; it shows only check names
and short reasons, and probes often cannot send a key. ``/metrics`` is service-wide: job counts by
kind, status and error code of every project, running job ids, request rates. That is more than one
tenant should see of the others, and Prometheus sends a bearer token (``authorization:
credentials_file``), so with keys configured it needs one (any key; a key of its own, ``metrics:<key>``,
keeps the scraper out of every project's objects).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from .ready import readiness

ready_router = APIRouter(tags=["service"])
metrics_router = APIRouter(tags=["service"])


class Check(BaseModel):
    ok: bool
    error: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, Check]


@ready_router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: the failing checks say why"}},
)
def ready(request: Request) -> JSONResponse:
    """200 when every check passes, else 503 with the failing checks' errors."""
    state = request.app.state
    checks = readiness(state.settings, state.db, state.job_manager)
    ok = all(c["ok"] for c in checks.values())
    body = {"status": "ready" if ok else "not_ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: jobs, queue, running jobs' throughput, requests, uploads, failures."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
