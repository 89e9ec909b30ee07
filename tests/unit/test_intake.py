"""Intake of one delivered command on the in-memory inbox and outbox (the agent end to end:
tests/integration, tests/security, tests/faults): rejections with their Event, storing, dedupe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autoglm_wire.protocol import ModelInfo
from autoglm_wire.signing import CommandVerifier, VerifyPolicy
from autoglm_wire.topics import DeviceTopics
from edge_agent.config import AgentConfig
from edge_agent.executor import Executor
from edge_agent.inbox import MemoryInbox
from edge_agent.intake import Intake
from edge_agent.link import InboundMessage
from edge_agent.outbox import MemoryOutbox

TOPICS = DeviceTopics("autoglm", "d1")


class IdleEngine:
    info = ModelInfo(name="none", sha256="0" * 64, arch="none", quant="none", n_gpu_layers=0)


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        config = AgentConfig(device_id="d1", model={"path": tmp_path / "model.gguf"},
                             limits={"max_prompt_chars": 20})
        self.outbox = MemoryOutbox(TOPICS)
        self.inbox = MemoryInbox(self.outbox)
        self.kicks = 0
        executor = Executor(self.inbox, lambda: None, IdleEngine(), TOPICS, "test",  # type: ignore[arg-type]
                            lambda topic, payload: None, on_stored=lambda: None, stream_interval_s=0.05)
        verifier = CommandVerifier(VerifyPolicy(required=False, trusted={}, max_clock_skew_s=60, replay_window_s=600))
        self.intake = Intake(config, TOPICS, verifier, self.inbox, self.outbox, executor, on_stored=self.kick)

    def kick(self) -> None:
        self.kicks += 1

    def deliver(self, payload: bytes | dict[str, Any], response_topic: str | None = None) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.intake.handle(InboundMessage(topic=TOPICS.cmd, payload=raw, response_topic=response_topic,
                                          correlation_data=None, message_expiry_s=None, duplicate_delivery=False))

    def published(self) -> list[tuple[str, dict[str, Any]]]:
        return [(row.topic, json.loads(row.payload)) for row in self.outbox.pending(0, 1000)]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def ping(command_id: str = "c1", **fields: Any) -> dict[str, Any]:
    return {"v": 1, "id": command_id, "kind": "ping", "created_at": "2026-11-21T10:00:00Z", **fields}


def test_a_payload_that_is_not_json_gets_one_rejected_reply_and_an_event(rig: Rig) -> None:
    rig.deliver(b"{not json")
    (reply_topic, reply), (event_topic, event) = rig.published()
    assert (reply_topic, reply["status"], reply["command_id"], reply["error"]["code"]) == (
        TOPICS.reply, "rejected", None, "bad_json")
    assert (event_topic, event["code"], event["data"]["error_code"]) == (TOPICS.event, "command_rejected", "bad_json")
    assert rig.kicks == 1


def test_a_command_for_another_device_is_rejected_as_unauthorized_and_not_stored(rig: Rig) -> None:
    rig.deliver(ping(target="d2"))
    assert rig.published()[0][1]["error"]["code"] == "unauthorized"
    assert rig.inbox.get("c1") is None


def test_a_prompt_over_the_limit_is_rejected_naming_the_config_key(rig: Rig) -> None:
    rig.deliver(ping(kind="complete", params={"prompt": "x" * 21}))
    error = rig.published()[0][1]["error"]
    assert error["code"] == "invalid_command" and "limits.max_prompt_chars" in error["message"]


def test_a_response_topic_outside_the_reply_tree_is_refused_and_gets_nothing(rig: Rig) -> None:
    rig.deliver(ping(), response_topic="autoglm/d2/reply")
    assert [topic for topic, _ in rig.published()] == [TOPICS.reply, TOPICS.event]
    assert rig.published()[0][1]["error"]["code"] == "unauthorized"


def test_a_command_is_stored_accepted_and_a_redelivery_gets_the_same_reply_again(rig: Rig) -> None:
    rig.deliver(ping())
    stored = rig.inbox.get("c1")
    assert stored is not None and stored.state == "accepted"
    rig.deliver(ping())
    first, again = rig.published()
    assert first == again and first[1]["status"] == "accepted"
    assert len(rig.inbox.in_state("accepted")) == 1 and rig.kicks == 2
