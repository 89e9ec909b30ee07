"""Poison messages (issue #13): every message is stored or dead-lettered, a failing batch is split so
its good messages are stored, only transient registry failures are retried; dead letters are
counted, listed (CLI, API), raise a fleet alert and are pruned."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from autoglm_wire.protocol import Event, format_ts, to_bytes
from cloud_bridge import service
from cloud_bridge.alerts import FLEET, check_fleet
from cloud_bridge.cli import main
from cloud_bridge.config import AlertConfig, BridgeConfig
from cloud_bridge.http.app import create_app
from cloud_bridge.ingest import Inbound, Ingestor, Outcome, RegistryUnavailable
from cloud_bridge.link import Delivery
from cloud_bridge.service import BridgeService
from cloud_bridge.store.registry import Registry

from .factories import T0, at, command, reply

P = "autoglm"
TOKEN = "test-token-0123456789abcdef"


def _reply(seq: int, command_id: str = "c1") -> Inbound:
    return Inbound(f"{P}/dev-1/reply", to_bytes(reply(seq, "accepted", command_id)))


def _event(message: str) -> Inbound:
    event = Event(device_id="dev-1", ts=format_ts(T0), level="info", code="tick", message=message)
    return Inbound(f"{P}/dev-1/event", to_bytes(event))


@pytest.fixture
def ingestor(registry):
    return Ingestor(registry, P)


def test_a_reply_with_seq_2_63_is_dead_lettered_and_its_batch_stored(ingestor, registry):
    poison = b'{"v": 1, "command_id": "c1", "device_id": "dev-1", "status": "accepted", "seq": 9223372036854775808, ' \
             b'"ts": "2026-11-21T10:00:00.000Z"}'
    registry.commands.add(command(), "dev-1", T0)
    outcomes = ingestor.handle_batch([_reply(1), Inbound(f"{P}/dev-1/reply", poison), _reply(2)], at(1))
    assert outcomes == [Outcome.STORED, Outcome.DEAD_LETTERED, Outcome.STORED]
    assert [r.seq for r in registry.replies.recent()] == [2, 1]
    (letter,) = registry.dead_letters.recent()
    assert letter.payload == poison and "seq" in letter.error and registry.counters.all()["dead_letters"] == 1


def test_a_message_that_fails_to_store_is_dead_lettered_alone_and_the_rest_of_its_batch_stored(ingestor, registry,
                                                                                             monkeypatch):
    record_many = registry.events.record_many

    def buggy(events: list[Event], now=None) -> list[bool]:
        """Like one bad row in a multi-row statement: the whole statement fails."""
        if any(event.message == "boom" for event in events):
            raise RuntimeError("a bug in storing this event")
        return record_many(events, now)

    monkeypatch.setattr(registry.events, "record_many", buggy)
    batch = [_event(f"e{i}") for i in range(3)] + [_event("boom")] + [_event(f"e{i}") for i in range(3, 7)]
    outcomes = ingestor.handle_batch(batch, at(1))
    assert outcomes == [Outcome.STORED] * 3 + [Outcome.DEAD_LETTERED] + [Outcome.STORED] * 4
    assert sorted(e.message for e in registry.feeds.events(0)) == [f"e{i}" for i in range(7)]
    (letter,) = registry.dead_letters.recent()
    assert letter.error == "could not be stored: RuntimeError: a bug in storing this event"
    assert letter.payload == batch[3].payload and letter.device_id == "dev-1"


def test_a_value_the_database_refuses_is_dead_lettered_on_postgresql_and_stored_on_sqlite(ingestor, registry):
    """PostgreSQL cannot index a command id of thousands of random characters (a btree row is at
    most 2704 bytes): a non-transient database error, so the message is dead-lettered."""
    huge = os.urandom(4000).hex()
    outcomes = ingestor.handle_batch([_reply(1), _reply(2, huge), _reply(3)], at(1))
    postgres = registry._connection.backend.dialect == "postgresql"
    assert outcomes == [Outcome.STORED, Outcome.DEAD_LETTERED if postgres else Outcome.STORED, Outcome.STORED]
    assert len(registry.replies.recent()) == (2 if postgres else 3)
    if postgres:
        assert "index row" in registry.dead_letters.recent()[0].error


def test_a_locked_sqlite_registry_is_transient_nothing_is_dead_lettered(tmp_path):
    registry = Registry.open(tmp_path / "r.db")
    registry._connection.backend.db.execute("PRAGMA busy_timeout = 0")
    holder = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(RegistryUnavailable, match="database is locked"):
            Ingestor(registry, P).handle_batch([_reply(1)], at(1))
        holder.execute("ROLLBACK")
        assert registry.dead_letters.count() == 0 and registry.replies.count() == 0
    finally:
        holder.close()
        registry.close()


def test_a_lost_postgresql_connection_is_transient_and_the_retry_reconnects(pg_url):
    """Nothing is dead-lettered, and the retry of the batch stores it on a new connection: a
    database restart or failover costs no bridge restart."""
    from .conftest import empty_pg_registry

    registry = empty_pg_registry(pg_url)
    pid = registry._connection.query("SELECT pg_backend_pid() AS pid")[0]["pid"]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    try:
        with pytest.raises(RegistryUnavailable):
            Ingestor(registry, P).handle_batch([_reply(1)], at(1))
        assert registry.dead_letters.count() == 0 and registry.replies.count() == 0
        assert Ingestor(registry, P).handle_batch([_reply(1)], at(2)) == [Outcome.STORED]
        assert registry._connection.query("SELECT pg_backend_pid() AS pid")[0]["pid"] != pid
        assert registry.replies.count() == 1
    finally:
        registry.close()


class FlakyIngestor:
    """Unavailable `failures` times, then stores everything."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def handle_batch(self, messages: list[Inbound], now) -> list[Outcome]:
        self.calls += 1
        if self.calls <= self.failures:
            raise RegistryUnavailable("the registry is unavailable: disk full")
        return [Outcome.STORED] * len(messages)


@pytest.mark.parametrize(("failures", "stored"), [(3, True), (service.STORE_ATTEMPTS, False)])
def test_a_transient_failure_is_retried_with_backoff_and_then_stops_the_bridge(tmp_path, monkeypatch, failures,
                                                                               stored):
    monkeypatch.setattr(service, "STORE_RETRY_S", (0.001, 2.0, 0.01))
    registry = Registry.open(tmp_path / "r.db")
    bridge = BridgeService(BridgeConfig(), registry)
    flaky = FlakyIngestor(failures)
    bridge._ingestor = flaky
    try:
        bridge._store_until_done([Delivery(_reply(1), mid=1, qos=1, generation=0)])
        assert bridge.stats.received == ({"stored": 1} if stored else {})
        assert flaky.calls == min(failures + 1, service.STORE_ATTEMPTS)
        assert (bridge._failure is None) is stored
        if not stored:
            assert "failed 10 times in a row" in bridge._failure and bridge._stop.is_set()
    finally:
        registry.close()


def test_dead_letters_raise_one_fleet_alert_that_clears_when_the_window_passes(registry):
    config = AlertConfig(dead_letter_window_s=600)
    registry.dead_letters.record(f"{P}/dev-1/reply", "dev-1", b"x", "not JSON", at(0))
    registry.dead_letters.record(f"{P}/dev-1/reply", "dev-1", b"y", "not JSON", at(1))
    registry.dead_letters.record(f"{P}/group/reply", None, b"z", "not a device -> cloud topic", at(2))
    assert check_fleet(registry, config, at(10)) == [(FLEET, "dead_letters", True)]
    (alert,) = registry.alerts.recent()
    assert alert.message.startswith("3 message(s) dead-lettered in the last 10 min (dev-1: 2, (no device): 1)")
    assert check_fleet(registry, config, at(300)) == []
    assert check_fleet(registry, config, at(700)) == [(FLEET, "dead_letters", False)]


def test_retention_prunes_dead_letters_after_dead_letter_days(registry):
    registry.dead_letters.record(f"{P}/dev-1/reply", "dev-1", b"old", "e", at(0))
    registry.dead_letters.record(f"{P}/dev-1/reply", "dev-1", b"new", "e", at(100))
    deleted = registry.retention.prune(before=None, chunks_before=None, dead_letters_before=at(50))
    assert deleted == {"dead_letters": 1}
    assert [d.payload for d in registry.dead_letters.recent()] == [b"new"]


def test_dead_letters_are_listed_by_the_api_with_the_exact_payload(registry):
    payload = b"\x00\xff{\x1b[31mred"
    registry.dead_letters.record(f"{P}/dev-1/event", "dev-1", payload, "payload is not UTF-8", at(1))
    registry.dead_letters.record(f"{P}/dev-2/event", "dev-2", b"{}", "not a valid Event", at(2))
    with TestClient(create_app(registry, BridgeConfig(), TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        (letter,) = api.get("/api/dead-letters", params={"device": "dev-1"}).json()
        assert len(api.get("/api/dead-letters").json()) == 2
    assert base64.b64decode(letter["payload_base64"]) == payload and letter["size"] == len(payload)
    assert letter["preview"] == "\\x00\\xff{\\x1b[31mred", "control characters never reach a terminal"


def test_the_cli_lists_dead_letters(tmp_path: Path, capsys):
    config = tmp_path / "bridge.toml"
    config.write_text('[store]\npath = "registry.db"\n')
    registry = Registry.open(tmp_path / "registry.db")
    assert main(["dead-letters", "--config", str(config)]) == 0
    assert "no dead letters: every message was stored" in capsys.readouterr().out
    registry.dead_letters.record(f"{P}/dev-1/reply", "dev-1", b"{not json", "payload is not JSON", at(1))
    registry.close()
    assert main(["dead-letters", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    assert f"{P}/dev-1/reply" in table and "payload is not JSON" in table and "{not json" in table
    assert main(["dead-letters", "--config", str(config), "--json", "--device", "dev-2"]) == 0
    assert json.loads(capsys.readouterr().out) == []
