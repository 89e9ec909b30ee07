"""The device's SQLite file: the connection, the schema, the integrity check at start, the write
lock and transactions, and THE fsync barrier (`SqliteFile.sync`). The inbox (`inbox.py`) and the
outbox (`outbox.py`) keep their tables here, so a state change and the reply announcing it are one
transaction.

One writer connection guarded by a lock (callers: the link's intake, the executor, the pump);
WAL journal; `synchronous` FULL by default so an accepted command and a stored reply survive a
power cut (see docs/architecture.md).

With `synchronous = full`, the commits on the way from a delivered command to its generation skip
their own fsync (`unsynced`), so a generation starts without waiting for the disk: intake's
(`accept`, `reject`) and the claim (accepted -> running). Each is durable against a crash of the
process at once (the WAL write is in the OS) and against power loss at the next `sync()` (one
fsync of the WAL), which comes before anything that depends on it leaves the device: the link
calls it before the PUBACK of a command and before publishing outbox rows, the executor before
the first stream chunk. Deleting acked outbox rows needs no fsync at all (a delete lost to a power
cut re-publishes rows the cloud dedupes). Every other commit (terminal replies, events, policy)
is fsynced itself.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from sqlite_utils import Database

from edge_agent.seq_mark import SeqMark

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
-- Model slots and the activation journal (edge_agent/model_slots.py, issue #14): which GGUF the
-- agent serves is decided here, never inferred from file names. Added to stores of schema 1 as is.
CREATE TABLE IF NOT EXISTS model_slots (
    sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    activated_at REAL NOT NULL,
    active INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS model_journal (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    command_id TEXT NOT NULL,
    action TEXT NOT NULL,
    phase TEXT NOT NULL,
    target TEXT NOT NULL,
    rollout TEXT,
    updated_at REAL NOT NULL
);
"""


class StoreError(Exception):
    """The store cannot do what was asked; the message says why."""


class StoreUnavailable(StoreError):
    """The store cannot write now for a cause outside the agent (an I/O error, the file locked by
    another process, no memory); nothing was written. The one failure intake leaves unacknowledged:
    the broker redelivers the command and a later write may succeed."""


class StoreFull(StoreUnavailable):
    """The disk (or filesystem) holding the store has no room for a write; nothing was written."""


# SQLite's primary result codes of a write that failed for a cause outside the agent's code.
_UNAVAILABLE_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM,
                                sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN})


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


class SqliteFile:
    """The open SQLite file. Thread-safe: `lock` guards the one connection; `write()` is one
    transaction under it."""

    def __init__(self, path: Path, synchronous: Literal["full", "normal"] = "full") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.quarantined: Path | None = _quarantine_if_corrupt(path)
        self.path = path
        self.synchronous = synchronous
        self.failed_writes = 0  # writes refused by a full disk since start
        # Called inside the first transaction that succeeds after writes failed (the outbox stores
        # a `store_recovered` Event in it); set by the outbox.
        self.on_writes_recovered: Callable[[int], None] = lambda failed_writes: None
        self._write_failing = False
        self.lock = threading.RLock()
        self._sync_lock = threading.Lock()  # held across a `sync()` fsync, so a second caller waits
        self._wal_unsynced = False  # an unsynced commit that must reach the disk, and no sync() since
        self.seq_mark = SeqMark(path.with_name(path.name + ".seq"))
        conn = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
        self.db = Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self.db.execute("PRAGMA busy_timeout=10000")
        with self.db.atomic():
            for statement in _statements(SCHEMA):
                self.db.execute(statement)
            self.db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?), ('reply_seq', ?)",
                [str(SCHEMA_VERSION), str(self._first_seq())],
            )
        version = int(self.meta("schema_version") or 0)
        if version != SCHEMA_VERSION:
            raise StoreError(f"store {path} has schema version {version}; this agent knows {SCHEMA_VERSION}")
        self.seq_mark.cover(int(self.meta("reply_seq") or 0) + 1)  # a new store's mark is written at once

    def _first_seq(self) -> int:
        """Where a new store's seq starts: at the mark, above every seq handed out before (a new
        device has none: 0). A quarantined store whose mark was lost too: the clock in ms, the only
        hint left."""
        if self.seq_mark.value is not None:
            return self.seq_mark.value
        if self.quarantined is not None:
            log.error("store %s was quarantined and its seq mark %s is missing: reply seq restarts at the clock "
                      "(ms since 1970)", self.path, self.seq_mark.path)
            return int(time.time() * 1000)
        return 0

    @property
    def write_failing(self) -> bool:
        """The last write was refused (a full disk, an I/O error) and none has succeeded since."""
        return self._write_failing

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def meta(self, key: str) -> str | None:
        """A value of the `meta` table (`schema_version`, `reply_seq`, `policy`), or None."""
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Inside a `write()`: set a value of the `meta` table."""
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, value])

    # --- the fsync barrier -----------------------------------------------------------------------

    def sync(self) -> None:
        """Make every commit so far durable against power loss: an fsync of the WAL, only if an
        unsynced commit that must survive one happened since. Cheap when there is nothing to do;
        any thread. A failed fsync raises and leaves the flag set: the next `sync()` tries again."""
        with self._sync_lock:
            with self.lock:
                unsynced, self._wal_unsynced = self._wal_unsynced, False
            if not unsynced:
                return
            try:
                fd = os.open(f"{self.path}-wal", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException:
                with self.lock:
                    self._wal_unsynced = True  # not durable yet (a commit since then set it anyway)
                raise

    def sync_later(self) -> None:
        """The commit in progress holds a row that must be durable before it is published, though
        it runs inside `unsynced(needs_sync=False)`: the next `sync()` fsyncs it."""
        with self.lock:
            self._wal_unsynced = True

    @contextmanager
    def unsynced(self, needs_sync: bool = True) -> Iterator[None]:
        """Commits inside skip their fsync (only when `synchronous` is full): until `sync()`, or for
        good when they hold nothing that must survive a power cut (`needs_sync=False`)."""
        with self.lock:
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

    # --- transactions ----------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[None]:
        """Lock + one transaction; a full disk becomes StoreFull (rolled back, counted), any other
        failure outside the agent's code (I/O error, locked, ...) StoreUnavailable (rolled back)."""
        with self.lock:
            try:
                with self.db.atomic():
                    if self._write_failing:
                        self._write_failing = False
                        self.on_writes_recovered(self.failed_writes)
                    yield
            except (sqlite3.OperationalError, OSError) as exc:
                if not _disk_full(exc):
                    if _unavailable(exc):
                        raise StoreUnavailable(f"cannot write {self.path} ({exc}); nothing was written") from exc
                    raise
                self._write_failing = True
                self.failed_writes += 1
                raise StoreFull(f"the disk holding {self.path} is full ({exc}); nothing was written. Free space "
                                "there: unacknowledged commands are redelivered and writes retried") from exc


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _unavailable(exc: BaseException) -> bool:
    """An I/O error of the file, or SQLite's code for a cause outside the agent (not a bug in a statement)."""
    if isinstance(exc, sqlite3.OperationalError):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _UNAVAILABLE_CODES
    return isinstance(exc, OSError)


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
