"""Opening the registry: creating it, sharing the SQLite file, transactions, schema versions and migrations."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from autoglm_wire.protocol import Event, format_ts
from cloud_bridge.errors import BridgeError, RegistryMissing
from cloud_bridge.store import schema
from cloud_bridge.store.backends import Backend, PostgresBackend, SqliteBackend, connect_sqlite
from cloud_bridge.store.registry import Registry

from .factories import T0, at, chunk, command, online, reply


def test_the_console_does_not_create_a_missing_registry(tmp_path):
    with pytest.raises(RegistryMissing, match="is `cloud-bridge serve` running with this config"):
        Registry.open(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()


def test_a_sibling_is_a_connection_of_its_own_on_postgresql_and_the_registry_itself_on_sqlite(registry):
    """The bridge's ingest, dispatch and upkeep loops each take a sibling: on PostgreSQL one loop's
    open transaction must not hold up another's statements."""
    sibling = registry.sibling()
    try:
        if isinstance(registry._connection.backend, SqliteBackend):
            assert sibling is registry
            return
        assert sibling is not registry
        with registry.transaction():
            registry.commands.add(command(), "dev-1", T0)
            assert sibling.commands.active() == [], "the sibling does not see an uncommitted row"
            sibling.commands.add(command("c2"), "dev-1", T0)  # nor waits for the open transaction
        assert [r.id for r in sibling.commands.active()] == ["c1", "c2"]
    finally:
        if sibling is not registry:
            sibling.close()


def test_two_connections_share_the_file(tmp_path):
    serve_side = Registry.open(tmp_path / "r.db")
    console_side = Registry.open(tmp_path / "r.db", create=False)
    try:
        console_side.commands.add(command(), "dev-1", T0)
        assert [r.id for r in serve_side.commands.active()] == ["c1"]
        serve_side.replies.record(reply(1, "succeeded"), at(1))
        assert console_side.commands.get("c1").state == "succeeded"
    finally:
        serve_side.close()
        console_side.close()


def test_a_failed_batch_writes_nothing(registry):
    with pytest.raises(RuntimeError):
        with registry.transaction():
            registry.replies.record(reply(1, "accepted"), at(1))
            raise RuntimeError("disk on fire")
    assert registry.feeds.replies(0) == []


def test_a_new_registry_is_in_wal_mode_and_leaves_no_staging_file(tmp_path):
    Registry.open(tmp_path / "r.db").close()
    conn = sqlite3.connect(tmp_path / "r.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("r.db")) == []


def test_another_programs_database_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE inbox (id TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(BridgeError, match="not a cloud-bridge registry"):
        Registry.open(tmp_path / "other.db")


# Version 1, in the portable words of cloud_bridge/store/schema.py: no policy, priority, batch or
# wire_id yet, and stream chunks unique by (command_id, idx) alone (its tables that later versions change).
V1_SCHEMA = """
CREATE TABLE devices (device_id TEXT PRIMARY KEY, state TEXT, since TEXT, last_seen TEXT, agent_version TEXT,
    model_name TEXT, model_sha256 TEXT, n_gpu_layers INTEGER, groups TEXT, kinds TEXT, last_telemetry TEXT);
CREATE TABLE commands (id TEXT PRIMARY KEY, device_id TEXT NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,
    expires_at TEXT, last_sent_at TEXT, updated_at TEXT NOT NULL, reply TEXT, error TEXT INSERTION_ORDER);
CREATE TABLE stream_chunks (id SERIAL_ID, device_id TEXT NOT NULL, command_id TEXT NOT NULL,
    idx INTEGER NOT NULL, delta TEXT NOT NULL, done BOOL NOT NULL, received_at TEXT NOT NULL, UNIQUE (command_id, idx));
CREATE TABLE events (id SERIAL_ID, device_id TEXT NOT NULL, ts TEXT NOT NULL, level TEXT NOT NULL,
    code TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL, received_at TEXT NOT NULL);
INSERT INTO stream_chunks VALUES (1, 'old-gw', 'c0', 0, 'hi', TRUE, '2026-11-21T10:00:00.000Z');
INSERT INTO events (device_id, ts, level, code, message, data, received_at) VALUES ('old-gw',
    '2026-11-21T10:00:00.000Z', 'info', 'tick', 'old', '{}', '2026-11-21T10:00:00.000Z');
INSERT INTO devices (device_id, state, groups) VALUES ('old-gw', 'online', '["lab"]');
"""


@dataclass(frozen=True)
class EmptyStore:
    """Where a registry may be created: a raw connection to it, and opening it as the registry."""

    backend: Callable[[], Backend]
    open: Callable[[], Registry]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_store(request: pytest.FixtureRequest, tmp_path: Path) -> EmptyStore:
    """A new SQLite file, and a new PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path / "r.db"
        return EmptyStore(lambda: SqliteBackend(connect_sqlite(path), str(path)), partial(Registry.open, path))
    url = request.getfixturevalue("scratch_pg_url")
    return EmptyStore(partial(PostgresBackend, url), partial(Registry.connect, url))


def test_a_version_1_registry_is_upgraded_in_place_and_keeps_its_rows(empty_store):
    backend = empty_store.backend()
    try:
        with backend.exclusive():
            for statement in schema.render(V1_SCHEMA, backend.dialect):
                backend.execute(statement)
            backend.set_schema_version(1)
    finally:
        backend.close()
    registry = empty_store.open()
    try:
        assert registry.devices.get("old-gw").state == "online" and registry.devices.get("old-gw").policy is None
        assert registry.commands.add(command(), "old-gw", T0).priority == 0
        # v8: what it announced is kept as a claim; membership starts empty until imported
        assert (registry.devices.get("old-gw").claimed_groups, registry.devices.get("old-gw").groups) == (["lab"], [])
        assert registry.groups.import_claimed(T0) == ([("old-gw", "lab")], [])
        assert registry.groups.members() == {"lab": ["old-gw"]}
        assert registry.alerts.recent() == [] and registry.feeds.chunks(0)[0].delta == "hi"
        assert registry._connection.backend.schema_version() == schema.SCHEMA_VERSION
        assert registry.chunks.record("new-gw", chunk(0, "again", "c0"), at(1)), "one command id on two devices"
        assert [c.id for c in registry.feeds.chunks(0)] == [1, 2]
        assert registry.chunks.record("new-gw", chunk(2**63 - 1, "last", "c0"), at(1)), "idx holds 64 bits"
        new = Event(device_id="old-gw", ts=format_ts(T0), level="info", code="tick", message="new", data={})
        assert registry.events.record(new, at(2)) and not registry.events.record(new, at(3))
        assert [(e.message, e.dedupe_key is None) for e in registry.feeds.events(0)] == [("old", True), ("new", False)]
        registry.devices.record_status(online("old-gw"), at(4))
        assert registry.devices.get("old-gw").status_ts == format_ts(T0)
        registry.dead_letters.record("autoglm/old-gw/reply", "old-gw", b"\x00\xff", "not JSON", at(5))
        assert registry.dead_letters.recent()[0].payload == b"\x00\xff"
        assert registry.tokens.identify(registry.tokens.add("ops", "operator")).role == "operator", "version 4"
        old = registry.devices.get("old-gw")
        assert (old.previous_model_name, old.previous_model_sha256, old.rollout) == (None, None, None)
        assert registry.models.all() == [] and registry.rollouts.recent() == []
    finally:
        registry.close()


def test_a_registry_newer_than_this_bridge_is_refused(empty_store):
    empty_store.open().close()
    backend = empty_store.backend()
    backend.set_schema_version(schema.SCHEMA_VERSION + 1)
    backend.close()
    with pytest.raises(BridgeError, match="newer than this cloud-bridge understands"):
        empty_store.open()


def test_a_version_7_registry_gets_group_membership_and_keeps_what_devices_announced(empty_store):
    empty_store.open().close()
    backend = empty_store.backend()
    try:
        with backend.exclusive():  # back to version 7: no device_groups, devices.groups holds the announcements
            backend.execute("DROP TABLE device_groups")
            backend.execute("ALTER TABLE devices RENAME COLUMN claimed_groups TO groups")
            backend.execute("INSERT INTO devices (device_id, state, groups, rollout) "
                            "VALUES ('v7-gw', 'online', '[\"lab\", \"site-a\"]', 'r1')")
            backend.set_schema_version(7)
    finally:
        backend.close()
    registry = empty_store.open()
    try:
        device = registry.devices.get("v7-gw")
        assert (device.claimed_groups, device.groups, device.rollout) == (["lab", "site-a"], [], "r1")
        assert device.routable_groups == [], "announcing groups routes nothing until they are assigned"
        assert registry.groups.add("v7-gw", "lab", T0)
        assert registry.groups.members() == {"lab": ["v7-gw"]}
        assert registry._connection.backend.schema_version() == schema.SCHEMA_VERSION == 8
    finally:
        registry.close()
