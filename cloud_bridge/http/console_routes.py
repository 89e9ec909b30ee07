"""`/api` calls the console's pages need beyond the lists of api_routes: the live feed (server-sent
events instead of a poll), fleet counts, statistics over time buckets (the charts), a device's state
history and alert acknowledgement. Mounted by `app.create_app` under `/api` behind the bearer
token; each route declares its role (reads: viewer; acknowledging: operator)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Query, Request

from autoglm_wire.protocol import utc_now
from cloud_bridge import stats
from cloud_bridge.http.api_routes import sse
from cloud_bridge.http.deps import OPERATOR, REG, VIEWER, ApiError, Caller, stream_response
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.stats import GroupBy

router = APIRouter()

LIVE_TICK_S = 1.0  # how often the live feed looks for new rows (and writes a keep-alive comment)
FLEET_EVERY_TICKS = 5  # fleet counts (three grouped counts) every this many ticks


def fleet_counts(registry: Registry) -> dict[str, dict[str, int]]:
    """Devices by state, open alerts by kind, commands by state."""
    seen = registry.observations
    commands: dict[str, int] = {}
    for row in seen.commands_by_kind_and_state():
        commands[str(row["state"])] = commands.get(str(row["state"]), 0) + int(row["n"])
    return {"devices": {str(r["state"]): int(r["n"]) for r in seen.devices_by_state()},
            "alerts_open": {str(r["kind"]): int(r["n"]) for r in seen.open_alerts_by_kind()},
            "commands": commands}


@router.get("/fleet", summary="counts: devices by state, open alerts by kind, commands by state",
            dependencies=[VIEWER])
def get_fleet(registry: Registry = REG) -> dict[str, dict[str, int]]:
    return fleet_counts(registry)


@router.get("/stats/series", summary="the numbers of /api/stats per time bucket (the console's charts): the window "
                                     "cut into `buckets`, by device, kind or model, or the whole fleet",
            dependencies=[VIEWER])
def get_stats_series(window: str = "1h", buckets: int = Query(default=30, ge=1, le=stats.MAX_BUCKETS),
                     group_by: GroupBy | None = None, registry: Registry = REG) -> stats.FleetSeries:
    return stats.fleet_series(registry, window, buckets, group_by, utc_now())


@router.get("/devices/{device_id}/states", summary="the device's state changes (online/offline), newest first",
            dependencies=[VIEWER])
def list_device_states(device_id: str, limit: int = Query(default=50, ge=1, le=1000),
                       registry: Registry = REG) -> list[dict[str, Any]]:
    return [asdict(change) for change in registry.devices.history(device_id, limit)]


@router.post("/alerts/{alert_id}/acknowledge", summary="mark an alert as taken by the caller (operator); "
                                                       "the first acknowledgement stays")
def acknowledge_alert(alert_id: int, request: Request, registry: Registry = REG,
                      caller: Caller = OPERATOR) -> dict[str, Any]:
    request.state.audit_target = f"alert/{alert_id}"
    row = registry.alerts.acknowledge(alert_id, caller.name)
    if row is None:
        raise ApiError(404, f"no alert {alert_id}; list them with GET /api/alerts?all=true", "unknown_alert")
    return asdict(row)


@router.get("/live", summary="server-sent events while connected: `reply`, `event` and `state` for each new row, "
                             "`fleet` with the counts when they change; a `: tick` comment every second",
            dependencies=[VIEWER])
def live(timeout_s: float = Query(default=3600.0, gt=0, le=86400), registry: Registry = REG) -> Any:
    cursor = registry.feeds.last_ids()

    def events() -> Iterator[str]:
        fleet: dict[str, dict[str, int]] | None = None
        deadline = time.monotonic() + timeout_s
        tick = 0
        while time.monotonic() < deadline:
            for row in registry.feeds.replies(cursor["replies"]):
                cursor["replies"] = row.id
                yield sse("reply", {"device_id": row.device_id, "command_id": row.command_id, "seq": row.seq,
                                    "status": row.status, "received_at": row.received_at})
            for event in registry.feeds.events(cursor["events"]):
                cursor["events"] = event.id
                yield sse("event", {"device_id": event.device_id, "level": event.level, "code": event.code,
                                    "message": event.message, "ts": event.ts})
            for change in registry.feeds.device_states(cursor["device_states"]):
                cursor["device_states"] = change.id
                yield sse("state", asdict(change))
            if tick % FLEET_EVERY_TICKS == 0:
                counts = fleet_counts(registry)
                if counts != fleet:
                    fleet = counts
                    yield sse("fleet", counts)
            tick += 1
            time.sleep(LIVE_TICK_S)
            yield ": tick\n\n"  # a closed connection fails this write: no query after the client left

    return stream_response(events())
