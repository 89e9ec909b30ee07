"""What every router of the HTTP layer depends on: the registry and config of the app, who the caller
is (`authenticate`) and the role each route needs (`VIEWER`, `OPERATOR`, `ADMIN`), the error shape and
how bridge errors map to HTTP statuses, streamed responses.

Errors have one shape everywhere, OpenAI's: `{"error": {"message", "type", "param", "code"}}`, request
validation errors included (400, `param` the first offending field). An error that must not be
retried carries `x-should-retry: false`, which the official OpenAI clients obey.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from autoglm_wire import settings
from cloud_bridge.config import BridgeConfig
from cloud_bridge.errors import BadTarget, BridgeError, ConfigError, DuplicateCommand, InvalidRequest, UnknownCommand
from cloud_bridge.store.access import FILE_TOKEN_NAME, Role, role_allows
from cloud_bridge.store.models import UnknownModel
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rollouts import UnknownRollout

STREAM_POLL_S = 0.05
TOKEN_HINT = ("send `Authorization: Bearer <token>`: a token made by `cloud-bridge token add`, or the first line "
              "of the file named by [http] token_file in the bridge's config")
BRIDGE_ERRORS: dict[type[BridgeError], tuple[int, str]] = {
    UnknownCommand: (404, "UnknownCommand"),
    DuplicateCommand: (409, "DuplicateCommand"),
    InvalidRequest: (400, "InvalidRequest"),
    BadTarget: (400, "bad_target"),
    UnknownModel: (404, "unknown_model"),
    UnknownRollout: (404, "unknown_rollout"),
}
BEARER = HTTPBearer(auto_error=False)
CREDENTIALS = Depends(BEARER)


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 param: str | None = None, retry: bool | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param
        self.retry = retry  # None: let the client decide by the status; False: `x-should-retry: false`

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def read_token(path: Path) -> str:
    """The API token: the first line of `path` (or `credential:NAME`). Raises ConfigError with what to do."""
    path = settings.secret_path(path, "[http] token_file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read [http] token_file {path}: {exc.strerror}; create it with "
                          f"`python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}`") from exc
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ConfigError(f"[http] token_file {path} must start with a token of at least 16 characters")
    return token


@dataclass(frozen=True)
class Caller:
    """Who is calling: a token's name and its role."""

    name: str
    role: Role


def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None = CREDENTIALS) -> Caller:
    """The caller of a request: the `[http] token_file` token (admin, named `file`) or a token of the
    registry; refuses (401) a call with neither. Reads only the header, never the body."""
    if credentials is None:
        raise ApiError(401, f"missing API token: {TOKEN_HINT}", "invalid_api_key", "authentication_error")
    token = credentials.credentials
    if secrets.compare_digest(token.encode(), request.app.state.token.encode()):
        caller = Caller(FILE_TOKEN_NAME, "admin")
    else:
        row = registry_of(request).tokens.identify(token)
        if row is None:
            raise ApiError(401, f"wrong API token: {TOKEN_HINT}", "invalid_api_key", "authentication_error")
        caller = Caller(row.name, row.role)
    request.state.caller = caller
    return caller


CALLER = Depends(authenticate)


def requires(role: Role) -> Callable[..., Caller]:
    """A dependency: the caller, refused (403) unless their role allows what needs `role`."""

    def check(caller: Caller = CALLER) -> Caller:
        return ensure_role(caller, role, "this call")

    return check


def ensure_role(caller: Caller, role: Role, what: str) -> Caller:
    """`caller`, or a 403 in OpenAI's shape when their role does not allow `what`, which needs `role`."""
    if not role_allows(caller.role, role):
        raise ApiError(403, f"token {caller.name!r} has role {caller.role}; {what} needs {role} or more "
                            "(roles: viewer < operator < admin; `cloud-bridge token add NAME --role R`)",
                       "insufficient_role", "permission_error", retry=False)
    return caller


VIEWER = Depends(requires("viewer"))      # reads
OPERATOR = Depends(requires("operator"))  # sends and cancels commands, chats through /v1
ADMIN = Depends(requires("admin"))        # policy (`config` commands), the audit log


def registry_of(request: Request) -> Registry:
    return request.app.state.registry


def config_of(request: Request) -> BridgeConfig:
    return request.app.state.config


REG = Depends(registry_of)
CFG = Depends(config_of)


def api_error_response(request: Request, exc: ApiError) -> JSONResponse:
    headers = {} if exc.retry is None else {"x-should-retry": "true" if exc.retry else "false"}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body or query that does not validate: 400 naming every problem, `param` the first field."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"] if part not in ("body", "query", "path"))
        problems.append(f"{where or 'body'}: {error['msg']}")
    first = ".".join(str(p) for p in exc.errors()[0]["loc"][1:]) if exc.errors() else None
    return api_error_response(request, ApiError(400, "invalid request: " + "; ".join(problems), "invalid_request",
                                                param=first or None, retry=False))


def bridge_error_response(request: Request, exc: BridgeError) -> JSONResponse:
    status, code = BRIDGE_ERRORS.get(type(exc), (500, type(exc).__name__))
    return api_error_response(request, ApiError(status, str(exc), code, retry=False if status < 500 else None))


def stream_response(events: Iterator[str] | AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
