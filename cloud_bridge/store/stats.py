"""Latency percentiles and error rates over a time window, computed in SQL on either database.

The sample is every terminal reply a device sent in the window that says how the work went:
`succeeded` or `failed` (a device failure: model error, timeout, internal). Rejections (the request
was refused), cancellations and expiries (the bridge's own verdict) are not device failures and are
left out, and a redelivered reply is stored once, so a client's retries do not count twice.

Percentiles are `percentile_cont` (linear interpolation between the two nearest ranks) on both
databases: PostgreSQL's own aggregate, and on SQLite the same formula over `ROW_NUMBER()`.
"""

from __future__ import annotations

from typing import Any, Literal

from cloud_bridge.store.connection import Connection

GroupBy = Literal["device", "kind", "model"]
GROUPS: dict[str, str] = {"device": "r.device_id", "kind": "COALESCE(c.kind, 'unknown')",
                          "model": "COALESCE(d.model_name, 'unknown')"}
# Reply metrics (milliseconds, or tokens/s) the percentiles and histograms are made of.
TIMINGS = ("queue_ms", "ttft_ms", "total_ms", "tokens_per_s")
PERCENTILES = (0.5, 0.95, 0.99)


class Stats:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def _sample(self, group: str) -> str:
        """The window's replies as (grp, status, one column per timing); `grp` is the SQL expression
        `group`; `?` is the window's start."""
        json_number = self._db.backend.json_number
        timings = ", ".join(f"{json_number('r.payload', 'metrics', name)} AS {name}" for name in TIMINGS)
        return (f"SELECT {group} AS grp, r.status AS status, {timings} FROM replies r "
                "LEFT JOIN commands c ON c.wire_id = r.command_id AND c.device_id = r.device_id "
                "LEFT JOIN devices d ON d.device_id = r.device_id "
                "WHERE r.status IN ('succeeded', 'failed') AND r.received_at >= ?")

    def summary(self, since: str, group_by: GroupBy) -> dict[str, dict[str, Any]]:
        """By group: `count`, `failed`, and `<timing>_p50|p95|p99` (None without samples)."""
        return self._summarize(GROUPS[group_by], since)

    def series(self, since: str, bucket_s: int, group_by: GroupBy | None) -> dict[tuple[int, str], dict[str, Any]]:
        """As `summary`, by (start of the `bucket_s` time bucket in epoch seconds, group); the group
        is `fleet` when `group_by` is None. Buckets without a reply are absent."""
        bucket = f"{self._db.backend.epoch_seconds('r.received_at')} / {int(bucket_s)}"
        group = GROUPS[group_by] if group_by else "'fleet'"
        key = f"CAST({bucket} AS TEXT) || '|' || {group}"
        series = {}
        for grp, values in self._summarize(key, since).items():
            number, name = grp.split("|", 1)
            series[(int(number) * int(bucket_s), name)] = values
        return dict(sorted(series.items()))

    def _summarize(self, group: str, since: str) -> dict[str, dict[str, Any]]:
        rows = self._db.query(
            "SELECT grp, COUNT(*) AS n, SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed "
            f"FROM ({self._sample(group)}) AS s GROUP BY grp ORDER BY grp", (since,))
        groups = {row["grp"]: {"count": int(row["n"]), "failed": int(row["failed"])} for row in rows}
        for timing in TIMINGS:
            for grp, values in self._percentiles(timing, since, group).items():
                groups[grp].update(values)
        return groups

    def _percentiles(self, timing: str, since: str, group: str) -> dict[str, dict[str, float]]:
        names = [f"{timing}_p{round(p * 100)}" for p in PERCENTILES]
        sample = f"SELECT grp, {timing} AS x FROM ({self._sample(group)}) AS s WHERE {timing} IS NOT NULL"
        if self._db.backend.dialect == "postgresql":
            columns = ", ".join(f"percentile_cont({p}) WITHIN GROUP (ORDER BY x) AS {name}"
                                for p, name in zip(PERCENTILES, names, strict=True))
            rows = self._db.query(f"SELECT grp, {columns} FROM ({sample}) AS t GROUP BY grp", (since,))
        else:
            rows = self._db.query(f"SELECT grp, {self._sqlite_percentiles(names)} FROM ("
                                  "SELECT grp, x, ROW_NUMBER() OVER (PARTITION BY grp ORDER BY x) - 1 AS i, "
                                  f"COUNT(*) OVER (PARTITION BY grp) AS n FROM ({sample}) AS t"
                                  ") AS ranked GROUP BY grp", (since,))
        return {row["grp"]: {name: float(row[name]) for name in names} for row in rows}

    @staticmethod
    def _sqlite_percentiles(names: list[str]) -> str:
        """percentile_cont: at rank position h = p(n-1), x[floor h] + (h - floor h)(x[floor h + 1] - x[floor h])."""
        columns = []
        for p, name in zip(PERCENTILES, names, strict=True):
            h = f"({p} * (n - 1))"
            low = f"CAST({h} AS INTEGER)"  # h >= 0, so truncation is floor
            below = f"MAX(CASE WHEN i = {low} THEN x END)"
            above = f"MAX(CASE WHEN i = {low} + 1 THEN x END)"
            fraction = f"MAX({h} - {low})"
            columns.append(f"{below} + {fraction} * (COALESCE({above}, {below}) - {below}) AS {name}")
        return ", ".join(columns)
