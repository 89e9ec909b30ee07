"""The fleet registry: one SQLite file shared by `cloud-bridge serve` and the console subcommands.

- WAL, `busy_timeout`, `synchronous=FULL`: a message is acknowledged to the broker only after its
  row is committed, so a commit must survive power loss (the ingest loop groups a batch of
  messages into one commit to keep that cheap).
- One writer connection per process, guarded by a lock; multi-step writes run in `db.atomic()`
  and start with a write, so SQLite takes the write lock up front and `busy_timeout` applies.
- Command states only move forward (`dispatcher.advances`); every state change is one conditional
  UPDATE, so the serve process and a console process never race each other into a regression.
- Replies are unique on (device_id, seq) and stream chunks on (command_id, idx): duplicates from
  the device are ignored and counted in `counters`.

Timestamps are stored as protocol `ts` strings (UTC, milliseconds, `Z`), which sort as text.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from cloud_bridge.dispatcher import BRIDGE_STATES, STATE_RANKS, TERMINAL_RANK, CommandView, is_terminal
from cloud_bridge.errors import BridgeError, DuplicateCommand, RegistryMissing, UnknownCommand
from edge_agent.protocol import Command, Event, Reply, Status, StreamChunk, Telemetry, format_ts, utc_now

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    state TEXT,                 -- online | offline | NULL: never reported status
    since TEXT,                 -- when `state` last changed
    last_seen TEXT,             -- last message of any kind from the device
    agent_version TEXT,
    model_name TEXT,
    model_sha256 TEXT,
    n_gpu_layers INTEGER,
    groups TEXT,                -- JSON list
    kinds TEXT,                 -- JSON list
    last_telemetry TEXT         -- JSON object
);
CREATE TABLE IF NOT EXISTS device_states (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,
    ts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,      -- the exact Command JSON that is published
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    last_sent_at TEXT,
    updated_at TEXT NOT NULL,
    reply TEXT,                 -- the terminal Reply JSON
    error TEXT                  -- {"code", "message"}: from the terminal reply, or the bridge's own
);
CREATE INDEX IF NOT EXISTS commands_by_state ON commands (state);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device_id, created_at);
CREATE TABLE IF NOT EXISTS replies (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    command_id TEXT,
    status TEXT NOT NULL,
    payload TEXT NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (device_id, seq)
);
CREATE INDEX IF NOT EXISTS replies_by_command ON replies (command_id);
CREATE TABLE IF NOT EXISTS stream_chunks (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    command_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    delta TEXT NOT NULL,
    done INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (command_id, idx)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    level TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def _rank_sql(column: str) -> str:
    """SQL CASE expression giving the lifecycle rank of a state column (see dispatcher.rank)."""
    whens = " ".join(f"WHEN '{state}' THEN {r}" for state, r in STATE_RANKS.items())
    return f"(CASE {column} {whens} ELSE {TERMINAL_RANK} END)"


def _ts(moment: datetime | None) -> str:
    return format_ts(moment or utc_now())


def _parse_ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _loads(value: str | None) -> Any:
    return json.loads(value) if value else None


def _connect(path: Path) -> Database:
    """One connection, usable from any thread (the Registry's lock serialises it)."""
    try:
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        db = Database(conn, execute_plugins=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        raise BridgeError(f"cannot open the registry {path}: {exc}; check that its folder exists and is writable"
                          ) from exc
    return db


def _initialise(path: Path) -> None:
    """Create a registry file with the full schema, atomically (a no-op if another process won)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BridgeError(f"cannot create the folder of the registry {path}: {exc.strerror}") from exc
    staging = path.with_name(f".{path.name}.{os.getpid()}.new")
    staging.unlink(missing_ok=True)
    db = _connect(staging)
    try:
        db.enable_wal()
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    finally:
        db.close()
    try:
        os.link(staging, path)
    except FileExistsError:
        pass
    finally:
        staging.unlink(missing_ok=True)


# --- rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    state: str | None
    since: str | None
    last_seen: str | None
    agent_version: str | None
    model_name: str | None
    model_sha256: str | None
    n_gpu_layers: int | None
    groups: list[str]
    kinds: list[str]
    last_telemetry: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> DeviceRow:
        values = dict(row)
        for key in ("groups", "kinds"):
            values[key] = _loads(values[key]) or []
        values["last_telemetry"] = _loads(values["last_telemetry"])
        return cls(**values)


@dataclass(frozen=True)
class CommandRow:
    id: str
    device_id: str
    kind: str
    payload: dict[str, Any]
    state: str
    attempts: int
    created_at: str
    expires_at: str | None
    last_sent_at: str | None
    updated_at: str
    reply: dict[str, Any] | None
    error: dict[str, Any] | None
    raw_payload: str = field(repr=False, default="")  # the exact bytes that are published

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CommandRow:
        values = dict(row, raw_payload=row["payload"])
        for key in ("payload", "reply", "error"):
            values[key] = _loads(values[key])
        return cls(**values)

    @property
    def terminal(self) -> bool:
        return is_terminal(self.state)

    def view(self) -> CommandView:
        """The dispatcher's view of this row."""
        return CommandView(self.state, self.attempts, _parse_ts(self.last_sent_at), _parse_ts(self.expires_at))


@dataclass(frozen=True)
class ReplyRow:
    id: int
    device_id: str
    seq: int
    command_id: str | None
    status: str
    payload: dict[str, Any]
    received_at: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ReplyRow:
        return cls(**{**row, "payload": json.loads(row["payload"])})


@dataclass(frozen=True)
class ChunkRow:
    command_id: str
    idx: int
    delta: str
    done: bool


@dataclass(frozen=True)
class EventRow:
    id: int
    device_id: str
    ts: str
    level: str
    code: str
    message: str
    data: dict[str, Any]
    received_at: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> EventRow:
        return cls(**{**row, "data": json.loads(row["data"])})


@dataclass(frozen=True)
class StateChange:
    id: int
    device_id: str
    state: str
    ts: str


# --- the registry --------------------------------------------------------------------------------


class Registry:
    """The bridge's SQLite registry. Thread-safe: every call takes the connection's lock."""

    def __init__(self, db: Database, path: Path) -> None:
        self._db = db
        self.path = path
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> Registry:
        """Open the registry at `path`; with `create`, make a new one if there is none.

        Without `create`, a missing file raises RegistryMissing: the console never creates an
        empty registry that no bridge reads. A new registry is built under another name and linked
        into place, so a console never sees a half-made file.
        """
        if not path.exists():
            if not create:
                raise RegistryMissing(path)
            _initialise(path)
        registry = cls(_connect(path), path)
        registry._check_schema()
        return registry

    def _check_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BridgeError(
                f"the registry {self.path} has schema version {version}, newer than this cloud-bridge "
                f"understands ({SCHEMA_VERSION}); upgrade cloud-bridge"
            )
        if version < 1:
            raise BridgeError(
                f"{self.path} is not a cloud-bridge registry (no schema version); check [store] path in the "
                "config: it must not point at another program's database"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Registry]:
        """Group several writes into one commit (one fsync). Nests."""
        with self._lock, self._db.atomic():
            yield self

    def _execute(self, sql: str, params: Any = None) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def _query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._db.query(sql, params or ()))

    # --- counters --------------------------------------------------------------------------------

    def bump(self, name: str, by: int = 1) -> None:
        """Add `by` to a named counter (bad payloads, duplicates, ...)."""
        self._execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def counters(self) -> dict[str, int]:
        return {row["name"]: row["value"] for row in self._query("SELECT name, value FROM counters ORDER BY name")}

    # --- devices ---------------------------------------------------------------------------------

    def _ensure_device(self, device_id: str, seen: str | None) -> None:
        """Create the device row if needed; `seen` (when not None) becomes its `last_seen`."""
        self._execute(
            "INSERT INTO devices (device_id, last_seen) VALUES (?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET last_seen = coalesce(excluded.last_seen, last_seen)",
            (device_id, seen),
        )

    def record_status(self, status: Status, now: datetime | None = None, retained: bool = False) -> bool:
        """Store a status or a last will. Returns True when the device's state changed.

        A `retained` status is a replay from the broker's store (at subscribe), not news: it does not
        count as the device being seen, and a state change it brings dates from the status's own `ts`.
        A last will (`offline`) is published by the broker, so it does not count as seen either.
        """
        ts = _ts(now)
        seen = None if retained or status.state == "offline" else ts
        since = status.ts if retained and status.ts else ts
        with self.transaction():
            self._ensure_device(status.device_id, seen)
            changed = self._execute(
                "UPDATE devices SET state = ?, since = ? WHERE device_id = ? AND state IS NOT ?",
                (status.state, since, status.device_id, status.state),
            ).rowcount == 1
            if changed:
                self._execute(
                    "INSERT INTO device_states (device_id, state, ts) VALUES (?, ?, ?)",
                    (status.device_id, status.state, since),
                )
            if status.state == "online":
                self._record_identity(status)
        return changed

    def _record_identity(self, status: Status) -> None:
        model = status.model
        self._execute(
            "UPDATE devices SET agent_version = ?, model_name = ?, model_sha256 = ?, n_gpu_layers = ?, "
            "groups = ?, kinds = ? WHERE device_id = ?",
            (
                status.agent_version,
                model.name if model else None,
                model.sha256 if model else None,
                model.n_gpu_layers if model else None,
                json.dumps(status.groups or []),
                json.dumps(status.kinds or []),
                status.device_id,
            ),
        )

    def record_telemetry(self, telemetry: Telemetry, now: datetime | None = None) -> None:
        """Keep the latest telemetry of a device."""
        with self.transaction():
            self._ensure_device(telemetry.device_id, _ts(now))
            self._execute(
                "UPDATE devices SET last_telemetry = ? WHERE device_id = ?",
                (telemetry.model_dump_json(), telemetry.device_id),
            )

    def device(self, device_id: str) -> DeviceRow | None:
        rows = self._query("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return DeviceRow.from_row(rows[0]) if rows else None

    def devices(self) -> list[DeviceRow]:
        return [DeviceRow.from_row(row) for row in self._query("SELECT * FROM devices ORDER BY device_id")]

    def device_states_after(self, after_id: int, device_id: str | None = None) -> list[StateChange]:
        """State changes with id > `after_id`, oldest first (the `watch` feed)."""
        rows = self._query(
            "SELECT * FROM device_states WHERE id > ? AND (? IS NULL OR device_id = ?) ORDER BY id",
            (after_id, device_id, device_id),
        )
        return [StateChange(**row) for row in rows]

    # --- commands --------------------------------------------------------------------------------

    def add_command(self, command: Command, device_id: str, now: datetime | None = None) -> CommandRow:
        """Queue a command for a device (state `pending`). Raises DuplicateCommand if the id exists."""
        ts = _ts(now)
        expires = format_ts(command.expires_at) if command.expires_at else None
        try:
            self._execute(
                "INSERT INTO commands (id, device_id, kind, payload, created_at, expires_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (command.id, device_id, command.kind, command.model_dump_json(by_alias=True), ts, expires, ts),
            )
        except sqlite3.IntegrityError as exc:
            raise DuplicateCommand(command.id) from exc
        return self.command(command.id)

    def command(self, command_id: str) -> CommandRow:
        """The command with this id. Raises UnknownCommand."""
        rows = self._query("SELECT * FROM commands WHERE id = ?", (command_id,))
        if not rows:
            raise UnknownCommand(command_id)
        return CommandRow.from_row(rows[0])

    def commands(self, device_id: str | None = None, limit: int = 20) -> list[CommandRow]:
        """Most recent commands first, optionally of one device."""
        rows = self._query(
            "SELECT * FROM commands WHERE (? IS NULL OR device_id = ?) ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (device_id, device_id, limit),
        )
        return [CommandRow.from_row(row) for row in rows]

    def active_commands(self) -> list[CommandRow]:
        """Commands the bridge still has to deliver (`pending` or `sent`), oldest first."""
        marks = ", ".join("?" for _ in BRIDGE_STATES)
        rows = self._query(
            f"SELECT * FROM commands WHERE state IN ({marks}) ORDER BY created_at, rowid", BRIDGE_STATES
        )
        return [CommandRow.from_row(row) for row in rows]

    def mark_sent(self, command_id: str, now: datetime | None = None) -> bool:
        """Count one more send. False if a reply moved the command past `sent` meanwhile (do not send)."""
        ts = _ts(now)
        return self._execute(
            "UPDATE commands SET state = 'sent', attempts = attempts + 1, last_sent_at = ?, updated_at = ? "
            "WHERE id = ? AND state IN ('pending', 'sent')",
            (ts, ts, command_id),
        ).rowcount == 1

    def mark_expired(self, command_id: str, message: str, now: datetime | None = None) -> bool:
        """Expire a command the device never accepted. False if a reply got there first."""
        return self.close_locally(command_id, "expired", message, now)

    def close_locally(self, command_id: str, state: str, message: str, now: datetime | None = None) -> bool:
        """End a command the device never accepted with a terminal `state` (`expired`, `cancelled`).

        The error code is the state's name. Returns False if a device reply moved it past `sent`
        first (then the device owns it and will report its end itself).
        """
        if not is_terminal(state):
            raise ValueError(f"close_locally needs a terminal state, not {state!r}")
        ts = _ts(now)
        error = json.dumps({"code": state, "message": message})
        return self._execute(
            "UPDATE commands SET state = ?, error = ?, updated_at = ? WHERE id = ? AND state IN ('pending', 'sent')",
            (state, error, ts, command_id),
        ).rowcount == 1

    def device_states(self) -> dict[str, str | None]:
        """Last reported state of every device that has commands left to deliver."""
        rows = self._query(
            "SELECT device_id, state FROM devices WHERE device_id IN "
            "(SELECT device_id FROM commands WHERE state IN ('pending', 'sent'))"
        )
        return {row["device_id"]: row["state"] for row in rows}

    # --- replies ---------------------------------------------------------------------------------

    def record_reply(self, reply: Reply, now: datetime | None = None) -> bool:
        """Store a reply and move its command forward. Returns False for a duplicate (device_id, seq)."""
        ts = _ts(now)
        payload = reply.model_dump_json()
        with self.transaction():
            inserted = self._execute(
                "INSERT OR IGNORE INTO replies (device_id, seq, command_id, status, payload, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (reply.device_id, reply.seq, reply.command_id, reply.status, payload, ts),
            ).rowcount == 1
            self._ensure_device(reply.device_id, ts)
            if not inserted:
                self.bump("duplicate_replies")
                return False
            if reply.command_id is not None:
                self._advance(reply, payload, ts)
        return True

    def _advance(self, reply: Reply, payload: str, ts: str) -> None:
        terminal = reply.is_terminal
        error = reply.error.model_dump_json() if reply.error else None
        self._execute(
            f"UPDATE commands SET state = ?, updated_at = ?, "
            f"reply = CASE WHEN ? THEN ? ELSE reply END, error = CASE WHEN ? THEN ? ELSE error END "
            f"WHERE id = ? AND device_id = ? AND {_rank_sql('state')} < {_rank_sql('?')}",
            (reply.status, ts, terminal, payload, terminal, error, reply.command_id, reply.device_id, reply.status),
        )

    def replies(self, command_id: str) -> list[ReplyRow]:
        rows = self._query("SELECT * FROM replies WHERE command_id = ? ORDER BY id", (command_id,))
        return [ReplyRow.from_row(row) for row in rows]

    def replies_after(self, after_id: int, device_id: str | None = None) -> list[ReplyRow]:
        """Replies with id > `after_id`, oldest first (the `watch` feed)."""
        rows = self._query(
            "SELECT * FROM replies WHERE id > ? AND (? IS NULL OR device_id = ?) ORDER BY id",
            (after_id, device_id, device_id),
        )
        return [ReplyRow.from_row(row) for row in rows]

    # --- stream chunks ---------------------------------------------------------------------------

    def record_chunk(self, device_id: str, chunk: StreamChunk, now: datetime | None = None) -> bool:
        """Store a stream chunk. Returns False for a duplicate (command_id, index)."""
        ts = _ts(now)
        with self.transaction():
            inserted = self._execute(
                "INSERT OR IGNORE INTO stream_chunks (device_id, command_id, idx, delta, done, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (device_id, chunk.command_id, chunk.index, chunk.delta, chunk.done, ts),
            ).rowcount == 1
            self._ensure_device(device_id, ts)
            if not inserted:
                self.bump("duplicate_chunks")
        return inserted

    def chunks(self, command_id: str, from_idx: int = 0) -> list[ChunkRow]:
        """Stored chunks of a command with index >= `from_idx`, in index order (gaps possible: QoS 0)."""
        rows = self._query(
            "SELECT command_id, idx, delta, done FROM stream_chunks WHERE command_id = ? AND idx >= ? ORDER BY idx",
            (command_id, from_idx),
        )
        return [ChunkRow(r["command_id"], r["idx"], r["delta"], bool(r["done"])) for r in rows]

    # --- events ----------------------------------------------------------------------------------

    def record_event(self, event: Event, now: datetime | None = None) -> None:
        ts = _ts(now)
        with self.transaction():
            self._execute(
                "INSERT INTO events (device_id, ts, level, code, message, data, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event.device_id, event.ts, event.level, event.code, event.message, json.dumps(event.data), ts),
            )
            self._ensure_device(event.device_id, ts)

    def events_after(self, after_id: int, device_id: str | None = None) -> list[EventRow]:
        """Events with id > `after_id`, oldest first (the `watch` feed)."""
        rows = self._query(
            "SELECT * FROM events WHERE id > ? AND (? IS NULL OR device_id = ?) ORDER BY id",
            (after_id, device_id, device_id),
        )
        return [EventRow.from_row(row) for row in rows]

    def last_ids(self) -> dict[str, int]:
        """Highest row id of each feed table, so `watch` can start at "now"."""
        return {
            table: self._query(f"SELECT coalesce(max(id), 0) AS m FROM {table}")[0]["m"]
            for table in ("replies", "events", "device_states")
        }
