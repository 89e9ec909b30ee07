"""Fleet statistics over a window (`GET /api/stats`, `cloud-bridge stats`): per device, kind or model,
the count of finished generations, the device failure rate and P50/P95/P99 of queue time, time to
first token, total time and decode tokens/s; the same over time buckets (`GET /api/stats/series`, the
console's charts). The SQL is in cloud_bridge.store.stats."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from autoglm_wire.protocol import format_ts
from cloud_bridge.console import render_table
from cloud_bridge.errors import InvalidRequest
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import stamp
from cloud_bridge.store.stats import GroupBy

_WINDOW = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Percentiles(BaseModel):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class GroupStats(BaseModel):
    """One group's numbers: times in milliseconds, speed in tokens/s."""

    group: str
    count: int
    failed: int
    error_rate: float
    queue_ms: Percentiles
    ttft_ms: Percentiles
    total_ms: Percentiles
    tokens_per_s: Percentiles


class FleetStats(BaseModel):
    window: str
    since: str
    group_by: GroupBy
    groups: list[GroupStats]


class SeriesPoint(GroupStats):
    """One group's numbers in one time bucket starting at `t`."""

    t: str


class FleetSeries(BaseModel):
    window: str
    since: str
    bucket_s: int
    group_by: GroupBy | None
    points: list[SeriesPoint]


MAX_BUCKETS = 500


def window_seconds(window: str) -> float:
    """`30s`, `15m`, `1h`, `7d` in seconds; raises InvalidRequest saying the format."""
    match = _WINDOW.match(window.strip())
    if match is None or float(match.group(1)) <= 0:
        raise InvalidRequest(f"window {window!r} is not a duration: write a positive number and a unit "
                             "s, m, h or d, e.g. 15m, 1h, 7d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _numbers(name: str, values: dict) -> dict:
    """GroupStats fields of a group's row from cloud_bridge.store.stats."""
    def cut(timing: str) -> Percentiles:
        return Percentiles(**{p: values.get(f"{timing}_{p}") for p in ("p50", "p95", "p99")})

    return {"group": name, "count": values["count"], "failed": values["failed"],
            "error_rate": values["failed"] / values["count"], "queue_ms": cut("queue_ms"), "ttft_ms": cut("ttft_ms"),
            "total_ms": cut("total_ms"), "tokens_per_s": cut("tokens_per_s")}


def fleet_stats(registry: Registry, window: str, group_by: GroupBy, now: datetime) -> FleetStats:
    since = stamp(now - timedelta(seconds=window_seconds(window)))
    groups = [GroupStats(**_numbers(name, values)) for name, values in registry.stats.summary(since, group_by).items()]
    return FleetStats(window=window, since=since, group_by=group_by, groups=groups)


def fleet_series(registry: Registry, window: str, buckets: int, group_by: GroupBy | None,
                 now: datetime) -> FleetSeries:
    """The window cut into `buckets` equal time buckets (whole seconds, aligned on multiples of their
    length since 1970): per bucket and group (or the whole fleet), the numbers of `fleet_stats`."""
    seconds = window_seconds(window)
    if not 1 <= buckets <= MAX_BUCKETS:
        raise InvalidRequest(f"buckets {buckets} is out of range: ask for 1 to {MAX_BUCKETS}")
    bucket_s = max(1, math.ceil(seconds / buckets))
    since = stamp(now - timedelta(seconds=seconds))
    points = [SeriesPoint(t=format_ts(datetime.fromtimestamp(start, UTC)), **_numbers(name, values))
              for (start, name), values in registry.stats.series(since, bucket_s, group_by).items()]
    return FleetSeries(window=window, since=since, bucket_s=bucket_s, group_by=group_by, points=points)


def stats_table(stats: FleetStats) -> str:
    """The stats as a text table (times in ms, P50/P95/P99)."""
    def triple(p: Percentiles, digits: int = 0) -> str:
        return "/".join("-" if v is None else f"{v:.{digits}f}" for v in (p.p50, p.p95, p.p99))

    rows = [[g.group, str(g.count), f"{g.error_rate:.1%}", triple(g.queue_ms), triple(g.ttft_ms), triple(g.total_ms),
             triple(g.tokens_per_s, 1)] for g in stats.groups]
    headers = [stats.group_by, "count", "errors", "queue ms p50/95/99", "ttft ms p50/95/99", "total ms p50/95/99",
               "tok/s p50/95/99"]
    return f"since {stats.since} ({stats.window})\n" + render_table(headers, rows)
