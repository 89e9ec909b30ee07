"""Scale-out: two `cloud-bridge serve` replicas on one PostgreSQL and one mosquitto share the fleet's
traffic through an MQTT shared subscription; every reply is recorded exactly once and either
replica's API sees all of it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_bridge.store.registry import Registry

from .conftest import HttpBridge, empty_pg_registry, start_http_bridge, wait_until
from .fake_device import FakeDevice

pytestmark = pytest.mark.integration

DEVICES = 10
REPLIES_PER_DEVICE = 100
DUPLICATES_PER_DEVICE = 10


def _stored(log_path: Path) -> int:
    """How many messages this replica stored, from its `stopped (...)` log line."""
    found = re.search(r"stopped \(.*?stored=(\d+)", log_path.read_text())
    return int(found.group(1)) if found else 0


@pytest.fixture
def replicas(mosquitto, pg_url, tmp_path) -> Iterator[tuple[str, list[HttpBridge]]]:
    """Two bridges in one shared-subscription group on one (emptied) PostgreSQL: (prefix, bridges)."""
    empty_pg_registry(pg_url).close()
    prefix = "s" + os.urandom(3).hex()
    bridges = [start_http_bridge(tmp_path / name, mosquitto.port, prefix, name=f"-{name}", store_url=pg_url,
                                 shared_group="bridges") for name in ("r1", "r2")]
    try:
        yield prefix, bridges
    finally:
        for bridge in bridges:
            bridge.stop()


def test_two_replicas_record_each_of_1000_replies_from_10_devices_exactly_once(mosquitto, pg_url, replicas):
    prefix, replicas = replicas
    devices = [FakeDevice(mosquitto.port, prefix, f"gw-{i:02d}").start() for i in range(DEVICES)]
    registry = Registry.connect(pg_url)
    try:
        for device in devices:
            for seq in range(1, REPLIES_PER_DEVICE + 1):
                device.reply(f"job-{seq}", "succeeded", output={"n": seq}, seq=seq)
            for seq in range(1, DUPLICATES_PER_DEVICE + 1):  # a redelivery after a reconnect, say
                device.reply(f"job-{seq}", "succeeded", output={"n": seq}, seq=seq)
        total = DEVICES * REPLIES_PER_DEVICE
        wait_until(lambda: registry.counters.all().get("duplicate_replies", 0) >= DEVICES * DUPLICATES_PER_DEVICE
                   and len(registry.replies.recent(limit=total + 1)) >= total, 60, "every reply in PostgreSQL")
        rows = registry.replies.recent(limit=total + 100)
        assert len(rows) == total
        assert len({(r.device_id, r.seq) for r in rows}) == total
        for replica in replicas:
            api = replica.api
            seen = api.get("/api/replies", params={"limit": 1000}).json()
            assert {(r["device_id"], r["seq"]) for r in seen} == {(r.device_id, r.seq) for r in rows}
            assert {d["device_id"] for d in api.get("/api/devices").json()} == {d.device_id for d in devices}
    finally:
        registry.close()
        for device in devices:
            device.stop()
        for replica in replicas:
            assert replica.stop() == 0
    shares = [_stored(replica.log_path) for replica in replicas]
    assert all(share > 0 for share in shares), f"both replicas should have stored part of the traffic: {shares}"


def test_commands_queued_on_one_replica_are_sent_once_per_attempt_and_seen_finished_on_the_other(mosquitto,
                                                                                                  replicas):
    prefix, (first, second) = replicas
    devices = [FakeDevice(mosquitto.port, prefix, f"gw-{i:02d}").start() for i in range(DEVICES)]
    try:
        wait_until(lambda: len(second.api.get("/api/devices").json()) == DEVICES, 30, "every device registered")
        ids = [first.api.post("/api/commands", json={"target": d.device_id, "kind": "ping"}).json()["commands"][0]["id"]
               for d in devices for _ in range(5)]
        wait_until(lambda: all(c["state"] == "succeeded" for c in second.api.get(
            "/api/commands", params={"limit": 1000}).json()), 60, "every command succeeded")
        commands = {c["id"]: c for c in second.api.get("/api/commands", params={"limit": 1000}).json()}
        assert sorted(commands) == sorted(ids)
        received = [c["id"] for d in devices for c in d.received]
        for command_id, command in commands.items():  # neither replica published an attempt the other also sent
            assert received.count(command_id) == command["attempts"]
    finally:
        for device in devices:
            device.stop()
