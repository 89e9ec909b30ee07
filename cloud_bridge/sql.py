"""The two stores the registry runs on, behind one small interface: SQLite (one file, one host) and
PostgreSQL (shared by several bridge replicas). The registry writes one SQL dialect, the common
part of both (`?` placeholders, `ON CONFLICT`, `IS DISTINCT FROM`); what differs lives here.

Each backend holds one connection; the registry's lock serialises its use across threads.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from sqlite_utils import Database

from cloud_bridge.errors import BridgeError


class IntegrityError(BridgeError):
    """A row broke a unique constraint (the caller turns it into its own error)."""


class Backend(Protocol):
    label: str  # where the registry lives, for logs and errors (no password)

    def execute(self, sql: str, params: Any = ()) -> int: ...

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]: ...

    def transaction(self) -> Any: ...

    def json_number(self, column: str, *path: str) -> str: ...

    def close(self) -> None: ...


class SqliteBackend:
    """sqlite-utils over one `sqlite3` connection usable from any thread."""

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

    def transaction(self) -> Any:
        return self.db.atomic()

    def json_number(self, column: str, *path: str) -> str:
        return f"json_extract({column}, '$.{'.'.join(path)}')"

    def close(self) -> None:
        self.db.close()


PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, state TEXT, since TEXT, last_seen TEXT, agent_version TEXT, model_name TEXT,
    model_sha256 TEXT, n_gpu_layers INTEGER, groups TEXT, kinds TEXT, last_telemetry TEXT, policy TEXT
);
CREATE TABLE IF NOT EXISTS device_states (
    id BIGSERIAL PRIMARY KEY, device_id TEXT NOT NULL, state TEXT NOT NULL, ts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, device_id TEXT NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,
    expires_at TEXT, last_sent_at TEXT, updated_at TEXT NOT NULL, reply TEXT, error TEXT,
    priority INTEGER NOT NULL DEFAULT 0, batch TEXT, wire_id TEXT, rowid BIGSERIAL
);
CREATE INDEX IF NOT EXISTS commands_by_wire_id ON commands (wire_id, device_id);
CREATE INDEX IF NOT EXISTS commands_by_state ON commands (state);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device_id, created_at);
CREATE INDEX IF NOT EXISTS commands_by_batch ON commands (batch);
CREATE TABLE IF NOT EXISTS replies (
    id BIGSERIAL PRIMARY KEY, device_id TEXT NOT NULL, seq BIGINT NOT NULL, command_id TEXT, status TEXT NOT NULL,
    payload TEXT NOT NULL, received_at TEXT NOT NULL, UNIQUE (device_id, seq)
);
CREATE INDEX IF NOT EXISTS replies_by_command ON replies (command_id);
CREATE TABLE IF NOT EXISTS stream_chunks (
    id BIGSERIAL PRIMARY KEY, device_id TEXT NOT NULL, command_id TEXT NOT NULL, idx INTEGER NOT NULL,
    delta TEXT NOT NULL, done BOOLEAN NOT NULL, received_at TEXT NOT NULL, UNIQUE (device_id, command_id, idx)
);
CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY, device_id TEXT NOT NULL, ts TEXT NOT NULL, level TEXT NOT NULL, code TEXT NOT NULL,
    message TEXT NOT NULL, data TEXT NOT NULL, received_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    id BIGSERIAL PRIMARY KEY, device_id TEXT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL,
    raised_at TEXT NOT NULL, cleared_at TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_open ON alerts (device_id, kind) WHERE cleared_at IS NULL;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_PLACEHOLDER = re.compile(r"\?")
SCHEMA_LOCK = 0x6175746F676C6D  # pg_advisory_xact_lock key: one replica creates the schema at a time


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresBackend:
    """psycopg 3, autocommit outside `transaction()`, client-side parameter binding, dict rows."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError as exc:
            raise BridgeError("[store] url names PostgreSQL but psycopg is not installed: "
                              "pip install 'psycopg[binary]' (or `pip install autoglm-edge[postgres]`)") from exc
        self._psycopg = psycopg
        self.label = redact(url)
        try:
            self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row,
                                        cursor_factory=psycopg.ClientCursor)
        except psycopg.Error as exc:
            raise BridgeError(f"cannot connect to the registry database {self.label}: {exc}".strip()
                              + "; check [store] url, that PostgreSQL runs and that the database exists") from exc

    @staticmethod
    def _sql(sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))

    def execute(self, sql: str, params: Any = ()) -> int:
        try:
            with self.conn.cursor() as cursor:
                cursor.execute(self._sql(sql), params or None)
                return cursor.rowcount
        except self._psycopg.errors.UniqueViolation as exc:
            raise IntegrityError(str(exc)) from exc

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self.conn.cursor() as cursor:
            cursor.execute(self._sql(sql), params or None)
            return list(cursor.fetchall())

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def json_number(self, column: str, *path: str) -> str:
        return f"(({column})::jsonb #>> '{{{','.join(path)}}}')::float"

    def create_schema(self, version: int) -> None:
        """Create the tables once (replicas starting together wait on an advisory lock)."""
        with self.transaction():
            self.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
            for statement in filter(str.strip, PG_SCHEMA.split(";")):
                self.execute(statement)
            rows = self.query("SELECT value FROM meta WHERE key = 'schema_version'")
            found = int(rows[0]["value"]) if rows else None
            if found is None:
                self.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),))
            elif found > version:
                raise BridgeError(f"the registry {self.label} has schema version {found}, newer than this "
                                  f"cloud-bridge understands ({version}); upgrade cloud-bridge")

    def close(self) -> None:
        self.conn.close()
