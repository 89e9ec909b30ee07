"""The device's SQLite file: command ledger (inbox), outbox of replies/events, counters.

One writer connection guarded by a lock (callers: the link's intake, the executor, the pump);
WAL journal; `synchronous` FULL by default so an accepted command and a stored reply survive a
power cut (see docs/architecture.md). Every state change of a command and the reply announcing
it are written in one transaction, so a crash never leaves one without the other. Outbox rows
are deleted only when the link reports the broker's ack.

With `synchronous = full`, the commits on the way from a delivered command to its generation skip
their own fsync, so a generation starts without waiting for the disk: intake's (`accept`,
`reject`; `accept(claim=True)` also moves the command to `running` in the same commit, for an
idle worker that started it early) and the claim (`claim`, accepted -> running). Each is durable against a crash of
the process at once (the WAL write is in the OS) and against power loss at the next `sync()` (one
fsync of the WAL), which comes before anything that depends on it leaves the device: the link
calls it before the PUBACK of a command and before publishing outbox rows, the executor before
the first stream chunk. Deleting acked outbox rows needs no fsync at all (a delete lost to a power
cut re-publishes rows the cloud dedupes). Every other commit (terminal replies, events, policy)
is fsynced itself.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlite_utils import Database

from autoglm_wire import lifecycle
from autoglm_wire.errors import Busy, ProtocolError
from autoglm_wire.lifecycle import ReplyStatus, State
from autoglm_wire.protocol import ErrorInfo, Event, Reply, format_ts, to_bytes, utc_now
from autoglm_wire.topics import DeviceTopics

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    received_at REAL NOT NULL,
    expires_at REAL,
    response_topic TEXT,
    correlation_data BLOB,
    last_reply BLOB,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_queue ON commands (state, priority DESC, received_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    correlation_data BLOB,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
-- The outbox's size, kept by triggers in the same transactions as the rows: the caps are checked
-- on every intake, and counting 100,000 rows takes ~25 ms. A store made before this table gets
-- it, counted once, when it is opened.
CREATE TABLE IF NOT EXISTS outbox_size (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO outbox_size (id, rows, bytes) SELECT 1, COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox;
CREATE TRIGGER IF NOT EXISTS outbox_size_insert AFTER INSERT ON outbox BEGIN
    UPDATE outbox_size SET rows = rows + 1, bytes = bytes + NEW.bytes;
END;
CREATE TRIGGER IF NOT EXISTS outbox_size_delete AFTER DELETE ON outbox BEGIN
    UPDATE outbox_size SET rows = rows - 1, bytes = bytes - OLD.bytes;
END;
"""


FAULT_POINT_ENV = "EDGE_AGENT_FAULT_POINT"
_FAULT_POINT = os.environ.get(FAULT_POINT_ENV, "")  # test-only; read here and nowhere else
_fault_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Test-only crash hook, OFF by default: with EDGE_AGENT_FAULT_POINT=`name` (or `name:n`) the
    process SIGKILLs itself the first (or n-th) time it passes the point called `name`. Points:
    `command_stored` (stored, before PUBACK), `command_running` (claimed, before the handler),
    `reply_stored` (terminal reply stored, before it is published), `row_published` (an outbox row
    handed to paho, before its PUBACK). See docs/reliability.md."""
    if not _FAULT_POINT:
        return
    target, _, nth = _FAULT_POINT.partition(":")
    if target == name:
        _fault_hits[name] += 1
        if _fault_hits[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


class StoreError(Exception):
    """The store cannot do what was asked; the message says why."""


class StoreFull(StoreError):
    """The disk (or filesystem) holding the store has no room for a write; nothing was written."""


@dataclass(frozen=True)
class OutboxLimits:
    """Soft caps on the outbox. At or above either, new events are dropped (counted) and new
    commands are refused with `busy`; replies of accepted commands are always stored."""

    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredCommand:
    """A row of the command ledger."""

    id: str
    kind: str
    payload: str
    priority: int
    state: str
    received_at: float
    expires_at: float | None
    response_topic: str | None
    correlation_data: bytes | None
    last_reply: bytes | None


COMMAND_COLUMNS = ("id, kind, payload, priority, state, received_at, expires_at, response_topic,"
                   " correlation_data, last_reply")


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation_data: bytes | None


@dataclass(frozen=True)
class ReplyDraft:
    """A reply before the store gives it a seq and a timestamp."""

    status: ReplyStatus
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, status: ReplyStatus, error: ProtocolError) -> ReplyDraft:
        return cls(status=status, error=ErrorInfo(code=error.code, message=error.message))


@dataclass(frozen=True)
class Intake:
    """What `accept` did: stored a new command, or found a duplicate (and re-sent its last reply)."""

    duplicate: bool
    state: str
    command: StoredCommand | None = None  # the new ledger row (None for a duplicate)


def _quarantine_if_corrupt(path: Path) -> Path | None:
    """Run quick_check; move a corrupt file (and its WAL/SHM) aside. Returns the new name or None."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(path)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
        if result == "ok":
            return None
        reason = str(result)
    except sqlite3.OperationalError as exc:  # locked, unreadable: not proof of corruption
        raise StoreError(f"cannot open store {path}: {exc}; is another agent using it?") from exc
    except sqlite3.DatabaseError as exc:
        reason = str(exc)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists():
            side.rename(Path(str(target) + suffix))
    log.error("store %s failed quick_check (%s); moved it to %s and started a fresh one", path, reason, target)
    return target


class Store:
    """The agent's durable state. Thread-safe; every public method is one transaction."""

    def __init__(self, path: Path, topics: DeviceTopics, synchronous: Literal["full", "normal"] = "full",
                 limits: OutboxLimits | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.limits = limits or OutboxLimits()
        self.dropped: Counter[str] = Counter()  # what the caps and a full disk cost, by kind
        self._full_reported = False
        self._write_failing = False
        self.quarantined: Path | None = _quarantine_if_corrupt(path)
        self.path = path
        self.topics = topics
        self.synchronous = synchronous
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()  # held across a `sync()` fsync, so a second caller waits
        self._wal_unsynced = False  # an intake or claim commit skipped its fsync and no sync() since
        conn = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
        self.db = Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self.db.execute("PRAGMA busy_timeout=10000")
        with self.db.atomic():
            for statement in _statements(SCHEMA):
                self.db.execute(statement)
            # A store that replaces a quarantined one cannot know the last seq: start above any
            # plausible earlier value (ms since the epoch) so seq stays strictly increasing.
            first_seq = int(time.time() * 1000) if self.quarantined else 0
            self.db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?), ('reply_seq', ?)",
                [str(SCHEMA_VERSION), str(first_seq)],
            )
        version = int(self._meta("schema_version"))
        if version != SCHEMA_VERSION:
            raise StoreError(f"store {path} has schema version {version}; this agent knows {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # --- commands --------------------------------------------------------------------------------

    def accept(
        self,
        command_id: str,
        kind: str,
        payload: str,
        priority: int,
        expires_at: float | None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        claim: bool = False,
    ) -> Intake:
        """Store a new command with its `accepted` reply, or re-send the last reply of a known id.
        `claim`: also move the new command to `running` with its reply, in the same commit (the
        caller hands it to an idle worker: one commit on the way to the generation, not two)."""
        now = time.time()
        with self._unsynced(), self._write():
            existing = self._get(command_id)
            if existing is not None:
                if existing.last_reply is not None:
                    self._enqueue_reply_bytes(existing.last_reply, existing.response_topic, existing.correlation_data)
                return Intake(duplicate=True, state=existing.state)
            self._refuse_if_full(command_id)
            self.db.execute(
                "INSERT INTO commands (id, kind, payload, priority, state, received_at, expires_at,"
                " response_topic, correlation_data, updated_at) VALUES (?, ?, ?, ?, 'accepted', ?, ?, ?, ?, ?)",
                [command_id, kind, payload, priority, now, expires_at, response_topic, correlation_data, now],
            )
            self._transition(command_id, "accepted", ReplyDraft(status="accepted"))
            state = State.ACCEPTED
            if claim:
                state = State.RUNNING
                self._transition(command_id, state, ReplyDraft(status="running"))
            row = StoredCommand(id=command_id, kind=kind, payload=payload, priority=priority, state=state,
                                received_at=now, expires_at=expires_at, response_topic=response_topic,
                                correlation_data=correlation_data, last_reply=None)
            return Intake(duplicate=False, state=state, command=row)

    def claim(self, command_id: str) -> bool:
        """accepted -> running with its `running` reply, committed without waiting for fsync (see
        the module docstring); False if the command is no longer `accepted` (someone else took it)."""
        with self._unsynced():
            return self.transition(command_id, State.RUNNING, ReplyDraft(status="running"))

    def sync(self) -> None:
        """Make every commit so far durable against power loss: an fsync of the WAL, only if an
        intake or claim commit skipped it since. Cheap when there is nothing to do; any thread."""
        with self._sync_lock:
            with self._lock:
                unsynced, self._wal_unsynced = self._wal_unsynced, False
            if not unsynced:
                return
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def transition(self, command_id: str, new_state: State, draft: ReplyDraft,
                   only_from: Iterable[str] | None = None) -> bool:
        """Move a command to `new_state` and enqueue the reply announcing it, atomically.

        Nothing happens (returns False) unless the current state is in `only_from`, which defaults
        to every state the lifecycle table allows to reach `new_state`; this is also how two
        threads agree on who runs or cancels a command.
        """
        allowed = frozenset(only_from) if only_from is not None else lifecycle.sources(new_state)
        with self._write():
            current = self._get(command_id)
            if current is None:
                raise StoreError(f"no command {command_id!r} in the ledger")
            if current.state not in allowed:
                return False
            self._transition(command_id, new_state, draft)
            return True

    def reject(self, command_id: str | None, draft: ReplyDraft, event: Event,
               response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        """Enqueue a `rejected` reply (always) and its Event (unless the outbox is full: counted)."""
        with self._unsynced(), self._write():
            self._enqueue_reply_bytes(self._reply_bytes(command_id, draft), response_topic, correlation_data)
            self._enqueue_event_capped(event)

    def get(self, command_id: str) -> StoredCommand | None:
        with self._lock:
            return self._get(command_id)

    def known(self, command_id: str) -> bool:
        """Whether the ledger holds this id (a duplicate delivery), without reading its payload."""
        with self._lock:
            return self.db.execute("SELECT 1 FROM commands WHERE id = ?", [command_id]).fetchone() is not None

    def next_runnable(self) -> StoredCommand | None:
        """The accepted command to run next: highest priority first, then arrival order."""
        query = (f"SELECT {COMMAND_COLUMNS} FROM commands WHERE state = 'accepted'"
                 " ORDER BY priority DESC, received_at, rowid LIMIT 1")
        with self._lock:
            rows = list(self.db.query(query))
        return StoredCommand(**rows[0]) if rows else None

    def in_state(self, state: str) -> list[StoredCommand]:
        """Commands in `state`, in arrival order."""
        query = f"SELECT {COMMAND_COLUMNS} FROM commands WHERE state = ? ORDER BY received_at, rowid"
        with self._lock:
            return [StoredCommand(**r) for r in self.db.query(query, [state])]

    def count_in_state(self, state: str) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM commands WHERE state = ?", [state]).fetchone()[0]

    def forget_finished(self, before: float, batch: int = 1000) -> int:
        """Delete finished commands last changed before `before` (epoch seconds), `batch` rows per
        transaction so intake waits little; returns how many. Their replies already sit in the
        outbox on their own. A redelivery of a forgotten id is a new command (answered `expired`
        once its `expires_at` has passed). No fsync: a delete lost to a power cut is redone later."""
        finished = sorted(lifecycle.TERMINAL)
        marks = ", ".join("?" for _ in finished)
        select = f"SELECT id FROM commands WHERE state IN ({marks}) AND updated_at < ? LIMIT ?"
        deleted = 0
        while True:
            with self._unsynced(needs_sync=False), self._write():
                n = self.db.execute(f"DELETE FROM commands WHERE id IN ({select})", [*finished, before, batch]).rowcount
            deleted += n
            if n < batch:
                return deleted

    # --- outbox ----------------------------------------------------------------------------------

    def enqueue_event(self, event: Event) -> bool:
        """Store an Event for publishing; False if the outbox is full (the drop is counted)."""
        with self._write():
            return self._enqueue_event_capped(event)

    def enqueue_status(self, payload: bytes) -> None:
        """Store a retained Status (QoS 1) for publishing: a model reload re-announces the device."""
        with self._write():
            self.db.execute("INSERT INTO outbox (topic, payload, qos, retain, bytes, created_at) "
                            "VALUES (?, ?, 1, 1, ?, ?)", [self.topics.status, payload, len(payload), time.time()])

    # --- policy (set by `config` commands) --------------------------------------------------------

    def load_policy(self) -> dict[str, Any]:
        """The policy fields `config` commands stored, or {} before the first one."""
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'policy'").fetchone()
        return json.loads(row[0]) if row else {}

    def save_policy(self, policy: dict[str, Any]) -> None:
        with self._write():
            self.db.execute("INSERT INTO meta (key, value) VALUES ('policy', ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            [json.dumps(policy, sort_keys=True)])

    def pending(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Outbox rows with id > after_id, oldest first."""
        with self._lock:
            rows = self.db.query(
                "SELECT id, topic, payload, qos, retain, correlation_data FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                [after_id, limit],
            )
            return [OutboxRow(**{**r, "retain": bool(r["retain"])}) for r in rows]

    def delete_outbox(self, ids: Iterable[int]) -> None:
        id_list = list(ids)
        if not id_list:
            return
        with self._unsynced(needs_sync=False), self._write():  # a lost delete only re-publishes acked rows
            self.db.conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in id_list])
            if self._full_reported and not self._outbox_full():
                self._full_reported = False
                self._enqueue(self.topics.event, self._event_bytes(
                    "info", "outbox_recovered", "the outbox is below its caps again", dict(self.dropped)), qos=1)
                self._wal_unsynced = True  # this Event row must reach the disk before the pump publishes it

    def outbox_depth(self) -> tuple[int, int]:
        """(rows, payload bytes) waiting in the outbox."""
        with self._lock:
            return self._outbox_size()

    # --- caps and write failures -----------------------------------------------------------------

    @contextmanager
    def _unsynced(self, needs_sync: bool = True) -> Iterator[None]:
        """Commits inside skip their fsync (only when `synchronous` is full): until `sync()`, or for
        good when they hold nothing that must survive a power cut (`needs_sync=False`)."""
        with self._lock:
            if self.synchronous == "normal":
                yield
                return
            self.db.execute("PRAGMA synchronous=NORMAL")
            try:
                yield
            finally:
                self.db.execute("PRAGMA synchronous=FULL")
                if needs_sync:
                    self._wal_unsynced = True

    @contextmanager
    def _write(self) -> Iterator[None]:
        """Lock + one transaction; a full disk becomes StoreFull (rolled back, counted)."""
        with self._lock:
            try:
                with self.db.atomic():
                    if self._write_failing:
                        self._write_failing = False
                        self._enqueue(self.topics.event, self._event_bytes(
                            "warning", "store_recovered", "the store accepts writes again after the disk was full",
                            {"failed_writes": self.dropped["store_full_writes"]}), qos=1)
                    yield
            except (sqlite3.OperationalError, OSError) as exc:
                if not _disk_full(exc):
                    raise
                self._write_failing = True
                self.dropped["store_full_writes"] += 1
                raise StoreFull(f"the disk holding {self.path} is full ({exc}); nothing was written. Free space "
                                "there: unacknowledged commands are redelivered and writes retried") from exc

    def _outbox_size(self) -> tuple[int, int]:
        rows, size = self.db.execute("SELECT rows, bytes FROM outbox_size").fetchone()
        return int(rows), int(size)

    def _outbox_full(self) -> bool:
        rows, size = self._outbox_size()
        return rows >= self.limits.max_rows or size >= self.limits.max_bytes

    def _refuse_if_full(self, command_id: str) -> None:
        if self._outbox_full():
            self.dropped["commands_refused"] += 1
            raise Busy(f"the device's outbox is full (caps: {self.limits.max_rows} rows, {self.limits.max_bytes} "
                       "bytes) because the link is slow or down; resend the command later", command_id)

    def _enqueue_event_capped(self, event: Event) -> bool:
        """Low-priority rows go first: an Event is dropped (counted) when the outbox is full, and
        the first drop of a full spell stores one `outbox_full` Event despite the cap."""
        if not self._outbox_full():
            self._enqueue(self.topics.event, to_bytes(event), qos=1)
            return True
        self.dropped["events"] += 1
        if not self._full_reported:
            self._full_reported = True
            self._enqueue(self.topics.event, self._event_bytes(
                "error", "outbox_full", "the outbox reached its cap; new events are dropped and new commands "
                "refused with busy until the broker acknowledges the backlog", dict(self.dropped)), qos=1)
        return False

    def _event_bytes(self, level: str, code: str, message: str, data: dict[str, Any]) -> bytes:
        return to_bytes(Event(device_id=self.topics.device_id, ts=format_ts(utc_now()), level=level,  # type: ignore[arg-type]
                              code=code, message=message, data=data))

    # --- internals (caller holds the lock and a transaction) -------------------------------------

    def _meta(self, key: str) -> str:
        return self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()[0]

    def _get(self, command_id: str) -> StoredCommand | None:
        rows = list(self.db.query(f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?", [command_id]))
        return StoredCommand(**rows[0]) if rows else None

    def _next_seq(self) -> int:
        seq = int(self._meta("reply_seq")) + 1
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'reply_seq'", [str(seq)])
        return seq

    def _reply_bytes(self, command_id: str | None, draft: ReplyDraft) -> bytes:
        reply = Reply(
            command_id=command_id,
            device_id=self.topics.device_id,
            status=draft.status,
            seq=self._next_seq(),
            ts=format_ts(utc_now()),
            output=draft.output,
            error=draft.error,
            metrics=draft.metrics,
        )
        return to_bytes(reply)

    def _transition(self, command_id: str, new_state: str, draft: ReplyDraft) -> None:
        payload = self._reply_bytes(command_id, draft)
        self.db.execute(
            "UPDATE commands SET state = ?, last_reply = ?, updated_at = ? WHERE id = ?",
            [new_state, payload, time.time(), command_id],
        )
        current = self._get(command_id)
        assert current is not None
        self._enqueue_reply_bytes(payload, current.response_topic, current.correlation_data)

    def _enqueue_reply_bytes(self, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        self._enqueue(self.topics.reply, payload, qos=1, correlation=correlation)
        if response_topic and response_topic != self.topics.reply:
            self._enqueue(response_topic, payload, qos=1, correlation=correlation)

    def _enqueue(self, topic: str, payload: bytes, qos: int, correlation: bytes | None = None) -> None:
        self.db.execute(
            "INSERT INTO outbox (topic, payload, qos, correlation_data, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [topic, payload, qos, correlation, len(payload), time.time()],
        )


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _statements(script: str) -> list[str]:
    """The script's statements, one by one (a trigger's body holds `;` of its own)."""
    statements, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                statements.append(current.strip())
            current = ""
    return statements
