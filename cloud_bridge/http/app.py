"""The FastAPI application of `cloud-bridge serve`: the routers, the bearer token and the error handlers.

Everything under `/api` and `/v1` needs `Authorization: Bearer <token>`: a token of the registry
(`cloud-bridge token add`) or the first line of `[http] token_file` (admin, named `file`); each route
declares the role it needs (`deps.VIEWER`, `OPERATOR`, `ADMIN`). Every call but a read goes to the audit
log (`audit.py`). The body guard (guard.py) checks the token before any body is read, and bounds the
body size. `/` (the console page), `/openapi.json`, `/docs`, `/healthz` and `/readyz` are open;
`/metrics` too when `[metrics]` allows it (cloud_bridge.http.health_routes), else it needs a viewer token.
`/artifacts/<sha256>` (model downloads by devices) needs a download token in the query instead, and
`/rollouts` is the rollouts page (it asks for an API token like the console).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError

from cloud_bridge.config import BridgeConfig
from cloud_bridge.errors import BridgeError
from cloud_bridge.http import api_routes, console_routes, health_routes, model_routes, openai_routes, page_routes
from cloud_bridge.http.audit import audit_middleware
from cloud_bridge.http.deps import (
    TOKEN_HINT,
    ApiError,
    api_error_response,
    authenticate,
    bridge_error_response,
    validation_error_response,
)
from cloud_bridge.http.guard import BodyGuard
from cloud_bridge.store.registry import Registry


def create_app(registry: Registry, config: BridgeConfig, token: str,
               broker_connected: Callable[[], bool] | None = None) -> FastAPI:
    """The FastAPI application serving one registry; `broker_connected` feeds `/readyz`."""
    app = FastAPI(title="autoglm-edge cloud bridge", version="1", docs_url=None, redoc_url=None,
                  description="Fleet API of autoglm-edge. Every /api and /v1 call needs " + TOKEN_HINT + ".")
    app.state.registry = registry
    app.state.config = config
    app.state.token = token
    app.state.broker_connected = broker_connected
    app.state.metrics = health_routes.metrics_registry(registry, config)
    app.add_exception_handler(ApiError, api_error_response)
    app.add_exception_handler(BridgeError, bridge_error_response)
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.include_router(page_routes.router)
    app.include_router(health_routes.router)
    app.include_router(model_routes.public)
    app.include_router(api_routes.router, prefix="/api", dependencies=[Depends(authenticate)])
    app.include_router(model_routes.router, prefix="/api", dependencies=[Depends(authenticate)])
    app.include_router(console_routes.router, prefix="/api", dependencies=[Depends(authenticate)])
    app.include_router(openai_routes.router, prefix="/v1", dependencies=[Depends(authenticate)])
    app.add_middleware(BodyGuard, max_body_bytes=config.http.max_body_bytes)
    app.middleware("http")(audit_middleware)  # outermost: the guard's 401s and 413s are audited too
    return app
