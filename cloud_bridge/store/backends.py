"""The two databases the registry runs on, behind one small interface: SQLite (one file, one host)
and PostgreSQL (shared by several bridge replicas). The registry writes one SQL dialect, the common
part of both (`?` placeholders, `ON CONFLICT`, `IS DISTINCT FROM`); what differs lives here: how to
connect, where the schema version is kept, how the schema is locked while it changes, how to lock
rows for the rest of a transaction, how to read a number out of a JSON column, and which errors are
transient (worth retrying) rather than caused by what was written.

Each backend holds one connection; `store.connection.Connection` serialises its use across threads.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from sqlite_utils import Database

from cloud_bridge.errors import BridgeError

Dialect = Literal["sqlite", "postgresql"]

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
# SQLite primary result codes of a failure that may pass: busy, locked, out of memory, I/O error, disk
# full, cannot open the file, lock protocol error.
SQLITE_TRANSIENT = frozenset({5, 6, 7, 10, 13, 14, 15})
# PostgreSQL SQLSTATE classes (first two characters) and codes of a failure that may pass: connection
# exception, transaction rollback (deadlock, serialization), insufficient resources (disk full, out of
# memory, too many connections), operator intervention (shutdown, cancel), system I/O error, lock
# not available (lock_timeout).
POSTGRES_TRANSIENT = frozenset({"08", "40", "53", "57", "58", "55P03"})
SCHEMA_LOCK = 0x6175746F676C6D  # pg_advisory_xact_lock key: one replica changes the schema at a time


class IntegrityError(BridgeError):
    """A row broke a unique constraint (the caller turns it into its own error)."""


class Backend(Protocol):
    dialect: Dialect
    label: str  # where the registry lives, for logs and errors (no password)

    def execute(self, sql: str, params: Any = ()) -> int: ...

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]: ...

    def transaction(self) -> AbstractContextManager[Any]: ...

    def exclusive(self) -> AbstractContextManager[None]: ...

    def schema_version(self) -> int: ...

    def set_schema_version(self, version: int) -> None: ...

    def json_number(self, column: str, *path: str) -> str: ...

    def epoch_seconds(self, column: str) -> str: ...

    def lock(self, select: str, params: Any = ()) -> None: ...

    def rowset(self, types: Sequence[str], rows: Sequence[Sequence[object]]) -> tuple[str, list[object]]: ...

    def is_transient(self, error: BaseException) -> bool: ...

    def close(self) -> None: ...


def connect_sqlite(path: Path) -> Database:
    """One connection, usable from any thread (the Connection's lock serialises it).

    `busy_timeout` and `synchronous=FULL`: a message is acknowledged to the broker only after its
    row is committed, so a commit must survive power loss (the ingest loop groups a batch of
    messages into one commit to keep that cheap).
    """
    try:
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        db = Database(conn, execute_plugins=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        raise BridgeError(f"cannot open the registry {path}: {exc}; check that its folder exists and is writable"
                          ) from exc
    return db


class SqliteBackend:
    """sqlite-utils over one `sqlite3` connection; the schema version is `PRAGMA user_version`."""

    dialect: Dialect = "sqlite"

    def __init__(self, db: Database, label: str) -> None:
        self.db = db
        self.label = label

    def execute(self, sql: str, params: Any = ()) -> int:
        try:
            return self.db.execute(sql, params).rowcount
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def transaction(self) -> AbstractContextManager[Database]:
        return self.db.atomic()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """A transaction holding SQLite's write lock from its start (a racing peer waits)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def set_schema_version(self, version: int) -> None:
        self.db.execute(f"PRAGMA user_version = {int(version)}")

    def json_number(self, column: str, *path: str) -> str:
        """The number at `path` in a JSON text column; NULL when it is absent or not a number."""
        where = f"'$.{'.'.join(path)}'"
        value = f"json_extract({column}, {where})"
        return f"(CASE WHEN json_type({column}, {where}) IN ('integer', 'real') THEN {value} END)"

    def epoch_seconds(self, column: str) -> str:
        """Whole seconds since 1970 of a stored timestamp column (ISO 8601, UTC, `Z`)."""
        return f"CAST(strftime('%s', {column}) AS INTEGER)"

    def lock(self, select: str, params: Any = ()) -> None:
        """Nothing to do: a writing SQLite transaction holds the whole database."""

    def rowset(self, types: Sequence[str], rows: Sequence[Sequence[object]]) -> tuple[str, list[object]]:
        """`VALUES (?, ?), ...` and the rows' values in order (SQLite binds them in C, and caches the plan
        of each distinct statement)."""
        row = "(" + ", ".join(["?"] * len(types)) + ")"
        return "VALUES " + ", ".join(row for _ in rows), [value for values in rows for value in values]

    def is_transient(self, error: BaseException) -> bool:
        """Busy/locked, I/O error, disk full and the like; not a value SQLite cannot take."""
        if isinstance(error, sqlite3.Error):
            return getattr(error, "sqlite_errorcode", 0) & 0xFF in SQLITE_TRANSIENT
        return isinstance(error, OSError)

    def close(self) -> None:
        self.db.close()


_PLACEHOLDER = re.compile(r"\?")


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresBackend:
    """psycopg 3, autocommit outside `transaction()`, client-side parameter binding, dict rows.

    The schema version is the `schema_version` row of the `meta` table.
    """

    dialect: Dialect = "postgresql"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError as exc:
            raise BridgeError("[store] url names PostgreSQL but psycopg is not installed: "
                              "pip install 'psycopg[binary]' (or `pip install autoglm-edge[postgres]`)") from exc
        self._psycopg = psycopg
        self._dict_row = dict_row
        self._url = url
        self.label = redact(url)
        self._in_transaction = False
        self._closed = False
        try:
            self.conn = self._connect()
        except psycopg.Error as exc:
            raise BridgeError(f"cannot connect to the registry database {self.label}: {exc}".strip()
                              + "; check [store] url, that PostgreSQL runs and that the database exists") from exc

    def _connect(self) -> Any:
        return self._psycopg.connect(self._url, autocommit=True, row_factory=self._dict_row,
                                     cursor_factory=self._psycopg.ClientCursor)

    def _live(self) -> Any:
        """The connection; a new one, between transactions, when the last one was lost (the server
        restarted or failed over). The statement that met the loss failed as transient; the caller's
        retry (ingest's backoff, the dispatch loop's next pass) then runs on the new connection, and
        the bridge carries on without a restart. While the server is unreachable, connecting fails
        as transient too."""
        if self.conn.broken and not self._in_transaction and not self._closed:
            log.warning("the connection to the registry database %s was lost; reconnecting", self.label)
            self.conn = self._connect()
        return self.conn

    @staticmethod
    def _sql(sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))

    def execute(self, sql: str, params: Any = ()) -> int:
        try:
            with self._live().cursor() as cursor:
                cursor.execute(self._sql(sql), params or None)
                return cursor.rowcount
        except self._psycopg.errors.UniqueViolation as exc:
            raise IntegrityError(str(exc)) from exc

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self._live().cursor() as cursor:
            cursor.execute(self._sql(sql), params or None)
            return list(cursor.fetchall())

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._live().transaction():
            self._in_transaction = True
            try:
                yield
            finally:
                self._in_transaction = False

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """A transaction holding the schema's advisory lock (replicas starting together wait)."""
        with self.transaction():
            self.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
            yield

    def schema_version(self) -> int:
        if not self.query("SELECT to_regclass('meta') IS NOT NULL AS present")[0]["present"]:
            return 0
        rows = self.query("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(rows[0]["value"]) if rows else 0

    def set_schema_version(self, version: int) -> None:
        self.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(version),))

    def json_number(self, column: str, *path: str) -> str:
        """The number at `path` in a JSON text column; NULL when it is absent, not a number or past a float."""
        where = f"'{{{','.join(path)}}}'"
        text = f"(({column})::jsonb #>> {where})"
        return (f"(CASE WHEN jsonb_typeof(({column})::jsonb #> {where}) = 'number' AND abs({text}::numeric) < 1e300 "
                f"THEN {text}::float END)")

    def epoch_seconds(self, column: str) -> str:
        """Whole seconds since 1970 of a stored timestamp column (ISO 8601, UTC, `Z`)."""
        return f"CAST(FLOOR(EXTRACT(EPOCH FROM CAST({column} AS timestamptz))) AS BIGINT)"

    def lock(self, select: str, params: Any = ()) -> None:
        """Lock the rows `select` returns until the transaction ends, in the order it returns them."""
        self.query(f"{select} FOR UPDATE", params)

    def rowset(self, types: Sequence[str], rows: Sequence[Sequence[object]]) -> tuple[str, list[object]]:
        """The rows as one JSON parameter taken apart by the server, in order: one short statement that
        psycopg caches, and a parameter the C JSON encoder builds. Measured against a multi-row
        `VALUES` (psycopg re-parses a long statement on every call), `unnest` of arrays (arrays are
        dumped in Python) and `executemany` in pipeline mode (a round of Python per row):
        docs/performance.md, "Bulk ingest on PostgreSQL"."""
        columns = ", ".join(f"(e->>{i})::{kind}" for i, kind in enumerate(types))
        return f"SELECT {columns} FROM json_array_elements(?::json) AS e", [json.dumps(rows)]

    def is_transient(self, error: BaseException) -> bool:
        """A lost connection, a deadlock, a lock timeout, a full disk; not a value PostgreSQL refuses."""
        psycopg = self._psycopg
        if isinstance(error, psycopg.Error):
            state = error.sqlstate
            if state is None:  # raised by the driver itself: the connection is gone or unusable
                return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
            return state[:2] in POSTGRES_TRANSIENT or state in POSTGRES_TRANSIENT
        return isinstance(error, OSError)

    def close(self) -> None:
        self._closed = True
        self.conn.close()
