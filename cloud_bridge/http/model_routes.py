"""Models and rollouts over HTTP: `/api/models`, `/api/rollouts` (behind an API token, mounted by
`app.create_app` under `/api`; reads need a viewer, changes an admin: a rollout replaces the fleet's
model), the artifact downloads devices make (`/artifacts/<sha256>`, with a
download token instead) and the rollouts console page (`/rollouts`).

`/artifacts/<sha256>?token=T` answers GET and HEAD: 200 with the whole file, or 206 with one
`Range: bytes=...` (Content-Range), 416 when the range is past the end, 403 for a missing, expired
or foreign token (cloud_bridge.artifacts), 404 for a model the bridge has no copy of.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from autoglm_wire import settings
from cloud_bridge import artifacts, rollouts
from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.deps import ADMIN, CFG, REG, VIEWER, ApiError
from cloud_bridge.store.registry import Registry

log = logging.getLogger(__name__)

router = APIRouter()  # under /api, behind the API token
public = APIRouter()  # the downloads (download token) and the page (asks for the API token itself)
READ_CHUNK = 1 << 20


def rollout_json(registry: Registry, rollout_id: str) -> dict[str, Any]:
    view = rollouts.status(registry, rollout_id)
    return {**asdict(view["rollout"]), "counts": view["counts"], "failures": view["failures"],
            "devices": [asdict(d) for d in view["devices"]]}


@router.get("/models", summary="registered model artifacts (GGUF header fields, sha256, size, mirror url)",
            dependencies=[VIEWER])
def list_models(registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(model) for model in registry.models.all()]


@router.get("/models/{key}", summary="one model, by name or sha256", dependencies=[VIEWER])
def get_model(key: str, registry: Registry = REG) -> dict[str, Any]:
    return asdict(registry.models.find(key))


@router.delete("/models/{key}", summary="forget a model and delete its copy (refused while a rollout deploys it; "
                                        "admin)", dependencies=[ADMIN])
def delete_model(key: str, registry: Registry = REG, config: BridgeConfig = CFG) -> dict[str, Any]:
    return asdict(artifacts.unregister(registry, config.models.dir, key))


@router.get("/rollouts", summary="recent rollouts, newest first, with counts of their devices by state",
            dependencies=[VIEWER])
def list_rollouts(limit: int = Query(default=20, ge=1, le=500), registry: Registry = REG) -> list[dict[str, Any]]:
    return [rollout_json(registry, row.id) for row in registry.rollouts.recent(limit)]


@router.post("/rollouts", status_code=201, dependencies=[ADMIN],
             summary="start a staged rollout of a model to a group, device or filter (admin)")
def create_rollout(body: rollouts.RolloutRequest, registry: Registry = REG,
                   config: BridgeConfig = CFG) -> dict[str, Any]:
    row = rollouts.create(registry, config, body)
    return rollout_json(registry, row.id)


@router.get("/rollouts/{rollout_id}", summary="one rollout with every device's state, progress and canary result",
            dependencies=[VIEWER])
def get_rollout(rollout_id: str, registry: Registry = REG) -> dict[str, Any]:
    return rollout_json(registry, rollout_id)


@router.post("/rollouts/{rollout_id}/{action}", dependencies=[ADMIN],
             summary="pause | resume | abort | rollback (a `model` rollback to every device that activated; admin)")
def act_on_rollout(rollout_id: str, action: str, registry: Registry = REG) -> dict[str, Any]:
    actions = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort,
               "rollback": rollouts.rollback}
    if action not in actions:
        raise ApiError(404, f"no rollout action {action!r}; use one of {', '.join(actions)}", "unknown_action")
    actions[action](registry, rollout_id)
    return rollout_json(registry, rollout_id)


# --- downloads -----------------------------------------------------------------------------------


def _secret(config: BridgeConfig) -> bytes:
    return artifacts.load_secret(settings.secret_path(config.models.secret_file, "[models] secret_file"))


def _read(path: Path, first: int, last: int) -> Iterator[bytes]:
    with path.open("rb") as source:
        source.seek(first)
        left = last - first + 1
        while left > 0:
            block = source.read(min(READ_CHUNK, left))
            if not block:
                return
            left -= len(block)
            yield block


@public.api_route("/artifacts/{sha256}", methods=["GET", "HEAD"], include_in_schema=False)
def download(sha256: str, request: Request, token: str | None = None, config: BridgeConfig = CFG) -> Response:
    try:
        device_id = artifacts.check_token(_secret(config), token, sha256, time.time())
    except artifacts.BadToken as exc:
        raise ApiError(403, str(exc), "bad_download_token", "authentication_error", retry=False) from exc
    path = artifacts.artifact_path(config.models.dir, sha256)
    if not path.is_file():
        raise ApiError(404, f"the bridge has no copy of {sha256}; register it with `cloud-bridge model add`",
                       "unknown_artifact", retry=False)
    size = path.stat().st_size
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", "ETag": f'"{sha256}"'}
    try:
        span = artifacts.byte_range(request.headers.get("range"), size)
    except artifacts.Unsatisfiable:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    first, last = span if span is not None else (0, size - 1)
    headers["Content-Length"] = str(last - first + 1)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    log.info("artifact %s to %s: bytes %d-%d of %d", sha256[:12], device_id, first, last, size)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_read(path, first, last), status_code=status, headers=headers)


@public.get("/rollouts", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return resources.files("cloud_bridge").joinpath("web/rollouts.html").read_text(encoding="utf-8")
