"""`/api`: devices, group membership, commands (one device, a group or a filter; cancel; priorities),
replies, events, alerts, dead letters. Mounted by `app.create_app` behind the bearer token. A command
created here is queued by `commands` exactly as `cloud-bridge send` queues it, and the dispatch loop publishes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Query

from autoglm_wire.protocol import utc_now
from cloud_bridge import commands, stats
from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.deps import CFG, REG, STREAM_POLL_S, ApiError, stream_response
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


@router.get("/devices", summary="every device the bridge has heard of, with its state and last telemetry")
def list_devices(registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(device) for device in registry.devices.all()]


@router.get("/devices/{device_id}", summary="one device")
def get_device(device_id: str, registry: Registry = REG) -> dict[str, Any]:
    device = registry.devices.get(device_id)
    if device is None:
        raise ApiError(404, f"no device {device_id!r} has reported to this bridge; list them with GET /api/devices",
                       "unknown_device")
    return asdict(device)


@router.post("/commands", status_code=201,
             summary="queue a command for a device, a group (`group/G`) or a filtered set; one row per device")
def create_command(body: commands.CommandRequest, registry: Registry = REG,
                   config: BridgeConfig = CFG) -> dict[str, Any]:
    queued = commands.send(registry, body, dispatch=config.dispatch)
    return {"batch": queued.batch, "commands": [command_json(r) for r in queued.rows], "warnings": queued.warnings}


@router.get("/commands", summary="recent commands, newest first")
def list_commands(device: str | None = None, batch: str | None = None,
                  limit: int = Query(default=50, ge=1, le=1000), registry: Registry = REG) -> list[dict[str, Any]]:
    return [command_json(row) for row in registry.commands.recent(device, limit, batch)]


@router.get("/commands/{command_id}", summary="one command with every reply stored for it")
def get_command(command_id: str, registry: Registry = REG) -> dict[str, Any]:
    row = registry.commands.get(command_id)
    return {**command_json(row), "replies": [asdict(r) for r in registry.replies.of_command(command_id)]}


@router.post("/commands/{command_id}/cancel", status_code=201, summary="send a cancel for a command")
def cancel_command(command_id: str, registry: Registry = REG, config: BridgeConfig = CFG) -> dict[str, Any]:
    row, warnings = commands.cancel(registry, command_id, dispatch=config.dispatch)
    target = registry.commands.get(command_id)
    return {"cancel": command_json(row), "target": command_json(target), "warnings": warnings}


@router.get("/commands/{command_id}/stream",
            summary="server-sent events: `delta` {text} for each streamed chunk, then `done` with the command")
def stream_command(command_id: str, timeout_s: float = Query(default=300.0, gt=0, le=3600),
                   registry: Registry = REG) -> Any:
    follower = commands.Follower(registry, command_id, STREAM_POLL_S)  # 404 before the stream starts

    def events() -> Iterator[str]:
        for delta in follower.follow(timeout_s):
            yield sse("delta", {"text": delta})
        yield sse("done", command_json(follower.row))

    return stream_response(events())


@router.get("/replies", summary="recent replies, newest first")
def list_replies(device: str | None = None, limit: int = Query(default=50, ge=1, le=1000),
                 registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(r) for r in registry.replies.recent(device, limit)]


@router.get("/events", summary="recent device events, newest first")
def list_events(device: str | None = None, limit: int = Query(default=50, ge=1, le=1000),
                registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(e) for e in registry.events.recent(device, limit)]


@router.get("/alerts", summary="abnormal-device alerts, newest first (open ones only unless all=true)")
def list_alerts(all: bool = False, limit: int = Query(default=100, ge=1, le=1000),  # noqa: A002
                registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(a) for a in registry.alerts.recent(open_only=not all, limit=limit)]


@router.get("/dead-letters", summary="messages the bridge could not store, newest first (exact payload in base64)")
def list_dead_letters(device: str | None = None, limit: int = Query(default=50, ge=1, le=1000),
                      registry: Registry = REG) -> list[dict[str, Any]]:
    return [d.as_json() for d in registry.dead_letters.recent(device, limit)]


@router.get("/stats", summary="count, device failure rate and P50/P95/P99 of queue, TTFT, total time and tokens/s "
                              "over a window (e.g. 1h), by device, kind or model")
def get_stats(window: str = "1h", group_by: GroupBy = "device", registry: Registry = REG) -> stats.FleetStats:
    return stats.fleet_stats(registry, window, group_by, utc_now())


@router.get("/alert-deliveries", summary="the webhook delivery log of alert notifications, newest first")
def list_alert_deliveries(limit: int = Query(default=50, ge=1, le=1000),
                          registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(row) for row in registry.deliveries.recent(limit)]


@router.get("/groups", summary="group membership as the registry assigns it: group -> device ids")
def list_groups(registry: Registry = REG) -> dict[str, list[str]]:
    return registry.groups.members()


@router.put("/groups/{group}/members/{device_id}", summary="assign a device to a group (what routing and the ACL use)")
def add_group_member(group: str, device_id: str, registry: Registry = REG) -> dict[str, Any]:
    try:
        added = registry.groups.add(device_id, group)
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_request", retry=False) from exc
    return {"group": group, "device_id": device_id, "added": added}


@router.delete("/groups/{group}/members/{device_id}", summary="take a device out of a group")
def remove_group_member(group: str, device_id: str, registry: Registry = REG) -> dict[str, Any]:
    if not registry.groups.remove(device_id, group):
        raise ApiError(404, f"{device_id!r} is not assigned group {group!r}; list them with GET /api/groups",
                       "unknown_membership", retry=False)
    return {"group": group, "device_id": device_id, "removed": True}
