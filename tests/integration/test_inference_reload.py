"""Model reload on SIGHUP: the agent re-reads its config and swaps the model without restarting;
the new sha256 is in the retained status and in replies' provenance; a failed reload keeps the
old model serving."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from models.build_gguf import build_model
from tests.support.agent_proc import write_agent_config
from tests.support.broker import Broker
from tests.support.cloud import CloudClient
from tests.support.model_files import serving_sha

pytestmark = pytest.mark.integration


def statuses(cloud: CloudClient, device: str) -> list[dict]:
    return [b for t, b in cloud.messages if t == f"autoglm/{device}/status" and isinstance(b, dict)]


def test_sighup_reloads_the_model_named_in_the_config_and_announces_its_sha256(
        tmp_path: Path, start_agent, session_broker: Broker, tiny_model: Path, cloud: CloudClient) -> None:
    other = build_model(tmp_path / "other-tiny.gguf", preset="tiny", seed=1)
    agent, device, store = start_agent(session_broker)
    first = cloud.wait_online(device)["model"]["sha256"]
    assert serving_sha(cloud, device) == first

    write_agent_config(agent.config, device, session_broker.port, other, store)
    assert agent.process is not None
    agent.process.send_signal(signal.SIGHUP)
    cloud.wait_for(lambda: [s for s in statuses(cloud, device) if s["model"]["sha256"] != first], 60,
                   "status with the new model")
    second = statuses(cloud, device)[-1]["model"]["sha256"]
    assert serving_sha(cloud, device) == second != first
    reloaded = [e for e in cloud.on(f"{device}/event") if e["code"] == "model_reloaded"]
    assert reloaded and reloaded[-1]["data"]["model_sha256"] == second
    late = CloudClient(cloud.port)  # the retained status is the new one
    try:
        assert late.wait_online(device)["model"]["sha256"] == second
    finally:
        late.close()
    assert agent.terminate() == 0, agent.log_text()


def test_a_reload_that_cannot_load_the_new_model_keeps_serving_the_old_one(
        tmp_path: Path, start_agent, session_broker: Broker, cloud: CloudClient) -> None:
    agent, device, store = start_agent(session_broker)
    first = cloud.wait_online(device)["model"]["sha256"]
    write_agent_config(agent.config, device, session_broker.port, tmp_path / "missing.gguf", store)
    assert agent.process is not None
    agent.process.send_signal(signal.SIGHUP)
    cloud.wait_for(lambda: [e for e in cloud.on(f"{device}/event") if e["code"] == "model_reload_failed"], 60, "event")
    failed = [e for e in cloud.on(f"{device}/event") if e["code"] == "model_reload_failed"][0]
    assert "missing.gguf" in failed["message"]
    assert serving_sha(cloud, device) == first
    assert agent.terminate() == 0, agent.log_text()
