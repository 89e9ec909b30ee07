"""The registry: one SQLite file (or PostgreSQL database) shared by `cloud-bridge serve` and the
console subcommands, opened once and read and written through one object per concern.

SQLite runs in WAL mode with `busy_timeout` and `synchronous=FULL` (see `backends`); a new file is
built under another name and linked into place, so a console never sees a half-made registry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_bridge.errors import BridgeError, RegistryMissing
from cloud_bridge.store import schema
from cloud_bridge.store.access import Audit, Tokens
from cloud_bridge.store.backends import Backend, PostgresBackend, SqliteBackend, connect_sqlite
from cloud_bridge.store.commands import Commands
from cloud_bridge.store.connection import Connection
from cloud_bridge.store.counters import Counters
from cloud_bridge.store.dead_letters import DeadLetters
from cloud_bridge.store.deliveries import Deliveries
from cloud_bridge.store.devices import Devices
from cloud_bridge.store.events import Alerts, Events
from cloud_bridge.store.feeds import Feeds
from cloud_bridge.store.groups import Groups
from cloud_bridge.store.models import Models
from cloud_bridge.store.observations import Observations
from cloud_bridge.store.replies import Chunks, Replies
from cloud_bridge.store.retention import Retention
from cloud_bridge.store.rollouts import Rollouts
from cloud_bridge.store.stats import Stats

if TYPE_CHECKING:
    from cloud_bridge.config import StoreConfig


def _initialise(path: Path) -> None:
    """Create a registry file with the full schema, atomically (a no-op if another process won)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BridgeError(f"cannot create the folder of the registry {path}: {exc.strerror}") from exc
    staging = path.with_name(f".{path.name}.{os.getpid()}.new")
    staging.unlink(missing_ok=True)
    db = connect_sqlite(staging)
    try:
        db.enable_wal()
        backend = SqliteBackend(db, str(staging))
        with backend.exclusive():
            schema.create(backend)
    finally:
        db.close()
    try:
        os.link(staging, path)
    except FileExistsError:
        pass
    finally:
        staging.unlink(missing_ok=True)


class Registry:
    """The bridge's registry on SQLite or PostgreSQL. Thread-safe: every call takes the connection's lock."""

    def __init__(self, backend: Backend, path: Path | str, url: str | None = None) -> None:
        self.path = path
        self._url = url  # PostgreSQL's, for `sibling`
        self._connection = Connection(backend)
        self.counters = Counters(self._connection)
        self.devices = Devices(self._connection)
        self.groups = Groups(self._connection, self.devices)
        self.commands = Commands(self._connection)
        self.replies = Replies(self._connection, self.devices, self.commands, self.counters)
        self.chunks = Chunks(self._connection, self.devices, self.commands, self.counters)
        self.events = Events(self._connection, self.devices, self.counters)
        self.alerts = Alerts(self._connection)
        self.feeds = Feeds(self._connection)
        self.retention = Retention(self._connection)
        self.dead_letters = DeadLetters(self._connection, self.counters)
        self.observations = Observations(self._connection)
        self.stats = Stats(self._connection)
        self.deliveries = Deliveries(self._connection)
        self.tokens = Tokens(self._connection)
        self.audit = Audit(self._connection)
        self.models = Models(self._connection)
        self.rollouts = Rollouts(self._connection)

    @classmethod
    def connect(cls, url: str) -> Registry:
        """The registry in the PostgreSQL database at `url` (tables created on first use)."""
        backend = PostgresBackend(url)
        try:
            schema.bring_up_to_date(backend, create_if_empty=True)
        except BaseException:
            backend.close()
            raise
        return cls(backend, backend.label, url)

    @classmethod
    def from_config(cls, store: StoreConfig, *, create: bool = True) -> Registry:
        """`[store] url` (PostgreSQL) when set, else the SQLite file `[store] path`."""
        return cls.connect(store.url) if store.url else cls.open(store.path, create=create)

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> Registry:
        """Open the registry at `path`; with `create`, make a new one if there is none.

        Without `create`, a missing file raises RegistryMissing: the console never creates an
        empty registry that no bridge reads.
        """
        if not path.exists():
            if not create:
                raise RegistryMissing(path)
            _initialise(path)
        backend = SqliteBackend(connect_sqlite(path), str(path))
        try:
            schema.bring_up_to_date(backend, create_if_empty=False)
        except BaseException:
            backend.close()
            raise
        return cls(backend, path)

    def sibling(self) -> Registry:
        """The same registry on a connection of its own, for a loop that should not wait for another
        loop's statements and commits (the bridge's ingest and dispatch loops): on PostgreSQL a new
        connection, whose concurrent writes are safe as those of two replicas are; on SQLite this
        registry itself (one writer at a time in any case). Close it when it is not this registry."""
        return self if self._url is None else Registry.connect(self._url)

    @contextmanager
    def transaction(self) -> Iterator[Registry]:
        """Group several writes, of any concern, into one commit (see Connection.transaction)."""
        with self._connection.transaction():
            yield self

    def is_transient(self, error: BaseException) -> bool:
        """Whether a failed write may succeed if retried (connection lost, lock timeout, disk full),
        as opposed to failing again for what was written."""
        return self._connection.backend.is_transient(error)

    def close(self) -> None:
        self._connection.close()
