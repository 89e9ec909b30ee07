"""Devices: their rows (identity, state, last telemetry, the policy in force) and state history."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from autoglm_wire.protocol import Reply, Status, Telemetry
from cloud_bridge.store.connection import Connection, slices
from cloud_bridge.store.rows import DeviceRow, StateChange, stamp, wire_ts

MAX_PAGE = 1000  # devices one page() returns at most


def _like_escaped(text: str) -> str:
    """`text` matched literally by `LIKE ... ESCAPE '\\'`."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class DeviceQuery:
    """Which devices to list (every field given must match) and which page of them, by device id."""

    state: str | None = None  # the state last reported (online, offline, ...)
    group: str | None = None  # a group the registry assigns the device (device_groups)
    model: str | None = None  # the active model's name, or its sha256 (or a prefix of it)
    q: str | None = None  # a substring of the device id, case-insensitive
    limit: int = 100
    offset: int = 0

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition (portable: both backends) and its parameters."""
        conditions, params = ["1 = 1"], []
        if self.state is not None:
            conditions.append("state = ?")
            params.append(self.state)
        if self.group is not None:
            conditions.append("device_id IN (SELECT device_id FROM device_groups WHERE group_name = ?)")
            params.append(self.group)
        if self.model is not None:
            conditions.append("(model_name = ? OR model_sha256 LIKE ? ESCAPE '\\')")
            params += [self.model, f"{_like_escaped(self.model.lower())}%"]
        if self.q is not None:
            conditions.append("lower(device_id) LIKE ? ESCAPE '\\'")
            params.append(f"%{_like_escaped(self.q.lower())}%")
        return " AND ".join(conditions), params


class Devices:
    def __init__(self, connection: Connection) -> None:
        self._db = connection
        self._touched: dict[str, str] = {}  # device -> last_seen already written in this transaction
        connection.on_transaction_end(self._touched.clear)

    def ensure(self, device_id: str, seen: str | None) -> None:
        """Create the device row if needed; `seen` (when not None) becomes its `last_seen`."""
        if seen is not None and self._touched.get(device_id) == seen:
            return  # touch() did it in this transaction
        self._db.execute(
            "INSERT INTO devices (device_id, last_seen) VALUES (?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET last_seen = coalesce(excluded.last_seen, devices.last_seen)",
            (device_id, seen),
        )

    def touch(self, device_ids: list[str], seen: set[str], now: datetime | None = None) -> None:
        """Create/lock the devices' rows in the given order (see Ingestor.handle_batch), in one statement
        per slice; those in `seen` get `last_seen` = `now`, and the rest of the transaction skips doing
        it again per message."""
        ts = stamp(now)
        rows = [(device_id, ts if device_id in seen else None) for device_id in dict.fromkeys(device_ids)
                if not (device_id in seen and self._touched.get(device_id) == ts)]
        with self._db.transaction():
            for part in slices(rows):
                rowset, params = self._db.rowset(("text", "text"), part)
                self._db.execute(
                    f"WITH v (d, seen) AS ({rowset}) INSERT INTO devices (device_id, last_seen) "
                    "SELECT d, seen FROM v WHERE true "  # WHERE: SQLite would read ON CONFLICT as a join's ON
                    "ON CONFLICT (device_id) DO UPDATE SET last_seen = coalesce(excluded.last_seen, devices.last_seen)",
                    params,
                )
            self._touched.update((device_id, ts) for device_id, seen_at in rows if seen_at is not None)

    def record_status(self, status: Status, now: datetime | None = None, retained: bool = False) -> bool:
        """Store a status or a last will. Returns True when the device's state changed.

        Statuses are ordered by their own `ts`: one older than the newest applied is a replay (from a
        lagging or restarted replica's queue) and changes nothing. A status without `ts` (the last
        will, which the broker publishes) cannot be ordered and is applied as it comes. Raises
        ValueError for a `ts` that is not a time with an offset (`rows.wire_ts`).

        A `retained` status is a replay from the broker's store (at subscribe), not news: it does not
        count as the device being seen, and a state change it brings dates from the status's own `ts`.
        A last will (`offline`) is published by the broker, so it does not count as seen either.
        """
        ts = stamp(now)
        status_ts = None if status.ts is None else wire_ts(status.ts)
        seen = None if retained or status.state == "offline" else ts
        since = status_ts if retained and status_ts else ts
        with self._db.transaction():
            self.ensure(status.device_id, seen)
            if status_ts is not None and self._db.execute(
                "UPDATE devices SET status_ts = ? WHERE device_id = ? AND (status_ts IS NULL OR status_ts <= ?)",
                (status_ts, status.device_id, status_ts),
            ) == 0:
                return False
            changed = self._db.execute(
                "UPDATE devices SET state = ?, since = ? WHERE device_id = ? AND state IS DISTINCT FROM ?",
                (status.state, since, status.device_id, status.state),
            ) == 1
            if changed:
                self._db.execute(
                    "INSERT INTO device_states (device_id, state, ts) VALUES (?, ?, ?)",
                    (status.device_id, status.state, since),
                )
            if status.state == "online":
                self._record_identity(status)
        return changed

    def _record_identity(self, status: Status) -> None:
        model = status.model
        self._db.execute(
            "UPDATE devices SET agent_version = ?, model_name = ?, model_sha256 = ?, n_gpu_layers = ?, "
            "claimed_groups = ?, kinds = ?, previous_model_name = ?, previous_model_sha256 = ?, rollout = ? "
            "WHERE device_id = ?",
            (
                status.agent_version,
                model.name if model else None,
                model.sha256 if model else None,
                model.n_gpu_layers if model else None,
                json.dumps(status.groups or []),
                json.dumps(status.kinds or []),
                status.previous_model.name if status.previous_model else None,
                status.previous_model.sha256 if status.previous_model else None,
                status.rollout,
                status.device_id,
            ),
        )

    def record_telemetry(self, telemetry: Telemetry, now: datetime | None = None) -> None:
        """Keep the latest telemetry of a device."""
        self.record_telemetries([telemetry], now)

    def record_telemetries(self, telemetries: list[Telemetry], now: datetime | None = None) -> None:
        """Keep the latest telemetry of each device (the last of the list wins), one statement per slice."""
        latest = {t.device_id: t.model_dump_json() for t in telemetries}
        rows = sorted(latest.items())  # the devices' row locks in id order, like touch()
        with self._db.transaction():
            self.touch([device_id for device_id, _ in rows], set(latest), now)
            for part in slices(rows):
                rowset, params = self._db.rowset(("text", "text"), part)
                self._db.execute(
                    f"WITH v (d, t) AS ({rowset}) "
                    "UPDATE devices SET last_telemetry = v.t FROM v WHERE devices.device_id = v.d",
                    params,
                )

    def record_policy(self, reply: Reply) -> None:
        """A succeeded `config` command's output is the policy now in force on the device."""
        self._db.execute(
            "UPDATE devices SET policy = ? WHERE device_id = ? AND EXISTS "
            "(SELECT 1 FROM commands WHERE wire_id = ? AND device_id = ? AND kind = 'config')",
            (json.dumps(reply.output), reply.device_id, reply.command_id, reply.device_id),
        )

    def get(self, device_id: str) -> DeviceRow | None:
        """The device, or None if it never sent anything (nor was assigned a group)."""
        rows = self._db.query("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        if not rows:
            return None
        groups = self._db.query("SELECT group_name FROM device_groups WHERE device_id = ?", (device_id,))
        return DeviceRow.from_row(rows[0], [g["group_name"] for g in groups])

    def many(self, device_ids: list[str]) -> list[DeviceRow]:
        """The known devices among `device_ids`, by id (one statement per slice of them)."""
        rows: list[DeviceRow] = []
        for part in slices(sorted(set(device_ids))):
            rowset, params = self._db.rowset(("text",), [(device_id,) for device_id in part])
            rows += self._with_groups(self._db.query(
                f"WITH v (d) AS ({rowset}) SELECT * FROM devices WHERE device_id IN (SELECT d FROM v) "
                "ORDER BY device_id", params))
        return rows

    def _with_groups(self, rows: list[dict[str, Any]]) -> list[DeviceRow]:
        """`rows` of `devices` as DeviceRows with their assigned groups (one statement per slice)."""
        groups: dict[str, list[str]] = {}
        for part in slices(rows):
            rowset, params = self._db.rowset(("text",), [(row["device_id"],) for row in part])
            for membership in self._db.query(f"WITH v (d) AS ({rowset}) SELECT device_id, group_name FROM "
                                             "device_groups WHERE device_id IN (SELECT d FROM v)", params):
                groups.setdefault(membership["device_id"], []).append(membership["group_name"])
        return [DeviceRow.from_row(row, groups.get(row["device_id"], [])) for row in rows]

    def all(self) -> list[DeviceRow]:
        """Every known device, by id, with the groups the registry assigns it."""
        memberships = self._db.query("SELECT device_id, group_name FROM device_groups")
        rows = self._db.query("SELECT * FROM devices ORDER BY device_id")
        groups: dict[str, list[str]] = {}
        for membership in memberships:
            groups.setdefault(membership["device_id"], []).append(membership["group_name"])
        return [DeviceRow.from_row(row, groups.get(row["device_id"], [])) for row in rows]

    def history(self, device_id: str, limit: int = 50) -> list[StateChange]:
        """The device's state changes (online/offline), newest first."""
        rows = self._db.query("SELECT * FROM device_states WHERE device_id = ? ORDER BY id DESC LIMIT ?",
                              (device_id, limit))
        return [StateChange(**row) for row in rows]

    def page(self, query: DeviceQuery) -> tuple[list[DeviceRow], int]:
        """One page of the devices `query` selects, by id, and how many it selects in all."""
        if not 1 <= query.limit <= MAX_PAGE or query.offset < 0:
            raise ValueError(f"limit must be 1..{MAX_PAGE} and offset >= 0, not {query.limit} and {query.offset}")
        where, params = query.where()
        total = self._db.query(f"SELECT count(*) AS n FROM devices WHERE {where}", params)[0]["n"]
        rows = self._db.query(f"SELECT * FROM devices WHERE {where} ORDER BY device_id LIMIT ? OFFSET ?",
                              [*params, query.limit, query.offset])
        return self._with_groups(rows), total
