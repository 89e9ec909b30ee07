"""The fleet registry: one SQLite file shared by `cloud-bridge serve` and the console subcommands.

- WAL, `busy_timeout`, `synchronous=FULL`: a message is acknowledged to the broker only after its
  row is committed, so a commit must survive power loss (the ingest loop groups a batch of
  messages into one commit to keep that cheap).
- One writer connection per process, guarded by a lock; multi-step writes run in `db.atomic()`
  and start with a write, so SQLite takes the write lock up front and `busy_timeout` applies.
- Command states only move forward (`lifecycle.rank`); every state change is one conditional
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
from typing import TYPE_CHECKING, Any

from sqlite_utils import Database

from autoglm_wire.lifecycle import BRIDGE_STATES, RANKS, TERMINAL_RANK, TERMINAL_STATES, is_terminal
from autoglm_wire.protocol import Command, Event, Reply, Status, StreamChunk, Telemetry, format_ts, utc_now
from cloud_bridge.dispatcher import CommandView
from cloud_bridge.errors import BridgeError, DuplicateCommand, RegistryMissing, UnknownCommand
from cloud_bridge.sql import Backend, IntegrityError, PostgresBackend, SqliteBackend

if TYPE_CHECKING:
    from cloud_bridge.config import StoreConfig

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000
PRUNE_BATCH = 5000  # rows per transaction when old rows are deleted

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
    last_telemetry TEXT,        -- JSON object
    policy TEXT                 -- JSON object: the policy in force (output of the last `config` command)
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
    error TEXT,                 -- {"code", "message"}: from the terminal reply, or the bridge's own
    priority INTEGER NOT NULL DEFAULT 0,
    batch TEXT,                 -- the fan-out this command belongs to (a group or a filter), or NULL
    wire_id TEXT                -- the id the device sees: `id`, or the group command's id for a member row
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
    UNIQUE (device_id, command_id, idx)  -- devices answering one group command share its id
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
CREATE INDEX IF NOT EXISTS commands_by_batch ON commands (batch);
CREATE INDEX IF NOT EXISTS commands_by_wire_id ON commands (wire_id, device_id);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,         -- offline | error_rate | outbox_growing | tokens_per_s_drop
    message TEXT NOT NULL,
    raised_at TEXT NOT NULL,
    cleared_at TEXT             -- NULL while the condition holds
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_open ON alerts (device_id, kind) WHERE cleared_at IS NULL;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


# Upgrades of an existing registry, by the version they lead to. Applied in order, each atomically.
MIGRATIONS: dict[int, str] = {
    2: """
ALTER TABLE devices ADD COLUMN policy TEXT;
ALTER TABLE commands ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN batch TEXT;
ALTER TABLE commands ADD COLUMN wire_id TEXT;
UPDATE commands SET wire_id = id;
ALTER TABLE stream_chunks RENAME TO stream_chunks_v1;
CREATE TABLE stream_chunks (
    id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, command_id TEXT NOT NULL, idx INTEGER NOT NULL,
    delta TEXT NOT NULL, done INTEGER NOT NULL, received_at TEXT NOT NULL, UNIQUE (device_id, command_id, idx)
);
INSERT INTO stream_chunks SELECT * FROM stream_chunks_v1;
DROP TABLE stream_chunks_v1;
""",
}


def _rank_sql(column: str) -> str:
    """SQL CASE expression giving the lifecycle rank of a state column (see lifecycle.rank)."""
    whens = " ".join(f"WHEN '{state}' THEN {r}" for state, r in RANKS.items())
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
    policy: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> DeviceRow:
        values = dict(row)
        for key in ("groups", "kinds"):
            values[key] = _loads(values[key]) or []
        for key in ("last_telemetry", "policy"):
            values[key] = _loads(values[key])
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
    priority: int = 0
    batch: str | None = None
    wire_id: str | None = None  # the id on the wire (differs from `id` for a group command's member row)
    raw_payload: str = field(repr=False, default="")  # the exact bytes that are published

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CommandRow:
        values = dict(row, raw_payload=row["payload"])
        values.pop("rowid", None)  # PostgreSQL's stand-in for SQLite's rowid (insertion order)
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
class StreamRow:
    """A stored stream chunk as the `watch` feed shows it."""

    id: int
    device_id: str
    command_id: str
    idx: int
    delta: str
    received_at: str


@dataclass(frozen=True)
class AlertRow:
    id: int
    device_id: str
    kind: str
    message: str
    raised_at: str
    cleared_at: str | None


@dataclass(frozen=True)
class StateChange:
    id: int
    device_id: str
    state: str
    ts: str


# --- the registry --------------------------------------------------------------------------------


class Registry:
    """The bridge's registry on SQLite or PostgreSQL. Thread-safe: every call takes the connection's lock."""

    def __init__(self, backend: Backend, path: Path | str) -> None:
        self._backend = backend
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0  # nesting of transaction() (guarded by the lock)
        self._touched: dict[str, str] = {}  # device -> last_seen already written in this transaction

    @classmethod
    def connect(cls, url: str) -> Registry:
        """The registry in the PostgreSQL database at `url` (tables created on first use)."""
        backend = PostgresBackend(url)
        try:
            backend.create_schema(SCHEMA_VERSION)
        except BaseException:
            backend.close()
            raise
        return cls(backend, backend.label)

    @classmethod
    def from_config(cls, store: StoreConfig, *, create: bool = True) -> Registry:
        """`[store] url` (PostgreSQL) when set, else the SQLite file `[store] path`."""
        return cls.connect(store.url) if store.url else cls.open(store.path, create=create)

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
        registry = cls(SqliteBackend(_connect(path), str(path)), path)
        try:
            registry._check_schema()
        except BaseException:
            registry.close()
            raise
        return registry

    def _check_schema(self) -> None:
        version = self._sqlite().execute("PRAGMA user_version").fetchone()[0]
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
        if version < SCHEMA_VERSION:
            self._migrate()

    def _migrate(self) -> None:
        """Upgrade an older registry in place, one exclusive transaction per step (safe against a racing peer)."""
        conn = self._sqlite().conn
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in filter(str.strip, MIGRATIONS[target].split(";")):
                        conn.execute(statement)
                for statement in filter(str.strip, SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _sqlite(self) -> Database:
        assert isinstance(self._backend, SqliteBackend)
        return self._backend.db

    def close(self) -> None:
        with self._lock:
            self._backend.close()

    @contextmanager
    def transaction(self) -> Iterator[Registry]:
        """Group several writes into one commit (one fsync). Nests: an inner block joins the outer
        transaction (no savepoint: on PostgreSQL each would cost two round trips), so an error
        anywhere rolls back the whole outer block."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                with self._backend.transaction():
                    yield self
            finally:
                self._depth = 0
                self._touched.clear()

    def _execute(self, sql: str, params: Any = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        with self._lock:
            return self._backend.execute(sql, params)

    def _query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._backend.query(sql, params)

    # --- counters --------------------------------------------------------------------------------

    def bump(self, name: str, by: int = 1) -> None:
        """Add `by` to a named counter (bad payloads, duplicates, ...)."""
        self._execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
            (name, by),
        )

    def counters(self) -> dict[str, int]:
        return {row["name"]: row["value"] for row in self._query("SELECT name, value FROM counters ORDER BY name")}

    # --- devices ---------------------------------------------------------------------------------

    def _ensure_device(self, device_id: str, seen: str | None) -> None:
        """Create the device row if needed; `seen` (when not None) becomes its `last_seen`."""
        if seen is not None and self._touched.get(device_id) == seen:
            return  # touch_devices did it in this transaction
        self._execute(
            "INSERT INTO devices (device_id, last_seen) VALUES (?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET last_seen = coalesce(excluded.last_seen, devices.last_seen)",
            (device_id, seen),
        )

    def touch_devices(self, device_ids: list[str], seen: set[str], now: datetime | None = None) -> None:
        """Create/lock the devices' rows in the given order (see Ingestor.handle_batch); those in `seen`
        get `last_seen` = `now`, and the rest of the transaction skips doing it again per message."""
        ts = _ts(now)
        for device_id in device_ids:
            self._ensure_device(device_id, ts if device_id in seen else None)
            if device_id in seen and self._depth:
                self._touched[device_id] = ts

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
                "UPDATE devices SET state = ?, since = ? WHERE device_id = ? AND state IS DISTINCT FROM ?",
                (status.state, since, status.device_id, status.state),
            ) == 1
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

    def add_command(self, command: Command, device_id: str, now: datetime | None = None,
                    batch: str | None = None, row_id: str | None = None) -> CommandRow:
        """Queue a command for a device (state `pending`). Raises DuplicateCommand if the id exists.

        `batch` names the fan-out (a group or a filter) the command belongs to, if any. `row_id`
        is for one member of a group command: the row is `row_id`, the device sees `command.id`.
        """
        ts = _ts(now)
        expires = format_ts(command.expires_at) if command.expires_at else None
        key = row_id or command.id
        try:
            self._execute(
                "INSERT INTO commands (id, device_id, kind, payload, created_at, expires_at, updated_at, priority, "
                "batch, wire_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, device_id, command.kind, command.model_dump_json(by_alias=True), ts, expires, ts,
                 command.priority, batch, command.id),
            )
        except IntegrityError as exc:
            raise DuplicateCommand(key) from exc
        return self.command(key)

    def command(self, command_id: str) -> CommandRow:
        """The command with this id. Raises UnknownCommand."""
        rows = self._query("SELECT * FROM commands WHERE id = ?", (command_id,))
        if not rows:
            raise UnknownCommand(command_id)
        return CommandRow.from_row(rows[0])

    def commands(self, device_id: str | None = None, limit: int = 20, batch: str | None = None) -> list[CommandRow]:
        """Most recent commands first, optionally of one device and/or one batch."""
        rows = self._query(
            "SELECT * FROM commands WHERE (? IS NULL OR device_id = ?) AND (? IS NULL OR batch = ?) "
            "ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (device_id, device_id, batch, batch, limit),
        )
        return [CommandRow.from_row(row) for row in rows]

    def active_commands(self) -> list[CommandRow]:
        """Commands the bridge still has to deliver (`pending` or `sent`): highest priority, then oldest first."""
        marks = ", ".join("?" for _ in BRIDGE_STATES)
        rows = self._query(
            f"SELECT * FROM commands WHERE state IN ({marks}) ORDER BY priority DESC, created_at, rowid", BRIDGE_STATES
        )
        return [CommandRow.from_row(row) for row in rows]

    def mark_sent(self, command_id: str, now: datetime | None = None, *, claim: CommandRow | None = None) -> bool:
        """Count one more send. False if a reply moved the command past `sent` meanwhile (do not send).

        With `claim` (the row as the caller read it), also False when someone else sent it since: of
        several bridge replicas deciding on the same row, exactly one wins each send.
        """
        ts = _ts(now)
        guard, params = "", (ts, ts, command_id)
        if claim is not None:
            guard, params = " AND attempts = ?", (*params, claim.attempts)
        return self._execute(
            "UPDATE commands SET state = 'sent', attempts = attempts + 1, last_sent_at = ?, updated_at = ? "
            f"WHERE id = ? AND state IN ('pending', 'sent'){guard}",
            params,
        ) == 1

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
        ) == 1

    def active_counts(self) -> dict[str, int]:
        """Unfinished commands per device (how busy each device is)."""
        marks = ", ".join("?" for _ in TERMINAL_STATES)
        rows = self._query(
            f"SELECT device_id, count(*) AS n FROM commands WHERE state NOT IN ({marks}) GROUP BY device_id",
            TERMINAL_STATES,
        )
        return {row["device_id"]: row["n"] for row in rows}

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
                "INSERT INTO replies (device_id, seq, command_id, status, payload, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (reply.device_id, reply.seq, reply.command_id, reply.status, payload, ts),
            ) == 1
            self._ensure_device(reply.device_id, ts)
            if not inserted:
                self.bump("duplicate_replies")
                return False
            if reply.command_id is not None:
                self._advance(reply, payload, ts)
                if reply.status == "succeeded" and reply.output is not None:
                    self._record_policy(reply)
        return True

    def _record_policy(self, reply: Reply) -> None:
        """A succeeded `config` command's output is the policy now in force on the device."""
        self._execute(
            "UPDATE devices SET policy = ? WHERE device_id = ? AND EXISTS "
            "(SELECT 1 FROM commands WHERE wire_id = ? AND device_id = ? AND kind = 'config')",
            (json.dumps(reply.output), reply.device_id, reply.command_id, reply.device_id),
        )

    def _advance(self, reply: Reply, payload: str, ts: str) -> None:
        terminal = reply.is_terminal
        error = reply.error.model_dump_json() if reply.error else None
        self._execute(
            f"UPDATE commands SET state = ?, updated_at = ?, "
            f"reply = CASE WHEN ? THEN ? ELSE reply END, error = CASE WHEN ? THEN ? ELSE error END "
            f"WHERE wire_id = ? AND device_id = ? AND {_rank_sql('state')} < {_rank_sql('?')}",
            (reply.status, ts, terminal, payload, terminal, error, reply.command_id, reply.device_id, reply.status),
        )

    def reply_count(self) -> int:
        """How many distinct replies are stored."""
        return self._query("SELECT count(*) AS n FROM replies")[0]["n"]

    def replies(self, command_id: str) -> list[ReplyRow]:
        """The replies the command's device sent for it, in arrival order."""
        wire_id, device_id = self._on_the_wire(command_id)
        rows = self._query(
            "SELECT * FROM replies WHERE command_id = ? AND (? IS NULL OR device_id = ?) ORDER BY id",
            (wire_id, device_id, device_id),
        )
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
                "INSERT INTO stream_chunks (device_id, command_id, idx, delta, done, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (device_id, chunk.command_id, chunk.index, chunk.delta, chunk.done, ts),
            ) == 1
            self._ensure_device(device_id, ts)
            if not inserted:
                self.bump("duplicate_chunks")
        return inserted

    def chunks(self, command_id: str, from_idx: int = 0) -> list[ChunkRow]:
        """Stored chunks of a command with index >= `from_idx`, in index order (gaps possible: QoS 0)."""
        wire_id, device_id = self._on_the_wire(command_id)
        rows = self._query(
            "SELECT idx, delta, done FROM stream_chunks WHERE command_id = ? AND (? IS NULL OR device_id = ?) "
            "AND idx >= ? ORDER BY idx",
            (wire_id, device_id, device_id, from_idx),
        )
        return [ChunkRow(command_id, r["idx"], r["delta"], bool(r["done"])) for r in rows]

    def _on_the_wire(self, command_id: str) -> tuple[str, str | None]:
        """(id the device uses, device) of a queued command; (command_id, None) for one never queued here."""
        rows = self._query("SELECT wire_id, device_id FROM commands WHERE id = ?", (command_id,))
        if not rows or rows[0]["wire_id"] is None:
            return command_id, None
        return rows[0]["wire_id"], rows[0]["device_id"]

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

    def events(self, device_id: str | None = None, limit: int = 50) -> list[EventRow]:
        """Most recent events first."""
        rows = self._query(
            "SELECT * FROM events WHERE (? IS NULL OR device_id = ?) ORDER BY id DESC LIMIT ?",
            (device_id, device_id, limit),
        )
        return [EventRow.from_row(row) for row in rows]

    def recent_replies(self, device_id: str | None = None, limit: int = 50) -> list[ReplyRow]:
        """Most recent replies first."""
        rows = self._query(
            "SELECT * FROM replies WHERE (? IS NULL OR device_id = ?) ORDER BY id DESC LIMIT ?",
            (device_id, device_id, limit),
        )
        return [ReplyRow.from_row(row) for row in rows]

    # --- retention -------------------------------------------------------------------------------

    def prune(self, before: datetime | None, chunks_before: datetime | None,
              batch: int = PRUNE_BATCH) -> dict[str, int]:
        """Delete what is finished and older than `before` (commands in a terminal state and
        replies of commands no longer active, events, cleared alerts, device state history) and
        stream chunks older than `chunks_before`; None keeps that kind. Works in transactions of
        at most `batch` rows, so ingest is never held up for long. Returns the rows deleted, by table."""
        terminal = ", ".join("?" for _ in TERMINAL_STATES)
        plans: list[tuple[str, str, datetime | None, tuple[Any, ...]]] = [
            ("stream_chunks", "SELECT id FROM stream_chunks WHERE received_at < ?", chunks_before, ()),
            ("commands", f"SELECT id FROM commands WHERE updated_at < ? AND state IN ({terminal})", before,
             TERMINAL_STATES),
            ("replies", "SELECT id FROM replies r WHERE received_at < ? AND NOT EXISTS (SELECT 1 FROM commands c "
             f"WHERE c.wire_id = r.command_id AND c.device_id = r.device_id AND c.state NOT IN ({terminal}))",
             before, TERMINAL_STATES),
            ("events", "SELECT id FROM events WHERE received_at < ?", before, ()),
            ("alerts", "SELECT id FROM alerts WHERE cleared_at < ?", before, ()),
            ("device_states", "SELECT id FROM device_states WHERE ts < ?", before, ()),
        ]
        deleted: dict[str, int] = {}
        for table, select, cutoff, params in plans:
            if cutoff is None:
                continue
            deleted[table] = 0
            while True:
                with self.transaction():
                    n = self._execute(f"DELETE FROM {table} WHERE id IN ({select} LIMIT ?)",
                                      (_ts(cutoff), *params, batch))
                deleted[table] += n
                if n < batch:
                    break
        return deleted

    # --- alerts ----------------------------------------------------------------------------------

    def raise_alert(self, device_id: str, kind: str, message: str, now: datetime | None = None) -> bool:
        """Open an alert unless one of this kind is open for the device. True when a new one opened."""
        return self._execute(
            "INSERT INTO alerts (device_id, kind, message, raised_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device_id, kind) WHERE cleared_at IS NULL DO NOTHING",
            (device_id, kind, message, _ts(now)),
        ) == 1

    def clear_alert(self, device_id: str, kind: str, now: datetime | None = None) -> bool:
        """Close the open alert of this kind, if any. True when one was closed."""
        return self._execute(
            "UPDATE alerts SET cleared_at = ? WHERE device_id = ? AND kind = ? AND cleared_at IS NULL",
            (_ts(now), device_id, kind),
        ) == 1

    def alerts(self, open_only: bool = True, limit: int = 100) -> list[AlertRow]:
        """Alerts, newest first; by default only those whose condition still holds."""
        rows = self._query(
            "SELECT * FROM alerts WHERE (? = 0 OR cleared_at IS NULL) ORDER BY id DESC LIMIT ?",
            (int(open_only), limit),
        )
        return [AlertRow(**row) for row in rows]

    def terminal_states(self, device_id: str, limit: int) -> list[str]:
        """States of the device's last `limit` finished commands, newest first."""
        marks = ", ".join("?" for _ in TERMINAL_STATES)
        rows = self._query(
            f"SELECT state FROM commands WHERE device_id = ? AND state IN ({marks}) "
            "ORDER BY updated_at DESC, rowid DESC LIMIT ?",
            (device_id, *TERMINAL_STATES, limit),
        )
        return [row["state"] for row in rows]

    def decode_speeds(self, device_id: str, limit: int) -> list[float]:
        """`tokens_per_s` of the device's last `limit` succeeded generations, newest first."""
        tps = self._backend.json_number("payload", "metrics", "tokens_per_s")
        rows = self._query(
            f"SELECT {tps} AS tps FROM replies "
            f"WHERE device_id = ? AND status = 'succeeded' AND {tps} IS NOT NULL ORDER BY id DESC LIMIT ?",
            (device_id, limit),
        )
        return [float(row["tps"]) for row in rows]

    def last_ids(self) -> dict[str, int]:
        """Highest row id of each feed table, so `watch` can start at "now"."""
        return {
            table: self._query(f"SELECT coalesce(max(id), 0) AS m FROM {table}")[0]["m"]
            for table in ("replies", "events", "device_states", "stream_chunks")
        }

    def chunks_after(self, after_id: int, device_id: str | None = None) -> list[StreamRow]:
        """Stream chunks with id > `after_id`, in arrival order (the `watch` feed)."""
        rows = self._query(
            "SELECT id, device_id, command_id, idx, delta, received_at FROM stream_chunks "
            "WHERE id > ? AND (? IS NULL OR device_id = ?) ORDER BY id",
            (after_id, device_id, device_id),
        )
        return [StreamRow(**row) for row in rows]
