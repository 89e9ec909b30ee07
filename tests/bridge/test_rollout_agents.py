"""Rollouts end to end with real agents: a real mosquitto, two `edge-agent run` on the tiny GLM GGUF,
`cloud-bridge serve` registering two GGUFs the project builds (tiny GLM models of other seeds), the
devices downloading from the bridge's `/artifacts` through a chaos proxy that cuts the connection
mid-transfer (the downloads resume with Range), the canary run by the agents (one that fails, rolls
the device back and halts the rollout), and the registry following each device's active and previous
model."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.chaos import ChaosProxy
from tests.support.agent_proc import AgentProcess, write_agent_config
from tests.support.broker import Broker
from tests.support.model_files import build_served

from .conftest import VENV_BIN, HttpBridge, free_port, start_http_bridge, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ROOT / "models" / "tiny-glm4-q4_0.gguf"
DEVICES = ["gw-r1", "gw-r2"]
CANARY = {"prompts": [{"prompt": "Once upon a time", "max_tokens": 4, "timeout_s": 60}], "min_speed_ratio": 0.0}


@dataclass
class Fleet:
    bridge: HttpBridge
    proxy: ChaosProxy
    served: Path
    sha256: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "cloud-bridge"), *args, "--config", str(self.bridge.config_path)],
                              capture_output=True, text=True, timeout=60)

    def rollout(self, rollout_id: str) -> dict:
        return self.bridge.api.get(f"/api/rollouts/{rollout_id}").json()

    def devices(self) -> dict[str, dict]:
        return {d["device_id"]: d for d in self.bridge.api.get("/api/devices").json()}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not TINY_MODEL.exists():
        pytest.skip(f"{TINY_MODEL} is missing: run `make model`")
    folder = tmp_path_factory.mktemp("rollout-agents")
    served = build_served(folder / "served")
    broker = Broker(folder / "broker").start()
    http_port = free_port()
    proxy = ChaosProxy(upstream_port=http_port).start()  # devices download through it
    proxy.latency(0.05)  # a slow link: a cut lands mid-download
    extra = (f'\n[models]\npublic_url = "http://127.0.0.1:{proxy.port}"\n'
             "\n[rollouts]\ncheck_interval_s = 0.2\n")
    bridge = start_http_bridge(folder / "bridge", broker.port, "autoglm", extra=extra, http_port=http_port)
    agents = [AgentProcess(write_agent_config(folder / f"{d}.toml", d, broker.port, TINY_MODEL, folder / f"{d}.db",
                                              tail="[models]\ndownload_attempts = 50\n"),
                           folder / f"{d}.log").start() for d in DEVICES]
    fleet = Fleet(bridge, proxy, folder / "served", {k: v.sha256 for k, v in served.items()})
    try:
        wait_until(lambda: all(fleet.devices().get(d, {}).get("state") == "online" for d in DEVICES), 120,
                   "both agents online in the bridge's registry")
        yield fleet
    finally:
        bridge.stop()
        for agent in agents:
            agent.stop_quietly()
        proxy.close()
        broker.stop()


def add(fleet: Fleet, file: str, name: str) -> dict:
    done = fleet.cli("model", "add", str(fleet.served / file), "--name", name, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def create(fleet: Fleet, model: str, rollout_id: str, canary: dict = CANARY) -> None:
    created = fleet.bridge.api.post("/api/rollouts", json={
        "model": model, "filter": {"device_ids": DEVICES}, "waves": [50, 100], "max_failures": 0,
        "canary": canary, "id": rollout_id})
    assert created.status_code == 201, created.text


def test_a_rollout_through_a_cutting_link_activates_the_model_on_every_agent(fleet: Fleet):
    model = add(fleet, "v1.gguf", "glm-v1")
    assert model["sha256"] == fleet.sha256["v1"] and model["architecture"] == "glm4"
    stop = threading.Event()

    def cutter() -> None:  # cut the first downloads twice each, mid-transfer
        cuts = 0
        while cuts < 4 and not stop.wait(0.02):
            if fleet.proxy.open_connections() and not stop.wait(0.2):  # body bytes are flowing by then
                cuts += fleet.proxy.cut() > 0

    threading.Thread(target=cutter, daemon=True).start()
    try:
        create(fleet, "glm-v1", "e2e1")
        wait_until(lambda: fleet.rollout("e2e1")["state"] == "completed", 240,
                   f"the rollout to complete (now: {fleet.rollout('e2e1')})")
    finally:
        stop.set()
    view = fleet.rollout("e2e1")
    assert view["counts"] == {"activated": 2}, view
    assert all(d["canary"]["passed"] is True for d in view["devices"])
    assert fleet.proxy.stats.connections_cut >= 1  # the link was really cut under the downloads
    served = re.findall(r"artifact \w+ to gw-r\d: bytes (\d+)-", fleet.bridge.log_path.read_text())
    assert any(int(start) > 0 for start in served), served  # and a download resumed with Range

    def registry_follows() -> bool:
        devices = fleet.devices()
        return all(devices[d]["model_sha256"] == fleet.sha256["v1"] and devices[d]["rollout"] == "e2e1"
                   and devices[d]["previous_model_name"] is not None for d in DEVICES)

    wait_until(registry_follows, 30, "the registry to show v1 active on both agents")
    job = fleet.bridge.api.post("/api/commands", json={"target": DEVICES[1], "kind": "complete",
                                                       "params": {"prompt": "Once", "max_tokens": 4}}).json()
    command_id = job["commands"][0]["id"]
    wait_until(lambda: fleet.bridge.api.get(f"/api/commands/{command_id}").json()["state"] == "succeeded", 60,
               "a completion on the new model")
    reply = fleet.bridge.api.get(f"/api/commands/{command_id}").json()["reply"]
    assert reply["metrics"]["provenance"]["model_sha256"] == fleet.sha256["v1"]


def test_a_model_whose_canary_fails_is_rolled_back_and_halts_the_rollout_before_the_second_wave(fleet: Fleet):
    add(fleet, "v2.gguf", "glm-v2")
    strict = {"prompts": [{"prompt": "Once upon a time", "max_tokens": 4, "regex": "^never this$"}]}
    create(fleet, "glm-v2", "e2e2", canary=strict)
    wait_until(lambda: fleet.rollout("e2e2")["state"] == "halted", 240, "the rollout to halt")
    view = {d["device_id"]: d for d in fleet.rollout("e2e2")["devices"]}
    assert {d: v["state"] for d, v in view.items()} == {"gw-r1": "rolled_back", "gw-r2": "skipped"}
    assert view["gw-r1"]["canary"]["passed"] is False and "regex" in view["gw-r1"]["reason"]
    devices = fleet.devices()
    assert all(devices[d]["model_sha256"] == fleet.sha256["v1"] for d in DEVICES)  # both still serve v1
