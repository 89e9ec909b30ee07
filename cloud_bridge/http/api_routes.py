"""`/api`: devices, group membership, commands (one device, a group or a filter; cancel; priorities), replies,
events, alerts, dead letters, the audit log. Mounted by `app.create_app` behind the bearer token; each route
declares the role it needs (reads: viewer; commands and cancels: operator; `config` commands, group membership
and the audit log: admin). A command created here is queued by
`commands` exactly as `cloud-bridge send` queues it, and the dispatch loop publishes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from autoglm_wire.protocol import utc_now
from cloud_bridge import commands, stats
from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.deps import (
    ADMIN,
    CFG,
    OPERATOR,
    REG,
    STREAM_POLL_S,
    VIEWER,
    ApiError,
    Caller,
    ensure_role,
    stream_response,
)
from cloud_bridge.store.devices import MAX_PAGE, DeviceQuery
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow
from cloud_bridge.store.stats import GroupBy

router = APIRouter()


def command_json(row: CommandRow) -> dict[str, Any]:
    data = asdict(row)
    data.pop("raw_payload", None)
    return data


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/devices", summary="devices the bridge has heard of (state, active and previous model, last telemetry), "
                                 "by id, a page at a time (total in X-Total-Count)", dependencies=[VIEWER])
def list_devices(response: Response, limit: int = Query(default=100, ge=1, le=MAX_PAGE),
                 offset: int = Query(default=0, ge=0),
                 state: str | None = Query(default=None, description="the state last reported: online, offline"),
                 group: str | None = Query(default=None, description="a group the registry assigns the device"),
                 model: str | None = Query(default=None, description="the active model's name, or its sha256 "
                                                                      "(or a prefix of it)"),
                 q: str | None = Query(default=None, description="a substring of the device id (any case)"),
                 registry: Registry = REG) -> list[dict[str, Any]]:
    rows, total = registry.devices.page(DeviceQuery(state, group, model, q, limit, offset))
    response.headers["X-Total-Count"] = str(total)
    return [asdict(device) for device in rows]


@router.get("/devices/{device_id}", summary="one device", dependencies=[VIEWER])
def get_device(device_id: str, registry: Registry = REG) -> dict[str, Any]:
    device = registry.devices.get(device_id)
    if device is None:
        raise ApiError(404, f"no device {device_id!r} has reported to this bridge; list them with GET /api/devices",
                       "unknown_device")
    return asdict(device)


@router.post("/commands", status_code=201,
             summary="queue a command for a device, a group (`group/G`) or a filtered set; one row per device")
def create_command(body: commands.CommandRequest, request: Request, registry: Registry = REG,
                   config: BridgeConfig = CFG, caller: Caller = OPERATOR) -> dict[str, Any]:
    request.state.audit_target = body.target or "filter"
    if body.kind == "config":
        ensure_role(caller, "admin", "a `config` command (the device policy)")
    queued = commands.send(registry, body, dispatch=config.dispatch)
    return {"batch": queued.batch, "commands": [command_json(r) for r in queued.rows], "warnings": queued.warnings}


@router.get("/commands", summary="recent commands, newest first; filters device, state, kind, batch; paging with "
                               "limit and offset, the number matching in the `X-Total-Count` header",
            dependencies=[VIEWER])
def list_commands(response: Response, device: str | None = None, batch: str | None = None,
                  state: str | None = None, kind: str | None = None,
                  limit: int = Query(default=50, ge=1, le=1000), offset: int = Query(default=0, ge=0),
                  registry: Registry = REG) -> list[dict[str, Any]]:
    rows, total = registry.commands.page(device, state, kind, limit, offset, batch)
    response.headers["X-Total-Count"] = str(total)
    return [command_json(row) for row in rows]


@router.get("/commands/{command_id}", summary="one command with every reply stored for it",
            dependencies=[VIEWER])
def get_command(command_id: str, registry: Registry = REG) -> dict[str, Any]:
    row = registry.commands.get(command_id)
    return {**command_json(row), "replies": [asdict(r) for r in registry.replies.of_command(command_id)]}


@router.post("/commands/{command_id}/cancel", status_code=201, summary="send a cancel for a command (operator)",
             dependencies=[OPERATOR])
def cancel_command(command_id: str, registry: Registry = REG, config: BridgeConfig = CFG) -> dict[str, Any]:
    row, warnings = commands.cancel(registry, command_id, dispatch=config.dispatch)
    target = registry.commands.get(command_id)
    return {"cancel": command_json(row), "target": command_json(target), "warnings": warnings}


@router.get("/commands/{command_id}/stream",
            summary="server-sent events: `delta` {text} for each streamed chunk, then `done` with the command",
            dependencies=[VIEWER])
def stream_command(command_id: str, timeout_s: float = Query(default=300.0, gt=0, le=3600),
                   registry: Registry = REG) -> Any:
    follower = commands.Follower(registry, command_id, STREAM_POLL_S)  # 404 before the stream starts

    def events() -> Iterator[str]:
        for delta in follower.follow(timeout_s):
            yield sse("delta", {"text": delta})
        yield sse("done", command_json(follower.row))

    return stream_response(events())


@router.get("/replies", summary="recent replies, newest first", dependencies=[VIEWER])
def list_replies(device: str | None = None, limit: int = Query(default=50, ge=1, le=1000),
                 registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(r) for r in registry.replies.recent(device, limit)]


@router.get("/events", summary="recent device events, newest first", dependencies=[VIEWER])
def list_events(device: str | None = None, limit: int = Query(default=50, ge=1, le=1000),
                registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(e) for e in registry.events.recent(device, limit)]


@router.get("/alerts", summary="abnormal-device alerts, newest first (open ones only unless all=true; one device "
                             "with device=)", dependencies=[VIEWER])
def list_alerts(all: bool = False, limit: int = Query(default=100, ge=1, le=1000),  # noqa: A002
                device: str | None = None, registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(a) for a in registry.alerts.recent(open_only=not all, limit=limit, device_id=device)]


@router.get("/audit", summary="the audit log: every mutating call (API and CLI), newest first (admin)",
            dependencies=[ADMIN])
def list_audit(limit: int = Query(default=100, ge=1, le=10000), registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(a) for a in registry.audit.recent(limit)]


@router.get("/dead-letters", summary="messages the bridge could not store, newest first (exact payload in base64)",
            dependencies=[VIEWER])
def list_dead_letters(device: str | None = None, limit: int = Query(default=50, ge=1, le=1000),
                      registry: Registry = REG) -> list[dict[str, Any]]:
    return [d.as_json() for d in registry.dead_letters.recent(device, limit)]


@router.get("/stats", summary="count, device failure rate and P50/P95/P99 of queue, TTFT, total time and tokens/s "
                              "over a window (e.g. 1h), by device, kind or model", dependencies=[VIEWER])
def get_stats(window: str = "1h", group_by: GroupBy = "device", registry: Registry = REG) -> stats.FleetStats:
    return stats.fleet_stats(registry, window, group_by, utc_now())


@router.get("/alert-deliveries", summary="the webhook delivery log of alert notifications, newest first",
            dependencies=[VIEWER])
def list_alert_deliveries(limit: int = Query(default=50, ge=1, le=1000),
                          registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(row) for row in registry.deliveries.recent(limit)]


@router.get("/groups", summary="group membership as the registry assigns it: group -> device ids",
            dependencies=[VIEWER])
def list_groups(registry: Registry = REG) -> dict[str, list[str]]:
    return registry.groups.members()


@router.put("/groups/{group}/members/{device_id}", summary="assign a device to a group (what routing and the ACL use)",
            dependencies=[ADMIN])
def add_group_member(group: str, device_id: str, registry: Registry = REG) -> dict[str, Any]:
    try:
        added = registry.groups.add(device_id, group)
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_request", retry=False) from exc
    return {"group": group, "device_id": device_id, "added": added}


@router.delete("/groups/{group}/members/{device_id}", summary="take a device out of a group",
               dependencies=[ADMIN])
def remove_group_member(group: str, device_id: str, registry: Registry = REG) -> dict[str, Any]:
    if not registry.groups.remove(device_id, group):
        raise ApiError(404, f"{device_id!r} is not assigned group {group!r}; list them with GET /api/groups",
                       "unknown_membership", retry=False)
    return {"group": group, "device_id": device_id, "removed": True}
