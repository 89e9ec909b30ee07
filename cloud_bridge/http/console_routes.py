"""`/api` calls the console's pages need beyond the lists of api_routes: the live feed (server-sent
events instead of a poll), fleet counts, statistics over time buckets (the charts), a device's state
history and alert acknowledgement. Mounted by `app.create_app` under `/api` behind the bearer
token; each route declares its role (reads: viewer; acknowledging: operator)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from autoglm_wire.protocol import utc_now
from cloud_bridge import stats
from cloud_bridge.http.api_routes import sse
from cloud_bridge.http.deps import OPERATOR, REG, VIEWER, ApiError, Caller, stream_response
from cloud_bridge.store.feeds import FeedReader
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
    feed = LiveFeed(registry)

    async def events() -> AsyncIterator[str]:
        deadline = time.monotonic() + timeout_s
        tick = 0
        while time.monotonic() < deadline:
            for item in await run_in_threadpool(feed.news, tick % FLEET_EVERY_TICKS == 0):
                yield item
            tick += 1
            await asyncio.sleep(LIVE_TICK_S)  # no thread held while waiting; a client that left cancels here
            yield ": tick\n\n"

    return stream_response(events())


class LiveFeed:
    """What `/api/live` has not sent yet: new rows of the feed tables (late commits included), and the fleet counts."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._feed = FeedReader(registry.feeds)
        self._fleet: dict[str, dict[str, int]] | None = None

    def news(self, with_counts: bool) -> list[str]:
        """The server-sent events for what is new; the counts only when `with_counts` and changed."""
        items = []
        for row in self._feed.replies():
            items.append(sse("reply", {"device_id": row.device_id, "command_id": row.command_id, "seq": row.seq,
                                       "status": row.status, "received_at": row.received_at}))
        for event in self._feed.events():
            items.append(sse("event", {"device_id": event.device_id, "level": event.level, "code": event.code,
                                       "message": event.message, "ts": event.ts}))
        for change in self._feed.device_states():
            items.append(sse("state", asdict(change)))
        if with_counts:
            counts = fleet_counts(self._registry)
            if counts != self._fleet:
                self._fleet = counts
                items.append(sse("fleet", counts))
        return items
