"""`config` commands: the policy is applied, persisted across restarts, and capped by [limits]."""

from __future__ import annotations

import pytest

from tests.support.broker import Broker
from tests.support.cloud import CloudClient, chat, command

pytestmark = pytest.mark.integration


def test_a_config_command_sets_sampling_defaults_that_survive_a_restart(own_broker: Broker, start_agent) -> None:
    cloud = CloudClient(own_broker.port)
    agent, device_id, _ = start_agent(own_broker)
    assert "config" in cloud.wait_online(device_id)["kinds"]
    change = command("config", {"max_tokens": 5, "temperature": 0.0})
    cloud.send(device_id, change)
    reply = cloud.wait_terminal(change["id"])
    assert reply["status"] == "succeeded"
    assert reply["output"]["max_tokens"] == 5 and reply["output"]["temperature"] == 0.0

    assert agent.terminate() == 0
    agent, _, _ = start_agent(own_broker, device_id=device_id)
    cloud.wait_online(device_id)
    job = command("chat", chat("policy please"))  # no max_tokens, no temperature
    cloud.send(device_id, job)
    done = cloud.wait_terminal(job["id"])
    assert done["output"]["usage"]["completion_tokens"] == 5
    assert done["metrics"]["provenance"]["sampling"]["temperature"] == 0.0
    explicit = command("chat", chat("override", max_tokens=7))
    cloud.send(device_id, explicit)
    assert cloud.wait_terminal(explicit["id"])["output"]["usage"]["completion_tokens"] == 7
    assert agent.terminate() == 0
    cloud.close()


def test_a_policy_above_the_devices_cap_is_refused(session_broker: Broker, start_agent, cloud: CloudClient) -> None:
    agent, device_id, _ = start_agent(session_broker)
    cloud.wait_online(device_id)
    change = command("config", {"max_tokens": 32768})
    cloud.send(device_id, change)
    reply = cloud.wait_terminal(change["id"])
    assert reply["status"] == "failed" and reply["error"]["code"] == "invalid_command"
    assert "limits.max_tokens" in reply["error"]["message"]
    assert agent.terminate() == 0


def test_a_generation_longer_than_limits_max_generation_s_fails_with_timeout(
        session_broker: Broker, start_agent, cloud: CloudClient) -> None:
    agent, device_id, _ = start_agent(session_broker, limits="{ max_generation_s = 0.05 }")
    cloud.wait_online(device_id)
    job = command("complete", {"prompt": "Long", "max_tokens": 4000})
    cloud.send(device_id, job)
    reply = cloud.wait_terminal(job["id"])
    assert reply["status"] == "failed" and reply["error"]["code"] == "timeout", reply
    assert "limits.max_generation_s" in reply["error"]["message"]
    ping = command("ping")
    cloud.send(device_id, ping)
    assert cloud.wait_terminal(ping["id"])["status"] == "succeeded"
    assert agent.terminate() == 0


def test_a_stored_policy_is_clamped_by_a_limit_lowered_since(own_broker: Broker, start_agent) -> None:
    """Issue 19, attack 5: `config` stores max_tokens 40, the agent restarts with limits.max_tokens 8:
    a command without max_tokens runs with 8, and the policy in force says 8."""
    cloud = CloudClient(own_broker.port)
    agent, device_id, _ = start_agent(own_broker)
    cloud.wait_online(device_id)
    change = command("config", {"max_tokens": 40})
    cloud.send(device_id, change)
    assert cloud.wait_terminal(change["id"])["output"]["max_tokens"] == 40
    assert agent.terminate() == 0

    agent, _, _ = start_agent(own_broker, device_id=device_id, limits="{ max_tokens = 8 }")
    cloud.wait_online(device_id)
    job = command("complete", {"prompt": "Once upon a time"})  # no max_tokens: the policy's
    cloud.send(device_id, job)
    done = cloud.wait_terminal(job["id"])
    assert done["status"] == "succeeded", done
    assert done["output"]["usage"]["completion_tokens"] == 8
    touch = command("config", {"temperature": 0.5})
    cloud.send(device_id, touch)
    assert cloud.wait_terminal(touch["id"])["output"]["max_tokens"] == 8
    assert agent.terminate() == 0
    cloud.close()
