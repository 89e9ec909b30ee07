"""The fleet simulator of bench/fleet.py: its devices' protocol logic, and a small fleet against a
real mosquitto and a real bridge (one MQTT connection per device, and devices multiplexed)."""

from __future__ import annotations

import json

import pytest

from autoglm_wire.protocol import Reply, Status, Telemetry
from bench.fleet import Fleet, SimDevice
from cloud_bridge.commands import CommandRequest, queue_command
from cloud_bridge.store.registry import Registry

from .conftest import wait_until


def _command(command_id: str, kind: str) -> bytes:
    return json.dumps({"v": 1, "id": command_id, "kind": kind, "params": {}}).encode()


def test_a_simulated_device_answers_each_command_accepted_running_terminal_with_its_own_seqs():
    device = SimDevice("P", "sim-1")
    replies = [Reply.model_validate_json(p.payload) for p in device.answer(_command("c1", "ping"))
               + device.answer(_command("c2", "onnx"))]
    assert [(r.command_id, r.status, r.seq) for r in replies] == [
        ("c1", "accepted", 1), ("c1", "running", 2), ("c1", "succeeded", 3), ("c2", "rejected", 4)]
    assert replies[2].output == {"pong": True} and replies[3].error.code == "unknown_kind"
    assert device.answer(b"not json") == [] and device.answer(b'{"id": "c3"}') == [] and device.commands == 2


def test_a_simulated_device_announces_itself_retained_with_an_offline_will_and_sends_telemetry():
    device = SimDevice("P", "sim-1", groups=("g1",))
    online, will, telemetry = device.online(), device.will(), device.telemetry()
    assert online.retain and will.retain and not telemetry.retain
    assert online.topic == will.topic == "P/sim-1/status" and telemetry.topic == "P/sim-1/telemetry"
    assert Status.model_validate_json(online.payload).groups == ["g1"]
    assert Status.model_validate_json(will.payload).state == "offline"
    assert Telemetry.model_validate_json(telemetry.payload).device_id == "sim-1"


def _online(registry: Registry) -> set[str]:
    return {d.device_id for d in registry.devices.all() if d.state == "online"}


@pytest.mark.parametrize("connections", [None, 2], ids=["one-connection-per-device", "multiplexed"])
def test_a_small_fleet_registers_answers_every_command_through_the_bridge_and_comes_back_after_a_drop(
        bridge, mosquitto, connections):
    fleet = Fleet(mosquitto.port, bridge.prefix, devices=6, connections=connections, telemetry_s=0.5,
                  drop_for_s=2.0).start()
    registry = Registry.open(bridge.registry_path, create=False)
    try:
        names = {d.device_id for d in fleet.devices}
        wait_until(lambda: _online(registry) == names, timeout_s=20, what="every simulated device online")
        rows = [queue_command(registry, CommandRequest(target=name, kind="ping"))[0] for name in sorted(names)]
        wait_until(lambda: all(registry.commands.get(r.id).state == "succeeded" for r in rows), timeout_s=30,
                   what="every ping answered")
        assert all([r.status for r in registry.replies.of_command(row.id)] == ["accepted", "running", "succeeded"]
                   for row in rows)
        wait_until(lambda: all((registry.devices.get(n).last_telemetry or {}).get("uptime_s") for n in names),
                   what="telemetry from every device")
        gone = set(fleet.drop(0))
        wait_until(lambda: not _online(registry) & gone, timeout_s=20, what="the dropped devices offline (will)")
        wait_until(lambda: _online(registry) == names, timeout_s=20, what="the dropped devices back online")
        assert fleet.errors == [] and fleet.drops == 1
    finally:
        fleet.stop()
        registry.close()
