"""Intake of one delivered command on the in-memory inbox and outbox (the agent end to end:
tests/integration, tests/security, tests/faults): rejections with their Event, storing, dedupe, and
the invariant: one terminal reply for whatever arrives, nothing raised but StoreUnavailable."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from autoglm_wire.lifecycle import TERMINAL, State
from autoglm_wire.protocol import ModelInfo
from autoglm_wire.signing import CommandVerifier, VerifyPolicy
from autoglm_wire.topics import DeviceTopics
from edge_agent.config import AgentConfig
from edge_agent.executor import Executor
from edge_agent.inbox import Accepted, MemoryInbox
from edge_agent.intake import MAX_PROPERTY_BYTES, Intake
from edge_agent.link import InboundMessage
from edge_agent.outbox import MemoryOutbox, ReplyDraft
from edge_agent.sqlite_file import StoreFull, StoreUnavailable

TOPICS = DeviceTopics("autoglm", "d1")


class IdleEngine:
    info = ModelInfo(name="none", sha256="0" * 64, arch="none", quant="none", n_gpu_layers=0)


class FailingInbox(MemoryInbox):
    """The in-memory ledger whose `accept` raises `error` (a store that cannot write, or a bug)."""

    def __init__(self, outbox: MemoryOutbox, error: Exception) -> None:
        super().__init__(outbox)
        self.error = error

    def accept(self, *args: Any, **kwargs: Any) -> Accepted:
        raise self.error


class FailingOutbox(MemoryOutbox):
    """The in-memory outbox whose `reject` raises `error`."""

    def __init__(self, error: Exception) -> None:
        super().__init__(TOPICS)
        self.error = error

    def reject(self, command_id: str | None, draft: ReplyDraft, event: Any,
               response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        raise self.error


class DiskFullForTerminalReplies(MemoryInbox):
    """The in-memory ledger on a disk that is full when a terminal reply is stored (until `full` is cleared)."""

    def __init__(self, outbox: MemoryOutbox) -> None:
        super().__init__(outbox)
        self.full = threading.Event()
        self.full.set()

    def transition(self, command_id: str, new_state: State, draft: ReplyDraft, only_from: Any = None) -> bool:
        if new_state in TERMINAL and self.full.is_set():
            raise StoreFull("the disk holding edge.db is full")
        return super().transition(command_id, new_state, draft, only_from)


class NaiveClockVerifier:
    """A signature check that trips over its input, as signing did on a naive `created_at`."""

    enabled = True

    def check(self, payload: dict[str, Any], created_at: Any, now: Any) -> str:
        raise TypeError("can't compare offset-naive and offset-aware datetimes")


class Rig:
    def __init__(self, tmp_path: Path, accept_error: Exception | None = None, reject_error: Exception | None = None,
                 verifier: Any = None, make_inbox: Callable[[MemoryOutbox], MemoryInbox] = MemoryInbox) -> None:
        config = AgentConfig(device_id="d1", model={"path": tmp_path / "model.gguf"},
                             limits={"max_prompt_chars": 20})
        self.outbox = MemoryOutbox(TOPICS) if reject_error is None else FailingOutbox(reject_error)
        self.inbox = make_inbox(self.outbox) if accept_error is None else FailingInbox(self.outbox, accept_error)
        self.kicks = 0
        self.executor = Executor(self.inbox, lambda: None, IdleEngine(), TOPICS, "test",  # type: ignore[arg-type]
                                 lambda topic, payload: None, on_stored=lambda: None, stream_interval_s=0.05)
        verifier = verifier or CommandVerifier(VerifyPolicy(required=False, trusted={}, max_clock_skew_s=60,
                                                            replay_window_s=600))
        self.intake = Intake(config, TOPICS, verifier, self.inbox, self.outbox, self.executor, on_stored=self.kick)

    def kick(self) -> None:
        self.kicks += 1

    def deliver(self, payload: bytes | dict[str, Any], response_topic: str | None = None,
                correlation_data: bytes | None = None, local: bool = False) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.intake.handle(InboundMessage(topic=TOPICS.cmd, payload=raw, response_topic=response_topic,
                                          correlation_data=correlation_data, message_expiry_s=None,
                                          duplicate_delivery=False, local=local))

    def published(self) -> list[tuple[str, dict[str, Any]]]:
        return [(row.topic, json.loads(row.payload)) for row in self.outbox.pending(0, 1000)]

    def correlations(self) -> list[bytes | None]:
        return [row.correlation_data for row in self.outbox.pending(0, 1000)]


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


OWN_REPLY_TREE = TOPICS.reply + "/client-7"


def test_correlation_data_within_the_bound_is_echoed_on_the_replies(rig: Rig) -> None:
    rig.deliver(ping(), response_topic=OWN_REPLY_TREE, correlation_data=b"k" * MAX_PROPERTY_BYTES)
    assert [topic for topic, _ in rig.published()] == [TOPICS.reply, OWN_REPLY_TREE]
    assert rig.correlations() == [b"k" * MAX_PROPERTY_BYTES] * 2


@pytest.mark.parametrize(("response_topic", "correlation_data", "name"), [
    (OWN_REPLY_TREE, b"k" * (MAX_PROPERTY_BYTES + 1), "CorrelationData"),
    (OWN_REPLY_TREE + "/" + "t" * MAX_PROPERTY_BYTES, b"k", "ResponseTopic"),
])
def test_a_property_over_the_bound_is_refused_and_not_echoed(rig: Rig, response_topic: str,
                                                               correlation_data: bytes, name: str) -> None:
    rig.deliver(ping(), response_topic=response_topic, correlation_data=correlation_data)
    assert [topic for topic, _ in rig.published()] == [TOPICS.reply, TOPICS.event]
    error = rig.published()[0][1]["error"]
    assert error["code"] == "invalid_command" and name in error["message"]
    assert rig.correlations() == [None, None]
    assert rig.inbox.get("c1") is None


def test_an_unauthorized_payload_gets_its_rejection_without_its_properties(rig: Rig) -> None:
    rig.deliver(ping(target="d2"), response_topic=OWN_REPLY_TREE, correlation_data=b"attacker")
    assert [topic for topic, _ in rig.published()] == [TOPICS.reply, TOPICS.event]
    assert rig.correlations() == [None, None]


def test_a_rejected_payload_reusing_an_accepted_id_is_answered_without_that_id(rig: Rig) -> None:
    rig.deliver(ping(), response_topic=OWN_REPLY_TREE, correlation_data=b"bridge")
    rig.deliver(ping(target="d2"), response_topic=OWN_REPLY_TREE, correlation_data=b"attacker")
    rejection, event = rig.published()[-2:]
    assert (rejection[0], rejection[1]["status"], rejection[1]["command_id"]) == (TOPICS.reply, "rejected", None)
    assert event[1]["data"]["command_id"] == "c1" and event[1]["data"]["id_of_an_accepted_command"] is True
    assert b"attacker" not in rig.correlations()
    assert rig.inbox.get("c1").state == "accepted"


def test_a_command_is_stored_accepted_and_a_redelivery_gets_the_same_reply_again(rig: Rig) -> None:
    rig.deliver(ping())
    stored = rig.inbox.get("c1")
    assert stored is not None and stored.state == "accepted"
    rig.deliver(ping())
    first, again = rig.published()
    assert first == again and first[1]["status"] == "accepted"
    assert len(rig.inbox.in_state("accepted")) == 1 and rig.kicks == 2


def test_an_mqtt_command_with_a_local_id_is_refused_and_only_the_local_api_may_use_one(rig: Rig) -> None:
    rig.deliver(ping("local-" + "0" * 32))
    reply = rig.published()[0][1]
    assert (reply["status"], reply["error"]["code"]) == ("rejected", "invalid_command")
    assert "reserved for this device's local API" in reply["error"]["message"] and "origin" not in reply["metrics"]
    assert rig.inbox.get("local-" + "0" * 32) is None
    rig.deliver(ping("local-" + "1" * 32), local=True)
    assert rig.inbox.get("local-" + "1" * 32).state == "accepted"


def test_a_local_command_needs_no_signature_where_mqtt_commands_do(tmp_path: Path) -> None:
    rig = Rig(tmp_path, verifier=CommandVerifier(VerifyPolicy(required=True, trusted={}, max_clock_skew_s=60,
                                                              replay_window_s=600)))
    rig.deliver(ping("c1"))
    assert rig.published()[0][1]["error"]["code"] == "unauthorized"
    rig.deliver(ping("local-" + "2" * 32), local=True)
    assert rig.inbox.get("local-" + "2" * 32).state == "accepted"


def replies(rig: Rig) -> list[dict[str, Any]]:
    return [body for topic, body in rig.published() if topic == TOPICS.reply]


@pytest.mark.parametrize(("field", "value"), [
    ("expires_at", "0001-01-01"),  # the reproduction: no offset (it knocked the device off the broker)
    ("created_at", "2026-11-21T10:00:00"),  # naive
    ("expires_at", "9999-12-31T23:59:59Z"),  # past the wire's years
    ("priority", 2**63),
])
def test_a_boundary_value_in_the_envelope_is_invalid_command_with_the_id(rig: Rig, field: str, value: Any) -> None:
    rig.deliver(ping(**{field: value}))
    (reply,) = replies(rig)
    assert (reply["status"], reply["command_id"], reply["error"]["code"]) == ("rejected", "c1", "invalid_command")
    assert rig.inbox.get("c1") is None


def test_a_chat_holding_a_lone_surrogate_is_invalid_command_not_internal(rig: Rig) -> None:
    rig.deliver(ping(kind="chat", params={"messages": [{"role": "user", "content": "a\ud800b"}]}))  # as `\ud800`
    (reply,) = replies(rig)
    assert (reply["command_id"], reply["error"]["code"]) == ("c1", "invalid_command")
    assert "surrogate" in reply["error"]["message"]


def test_a_check_that_cannot_interpret_a_value_answers_invalid_command_with_the_id(tmp_path: Path) -> None:
    rig = Rig(tmp_path, verifier=NaiveClockVerifier())
    rig.deliver(ping())  # does not raise: the command is answered and acknowledged
    (reply,) = replies(rig)
    assert (reply["status"], reply["command_id"], reply["error"]["code"]) == ("rejected", "c1", "invalid_command")
    assert "offset-naive" in reply["error"]["message"]


def test_a_bug_in_intake_answers_internal_with_the_id_and_logs_one_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path, accept_error=KeyError("a bug"))
    with caplog.at_level(logging.WARNING, logger="edge_agent.intake"):
        rig.deliver(ping())
    (reply,) = replies(rig)
    assert (reply["status"], reply["command_id"], reply["error"]["code"]) == ("rejected", "c1", "internal")
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "c1" in tracebacks[0].getMessage()
    assert isinstance(tracebacks[0].exc_info[1], KeyError)  # type: ignore[index]


@pytest.mark.parametrize("error", [StoreFull("the disk is full"), StoreUnavailable("disk I/O error")])
def test_a_store_that_cannot_write_is_the_one_failure_that_raises(tmp_path: Path, error: Exception) -> None:
    rig = Rig(tmp_path, accept_error=error)
    with pytest.raises(type(error)):
        rig.deliver(ping())  # the link leaves it unacknowledged: the broker redelivers it
    assert rig.published() == []


def test_a_rejection_that_cannot_be_stored_for_now_raises_too(tmp_path: Path) -> None:
    rig = Rig(tmp_path, reject_error=StoreFull("the disk is full"))
    with pytest.raises(StoreFull):
        rig.deliver(b"{not json")


def test_a_rejection_that_a_bug_keeps_from_being_stored_is_logged_and_acknowledged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path, reject_error=RuntimeError("a bug in the outbox"))
    with caplog.at_level(logging.ERROR, logger="edge_agent.intake"):
        rig.deliver(b"{not json")  # does not raise
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [rig.outbox.error]  # type: ignore[index]


def wait_state(inbox: MemoryInbox, command_id: str, state: str) -> None:
    for _ in range(200):
        stored = inbox.get(command_id)
        if stored is not None and stored.state == state:
            return
        time.sleep(0.025)
    raise AssertionError(f"{command_id} never reached {state}")


def test_a_cancel_does_not_block_the_network_thread_while_the_disk_is_full(tmp_path: Path) -> None:
    rig = Rig(tmp_path, make_inbox=DiskFullForTerminalReplies)
    inbox = rig.inbox
    assert isinstance(inbox, DiskFullForTerminalReplies)
    rig.executor.start()
    try:
        cancel = ping("x1", kind="cancel", params={"target": "c0"})
        network_thread = threading.Thread(target=rig.deliver, args=(cancel,))
        network_thread.start()
        network_thread.join(2.0)
        assert not network_thread.is_alive(), "intake returned while the cancel's reply waits for disk space"
        wait_state(inbox, "x1", "running")  # its `failed` reply (no such target) waits for space, retried
        inbox.full.clear()
        wait_state(inbox, "x1", "failed")
    finally:
        inbox.full.clear()
        rig.executor.stop(5.0)
