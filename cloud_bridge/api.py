"""The HTTP API, OpenAI-compatible endpoint and web console of `cloud-bridge serve` (FastAPI).

Everything under `/api` and `/v1` needs `Authorization: Bearer <token>`, the token being the first
line of `[http] token_file`. `/` (the console page, which asks for the token and keeps it in the
browser's localStorage), `/openapi.json` and `/docs` are open. The API is a thin adapter over
`console`, `fleet` and the registry: a command created here is queued in the registry exactly as
`cloud-bridge send` queues it, and the dispatch loop publishes it.

Errors have one shape everywhere, OpenAI's: `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from autoglm_wire import settings
from cloud_bridge import console, fleet
from cloud_bridge.config import BridgeConfig
from cloud_bridge.errors import BridgeError, ConfigError, DuplicateCommand, InvalidRequest, UnknownCommand
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow

POLL_S = 0.05
TOKEN_HINT = ("send `Authorization: Bearer <token>`; the token is the first line of the file named by "
              "[http] token_file in the bridge's config")


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


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


CREDENTIALS = Depends(HTTPBearer(auto_error=False))


# --- request bodies ------------------------------------------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FilterBody(Body):
    device_ids: list[str] = Field(default_factory=list)
    group: str | None = None
    state: Literal["online", "offline"] | None = None
    model_sha256: str | None = Field(default=None, description="prefix of the model file's sha256")
    agent_version: str | None = None

    def to_filter(self) -> fleet.DeviceFilter:
        return fleet.DeviceFilter(tuple(self.device_ids), self.group, self.state, self.model_sha256,
                                  self.agent_version)


class CommandBody(Body):
    """A command for one device (`target: "D"`), a group (`target: "group/G"`) or a `filter`."""

    target: str | None = Field(default=None, description='a device id or "group/G"')
    filter: FilterBody | None = Field(default=None, description="instead of target: every matching known device")
    kind: str = Field(description="ping, chat, complete, cancel, config, onnx")
    prompt: str | None = Field(default=None, description="chat: the user message; complete: the prompt")
    params: dict[str, Any] = Field(default_factory=dict, description="more params, merged last")
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher runs first")
    expires_in_s: float | None = Field(default=None, gt=0)
    id: str | None = Field(default=None, description="command id (or batch id for several devices)")


# --- the app -------------------------------------------------------------------------------------


def create_app(registry: Registry, config: BridgeConfig, token: str) -> FastAPI:
    """The FastAPI application serving one registry."""
    app = FastAPI(title="autoglm-edge cloud bridge", version="1",
                  description="Fleet API of autoglm-edge. Every /api and /v1 call needs " + TOKEN_HINT + ".")
    app.state.registry = registry
    app.state.config = config
    def authorized(credentials: HTTPAuthorizationCredentials | None = CREDENTIALS) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise ApiError(401, f"missing or wrong API token: {TOKEN_HINT}", "invalid_api_key", "authentication_error")

    @app.exception_handler(ApiError)
    def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.code}},
                            status_code=exc.status)

    @app.exception_handler(BridgeError)
    def _bridge_error(request: Request, exc: BridgeError) -> JSONResponse:
        status = {UnknownCommand: 404, DuplicateCommand: 409, InvalidRequest: 400}.get(type(exc), 500)
        return _api_error(request, ApiError(status, str(exc), type(exc).__name__))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("cloud_bridge").joinpath("web/console.html").read_text(encoding="utf-8")

    from cloud_bridge.openai_api import router as openai_router
    from cloud_bridge.routes import router as api_router

    app.include_router(api_router, prefix="/api", dependencies=[Depends(authorized)])
    app.include_router(openai_router, prefix="/v1", dependencies=[Depends(authorized)])
    return app


# --- shared by the routers -----------------------------------------------------------------------


def registry_of(request: Request) -> Registry:
    return request.app.state.registry


def config_of(request: Request) -> BridgeConfig:
    return request.app.state.config


REG = Depends(registry_of)
CFG = Depends(config_of)


def command_json(row: CommandRow) -> dict[str, Any]:
    data = asdict(row)
    data.pop("raw_payload", None)
    return data


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def follow_chunks(registry: Registry, command_id: str, timeout_s: float) -> Iterator[tuple[str, CommandRow | None]]:
    """Yield (delta, None) for each stored chunk in order, then ("", final row) once the command ended.

    A chunk lost on the way (QoS 0) is skipped when the command ends; the final row has the full text.
    Ends with the command's latest row, terminal or not, after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    next_idx = 0
    while True:
        row = registry.commands.get(command_id)
        for chunk in registry.chunks.of_command(command_id, next_idx):
            if chunk.idx != next_idx and not row.terminal:
                break
            next_idx = chunk.idx + 1
            if chunk.delta:
                yield chunk.delta, None
        if row.terminal or time.monotonic() >= deadline:
            yield "", row
            return
        time.sleep(POLL_S)


def stream_response(events: Iterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def send_request(body: CommandBody, device_id: str, config: BridgeConfig) -> console.SendRequest:
    expires = body.expires_in_s if body.expires_in_s is not None else config.dispatch.default_expiry_s
    return console.SendRequest(device_id=device_id, kind=body.kind, prompt=body.prompt, stream=body.stream,
                               max_tokens=body.max_tokens, temperature=body.temperature, seed=body.seed,
                               params=body.params, expires_in_s=expires, command_id=body.id, priority=body.priority)
