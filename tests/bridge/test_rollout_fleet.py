"""Rollouts end to end on a real mosquitto: `cloud-bridge serve` (with its HTTP server) and devices
simulated by MQTT clients speaking the `model` contract (fake_device.model_agent), which download the
artifact from the bridge over real HTTP with Range requests and the token of their deploy command."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import VENV_BIN, Broker, HttpBridge, empty_pg_registry, start_http_bridge, wait_until
from .factories import write_gguf
from .fake_device import FakeDevice, model_agent

DEVICES = [f"gw-{i:02d}" for i in range(10)]


@pytest.fixture
def prefix() -> str:
    return "t" + os.urandom(3).hex()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list]:
    """What a test starts (bridges, devices), stopped at the end whatever happens."""
    things: list = []
    yield things
    for thing in reversed(things):
        thing.stop()


def cli(bridge: HttpBridge, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "cloud-bridge"), *args, "--config", str(bridge.config_path)],
                          capture_output=True, text=True, timeout=60)


def add_model(bridge: HttpBridge, tmp_path: Path) -> dict:
    done = cli(bridge, "model", "add", str(write_gguf(tmp_path / "glm-new.gguf", seed=11)), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def device(broker: Broker, prefix: str, device_id: str, outcome: str, started: list) -> FakeDevice:
    fake = FakeDevice(broker.port, prefix, device_id, model_agent(outcome))
    fake.groups = ["lab"]
    started.append(fake.start())
    return fake


def assign_lab(bridge: HttpBridge, ids: list[str]) -> None:
    """Make the devices members of group lab: they announce it, the registry must assign it too."""
    for device_id in ids:
        answer = bridge.api.put(f"/api/groups/lab/members/{device_id}")
        assert answer.status_code == 200, answer.text


def known_online(bridge: HttpBridge, ids: list[str]) -> bool:
    devices = {d["device_id"]: d for d in bridge.api.get("/api/devices").json()}
    return all(devices.get(i, {}).get("state") == "online" for i in ids)


def rollout(bridge: HttpBridge, rollout_id: str) -> dict:
    return bridge.api.get(f"/api/rollouts/{rollout_id}").json()


def test_ten_devices_in_three_waves_one_canary_failure_halts_and_rolls_back_its_wave(
        mosquitto: Broker, tmp_path: Path, prefix: str, started: list):
    bridge = start_http_bridge(tmp_path / "bridge", mosquitto.port, prefix)
    started.append(bridge)
    fakes = {d: device(mosquitto, prefix, d, "canary_fail" if d == "gw-03" else "activate", started)
             for d in DEVICES}
    wait_until(lambda: known_online(bridge, DEVICES), 15, "the bridge to see 10 devices online")
    assign_lab(bridge, DEVICES)
    model = add_model(bridge, tmp_path)
    created = bridge.api.post("/api/rollouts", json={"model": "glm-new", "target": "group/lab",
                                                     "waves": [10, 50, 100], "max_failures": 0, "id": "r10"})
    assert created.status_code == 201, created.text

    wait_until(lambda: rollout(bridge, "r10")["state"] == "halted", 30, "the rollout to halt")
    wait_until(lambda: all(d["rollback"] in (None, "done") for d in rollout(bridge, "r10")["devices"]), 30,
               "the halted wave's rollbacks to finish")
    view = rollout(bridge, "r10")
    states = {d["device_id"]: (d["wave"], d["state"], d["rollback"]) for d in view["devices"]}
    assert states["gw-00"] == (0, "activated", None)
    assert states["gw-03"] == (1, "rolled_back", None)
    assert all(states[d] == (1, "activated", "done") for d in ("gw-01", "gw-02", "gw-04"))
    assert all(states[d] == (2, "skipped", None) for d in DEVICES[5:])
    assert "more than max_failures 0" in view["reason"] and view["failures"] == 1
    by_id = {d["device_id"]: d for d in view["devices"]}
    assert by_id["gw-03"]["canary"]["passed"] is False and by_id["gw-00"]["canary"]["passed"] is True

    assert all(not fakes[d].received for d in DEVICES[5:])  # the halted rollout sent nothing to wave 3
    actions = {(c["id"], c["params"]["action"]) for c in fakes["gw-01"].received}  # a resend keeps its id
    assert actions == {("r10.gw-01", "deploy"), ("r10.rollback.gw-01", "rollback")}
    assert fakes["gw-00"].downloads == [206, 206]  # two Range requests: the second resumes the first
    assert fakes["gw-00"].active == {"name": "glm-new", "sha256": model["sha256"]}

    def registry_follows() -> bool:
        devices = {d["device_id"]: d for d in bridge.api.get("/api/devices").json()}
        return (devices["gw-00"]["model_name"] == "glm-new" and devices["gw-00"]["previous_model_name"] == "fake-glm"
                and devices["gw-00"]["rollout"] == "r10" and devices["gw-01"]["model_name"] == "fake-glm"
                and devices["gw-01"]["previous_model_sha256"] == model["sha256"])

    wait_until(registry_follows, 10, "the registry to show each device's active and previous model")
    running = bridge.api.get("/api/devices", params={"model": model["sha256"][:12]}).json()
    assert [d["device_id"] for d in running] == ["gw-00"]
    listed = cli(bridge, "devices", "--model", "glm-new")
    assert listed.returncode == 0 and "gw-00" in listed.stdout and "gw-01" not in listed.stdout
    status = cli(bridge, "rollout", "status", "r10")
    assert status.returncode == 0 and "state halted" in status.stdout and "rolled_back" in status.stdout
    page = bridge.api.get("/rollouts")
    assert page.status_code == 200 and "/api/rollouts" in page.text


def test_an_offline_device_gets_its_deploy_when_it_returns_and_one_that_never_does_times_out(
        mosquitto: Broker, tmp_path: Path, prefix: str, started: list):
    timeouts = "\n[rollouts]\ndevice_timeout_s = 6\nfinish_timeout_s = 2\ncheck_interval_s = 0.2\n"
    bridge = start_http_bridge(tmp_path / "bridge", mosquitto.port, prefix, extra=timeouts)
    started.append(bridge)
    ids = ["gw-on", "gw-late", "gw-gone"]
    fakes = {d: device(mosquitto, prefix, d, "activate", started) for d in ids}
    wait_until(lambda: known_online(bridge, ids), 15, "the bridge to see the devices online")
    assign_lab(bridge, ids)
    for device_id in ("gw-late", "gw-gone"):  # leave with their broker session kept
        fakes[device_id].go_offline()
        fakes[device_id].stop()
    wait_until(lambda: not known_online(bridge, ["gw-late"]) and not known_online(bridge, ["gw-gone"]), 10,
               "the devices to be offline")
    add_model(bridge, tmp_path)
    created = cli(bridge, "rollout", "create", "--model", "glm-new", "--target", "group/lab", "--waves", "100%",
                  "--id", "r11")
    assert created.returncode == 0, created.stderr
    assert "rollout r11: glm-new" in created.stdout
    wait_until(lambda: {d["device_id"]: d["state"] for d in rollout(bridge, "r11")["devices"]}["gw-on"]
               == "activated", 15, "the online device to activate")
    assert rollout(bridge, "r11")["state"] == "running"  # two devices have not reported

    late = device(mosquitto, prefix, "gw-late", "activate", started)  # returns: its session holds the command
    wait_until(lambda: {d["device_id"]: d["state"] for d in rollout(bridge, "r11")["devices"]}["gw-late"]
               == "activated", 15, "the late device to activate")
    assert {c["id"] for c in late.received} == {"r11.gw-late"}
    wait_until(lambda: rollout(bridge, "r11")["state"] == "completed", 20, "the rollout to complete")
    view = rollout(bridge, "r11")
    assert view["counts"] == {"activated": 2, "timed_out": 1}
    gone = {d["device_id"]: d for d in view["devices"]}["gw-gone"]
    assert gone["state"] == "timed_out" and "accepted" in gone["reason"]


def test_two_replicas_on_one_postgresql_drive_a_rollout_sending_each_device_one_deploy(
        mosquitto: Broker, tmp_path: Path, prefix: str, started: list, pg_url: str):
    empty_pg_registry(pg_url).close()
    shared = (f'\n[models]\ndir = "{tmp_path / "models"}"\nsecret_file = "{tmp_path / "artifact-secret"}"\n'
              "\n[rollouts]\ncheck_interval_s = 0.2\n")  # the same artifacts and key on both, as documented
    bridges = [start_http_bridge(tmp_path / name, mosquitto.port, prefix, name=f"-{name}", store_url=pg_url,
                                 shared_group="bridges", extra=shared) for name in ("r1", "r2")]
    started.extend(bridges)
    ids = DEVICES[:6]
    fakes = {d: device(mosquitto, prefix, d, "activate", started) for d in ids}
    wait_until(lambda: known_online(bridges[0], ids), 15, "the replicas to see the devices online")
    assign_lab(bridges[1], ids)
    add_model(bridges[1], tmp_path)
    created = bridges[0].api.post("/api/rollouts", json={"model": "glm-new", "target": "group/lab",
                                                         "waves": [20, 50, 100], "id": "r12"})
    assert created.status_code == 201, created.text
    wait_until(lambda: rollout(bridges[1], "r12")["state"] == "completed", 30, "the rollout to complete")
    assert rollout(bridges[0], "r12")["counts"] == {"activated": 6}
    assert all({c["id"] for c in fakes[d].received} == {f"r12.{d}"} for d in ids)  # a resend keeps its id
