"""Events the devices report, stored once each, and the alerts the bridge raises about abnormal
devices (one open alert per device and kind, with raised/cleared times).

An event is unique by its dedupe key, the SHA-256 of the whole Event (device, `ts`, level, code,
message, data): a redelivery is counted in `duplicate_events`, not stored twice.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

from autoglm_wire.protocol import Event
from cloud_bridge.store.connection import Connection, first_copies, slices
from cloud_bridge.store.counters import Counters
from cloud_bridge.store.devices import Devices
from cloud_bridge.store.rows import AlertRow, EventRow, stamp


def dedupe_key(event: Event) -> str:
    """What makes two events the same event."""
    return hashlib.sha256(event.model_dump_json().encode("utf-8")).hexdigest()


class Events:
    def __init__(self, connection: Connection, devices: Devices, counters: Counters) -> None:
        self._db = connection
        self._devices = devices
        self._counters = counters

    def record(self, event: Event, now: datetime | None = None) -> bool:
        """Store an event. Returns False for a redelivery of one already stored."""
        return self.record_many([event], now)[0]

    def record_many(self, events: list[Event], now: datetime | None = None) -> list[bool]:
        """Store events, one statement per slice. For each: False for a redelivery of one already
        stored, also of one earlier in the same list."""
        ts = stamp(now)
        keys = [dedupe_key(event) for event in events]
        with self._db.transaction():
            devices = {event.device_id for event in events}
            self._devices.touch(sorted(devices), devices, now)
            inserted: set[str] = set()
            rows = [(e.device_id, e.ts, e.level, e.code, e.message, json.dumps(e.data), ts, key)
                    for e, key in zip(events, keys, strict=True)]
            for part in slices(rows):
                rowset, params = self._db.rowset(("text",) * 8, part)
                inserted.update(row["dedupe_key"] for row in self._db.query(
                    f"WITH v (d, ts, level, code, message, data, received, k) AS ({rowset}) "
                    "INSERT INTO events (device_id, ts, level, code, message, data, received_at, dedupe_key) "
                    "SELECT * FROM v WHERE true ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key",
                    params,
                ))
            stored = first_copies(keys, inserted)
            if duplicates := stored.count(False):
                self._counters.bump("duplicate_events", duplicates)
        return stored

    def recent(self, device_id: str | None = None, limit: int = 50) -> list[EventRow]:
        """Most recent events first."""
        rows = self._db.query(
            "SELECT * FROM events WHERE (? IS NULL OR device_id = ?) ORDER BY id DESC LIMIT ?",
            (device_id, device_id, limit),
        )
        return [EventRow.from_row(row) for row in rows]


class Alerts:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def open(self, device_id: str, kind: str, message: str, now: datetime | None = None) -> bool:
        """Open an alert unless one of this kind is open for the device. True when a new one opened."""
        return self._db.execute(
            "INSERT INTO alerts (device_id, kind, message, raised_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device_id, kind) WHERE cleared_at IS NULL DO NOTHING",
            (device_id, kind, message, stamp(now)),
        ) == 1

    def clear(self, device_id: str, kind: str, now: datetime | None = None) -> bool:
        """Close the open alert of this kind, if any. True when one was closed."""
        return self._db.execute(
            "UPDATE alerts SET cleared_at = ? WHERE device_id = ? AND kind = ? AND cleared_at IS NULL",
            (stamp(now), device_id, kind),
        ) == 1

    def latest(self, device_id: str, kind: str) -> AlertRow | None:
        """The device's newest alert of this kind (the one just opened or cleared)."""
        rows = self._db.query("SELECT * FROM alerts WHERE device_id = ? AND kind = ? ORDER BY id DESC LIMIT 1",
                              (device_id, kind))
        return AlertRow(**rows[0]) if rows else None

    def recent(self, open_only: bool = True, limit: int = 100, device_id: str | None = None) -> list[AlertRow]:
        """Alerts, newest first; by default only those whose condition still holds; optionally of one device."""
        rows = self._db.query(
            "SELECT * FROM alerts WHERE (? = 0 OR cleared_at IS NULL) AND (? IS NULL OR device_id = ?) "
            "ORDER BY id DESC LIMIT ?",
            (int(open_only), device_id, device_id, limit),
        )
        return [AlertRow(**row) for row in rows]

    def acknowledge(self, alert_id: int, by: str, now: datetime | None = None) -> AlertRow | None:
        """Mark the alert taken by `by` (first acknowledgement wins; later ones change nothing).
        None when there is no such alert."""
        self._db.execute("UPDATE alerts SET acknowledged_at = ?, acknowledged_by = ? "
                         "WHERE id = ? AND acknowledged_at IS NULL", (stamp(now), by, alert_id))
        rows = self._db.query("SELECT * FROM alerts WHERE id = ?", (alert_id,))
        return AlertRow(**rows[0]) if rows else None
