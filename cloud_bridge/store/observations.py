"""What `/metrics` reports, read from the registry at scrape time (no second copy of the state).

Every query groups by a bounded set of labels: command kinds and states, device states, alert
kinds, message types, and the device id only when the caller asks for it (`by_device`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cloud_bridge.store.connection import Connection
from cloud_bridge.store.stats import TIMINGS

# Stored message rows, by the message type they hold.
MESSAGE_TABLES = {"reply": "replies", "stream_chunk": "stream_chunks", "event": "events"}


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (one per upper bound, in order), the count and the sum of one label set."""

    device_id: str
    kind: str
    buckets: list[int]
    count: int
    total: float


class Observations:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def ping(self) -> None:
        """A round trip to the database; raises when it cannot be reached."""
        self._db.query("SELECT 1 AS ok")

    def commands_by_kind_and_state(self) -> list[dict[str, object]]:
        return self._db.query("SELECT kind, state, COUNT(*) AS n FROM commands GROUP BY kind, state")

    def resends(self) -> list[dict[str, object]]:
        """Publishes beyond the first, by kind."""
        return self._db.query("SELECT kind, SUM(CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END) AS n "
                              "FROM commands GROUP BY kind")

    def messages_stored(self) -> dict[str, int]:
        """Device messages held in the registry, by type (retention deletes old ones)."""
        return {kind: int(self._db.query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])
                for kind, table in MESSAGE_TABLES.items()}

    def devices_by_state(self) -> list[dict[str, object]]:
        return self._db.query("SELECT COALESCE(state, 'unknown') AS state, COUNT(*) AS n FROM devices "
                              "GROUP BY COALESCE(state, 'unknown')")

    def open_alerts_by_kind(self) -> list[dict[str, object]]:
        return self._db.query("SELECT kind, COUNT(*) AS n FROM alerts WHERE cleared_at IS NULL GROUP BY kind")

    def telemetry(self, *fields: str) -> list[dict[str, object]]:
        """The named numbers of each device's last telemetry (None where absent)."""
        backend = self._db.backend
        columns = ", ".join(f"{backend.json_number('last_telemetry', name)} AS {name}" for name in fields)
        return self._db.query(f"SELECT device_id, {columns} FROM devices WHERE last_telemetry IS NOT NULL")

    def histogram(self, metric: str, bounds: tuple[float, ...], by_device: bool) -> list[Histogram]:
        """Cumulative counts of reply `metrics.<metric>` under each bound, by kind (and device)."""
        if metric not in TIMINGS:
            raise ValueError(f"unknown reply metric {metric!r}: one of {', '.join(TIMINGS)}")
        value = self._db.backend.json_number("r.payload", "metrics", metric)
        device = "r.device_id" if by_device else "''"
        under = ", ".join(f"SUM(CASE WHEN x <= {float(b)!r} THEN 1 ELSE 0 END) AS le{i}" for i, b in enumerate(bounds))
        rows = self._db.query(
            f"SELECT device_id, kind, COUNT(*) AS n, SUM(x) AS total, {under} FROM ("
            f"  SELECT {device} AS device_id, COALESCE(c.kind, 'unknown') AS kind, {value} AS x FROM replies r"
            f"  LEFT JOIN commands c ON c.wire_id = r.command_id AND c.device_id = r.device_id"
            f") AS timed WHERE x IS NOT NULL GROUP BY device_id, kind ORDER BY device_id, kind"
        )
        return [Histogram(device_id=row["device_id"], kind=row["kind"], count=int(row["n"]),
                          total=float(row["total"]), buckets=[int(row[f"le{i}"]) for i in range(len(bounds))])
                for row in rows]
