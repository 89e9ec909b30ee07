"""`/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz` (database reachable,
broker connected): what a scraper and a load balancer call. `/healthz` and `/readyz` need no token;
`/metrics` needs none only when `[metrics]` says it is open (by default: the server is bound to a
loopback address), else the API token like `/api`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.deps import CREDENTIALS, authenticate, ensure_role
from cloud_bridge.metrics import RegistryCollector
from cloud_bridge.store.registry import Registry

router = APIRouter(include_in_schema=False)


def metrics_registry(registry: Registry, config: BridgeConfig) -> CollectorRegistry:
    """A Prometheus registry holding only the bridge's collector (no process metrics of the default one)."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(RegistryCollector(registry, config.metrics.device_labels))
    return collectors


@router.get("/metrics")
def metrics(request: Request, credentials: HTTPAuthorizationCredentials | None = CREDENTIALS) -> Response:
    config: BridgeConfig = request.app.state.config
    if not config.metrics.is_open(config.http.host):
        ensure_role(authenticate(request, credentials), "viewer", "/metrics")
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """200 when the registry answers a query and the broker link is up; 503 naming what is not."""
    problems = []
    try:
        request.app.state.registry.observations.ping()
    except Exception as exc:  # any failure of the database is "not ready", reported, never raised
        problems.append(f"database unreachable: {type(exc).__name__}: {exc}")
    broker_connected: Callable[[], bool] | None = request.app.state.broker_connected
    if broker_connected is not None and not broker_connected():
        problems.append("broker not connected (see the bridge's log for the reconnect attempts)")
    if problems:
        return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready", "problems": []})
