"""A running bridge on PostgreSQL loses every database connection (a server restart or failover):
it reconnects in place, stores what arrives next and keeps dispatching, without a restart."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

from autoglm_wire.protocol import Event, format_ts, to_bytes, utc_now
from autoglm_wire.topics import DeviceTopics
from cloud_bridge.store.registry import Registry

from .conftest import BridgeProcess, launch_bridge, stop_process, wait_until, write_bridge_config
from .fake_device import FakeDevice
from .test_poison_fuzz import Publisher


def test_the_bridge_reconnects_to_the_database_in_place(mosquitto, tmp_path: Path, scratch_pg_url: str) -> None:
    folder = tmp_path / "bridge"
    prefix = "rc" + os.urandom(3).hex()
    config = write_bridge_config(folder, mosquitto.port, prefix)
    config.write_text(config.read_text().replace('path = "registry.db"', f'url = "{scratch_pg_url}"'))
    log_path = folder / "bridge.log"
    bridge = BridgeProcess(config, folder / "registry.db", prefix, launch_bridge(config, log_path), log_path)
    registry = Registry.connect(scratch_pg_url)
    publisher = Publisher(mosquitto.port)
    device = FakeDevice(mosquitto.port, prefix, "rc-dev").start()

    def stored(n: int) -> None:
        event = Event(device_id="rc-dev", ts=format_ts(utc_now()), level="info", code="marker", message=f"m{n}")
        publisher.publish(DeviceTopics(prefix, "rc-dev").event, to_bytes(event))
        wait_until(lambda: any(e.message == f"m{n}" for e in registry.events.recent("rc-dev", 5)), 60,
                   f"event m{n} stored")

    try:
        stored(1)
        ours = registry._connection.query("SELECT pg_backend_pid() AS pid")[0]["pid"]
        with psycopg.connect(scratch_pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(*) AS n FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid NOT IN (pg_backend_pid(), %s)) AS t", (ours,)).fetchone()
        assert killed is not None and killed[0] == 4, "the bridge's four connections: ingest, dispatch, upkeep, API"
        stored(2)
        ping = bridge.cli("send", "rc-dev", "ping", "--timeout", "30")
        assert ping.returncode == 0, f"{ping.stdout}\n{ping.stderr}\n{bridge.log()[-3000:]}"
        assert bridge.process.poll() is None, "the bridge did not restart to get there"
        assert "was lost; reconnecting" in bridge.log()
    finally:
        device.stop()
        publisher.close()
        registry.close()
        code = stop_process(bridge.process)
    assert code == 0, bridge.log()[-3000:]
