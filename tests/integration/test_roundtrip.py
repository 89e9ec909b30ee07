"""Protocol v1 round trips against a real mosquitto and the real tiny GLM model in llama.cpp."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.support.agent_proc import read_ledger
from tests.support.cloud import CloudClient, chat, command

pytestmark = pytest.mark.integration


@pytest.fixture
def device(start_agent, session_broker, cloud: CloudClient):
    agent, device_id, store = start_agent(session_broker)
    status = cloud.wait_online(device_id)
    yield device_id, store, status
    assert agent.terminate() == 0, agent.log_text()


def test_status_is_retained_online_with_model_and_gpu_facts(device, cloud: CloudClient) -> None:
    device_id, _, status = device
    assert status["state"] == "online"
    assert status["model"]["arch"] == "glm4"
    assert status["model"]["quant"] == "Q4_0"
    assert len(status["model"]["sha256"]) == 64
    assert status["model"]["n_gpu_layers"] == 0  # CPU build: auto falls back
    assert {"ping", "chat", "complete", "cancel"} <= set(status["kinds"])
    late = CloudClient(cloud.port)  # a client that subscribes later still sees the retained status
    try:
        assert late.wait_online(device_id)["device_id"] == device_id
    finally:
        late.close()


def test_ping_round_trip_goes_accepted_running_succeeded(device, cloud: CloudClient) -> None:
    device_id, _, _ = device
    cmd = command("ping")
    cloud.send(device_id, cmd)
    reply = cloud.wait_terminal(cmd["id"])
    assert reply["status"] == "succeeded"
    assert reply["output"]["pong"] is True
    statuses = [r["status"] for r in sorted(cloud.replies(cmd["id"]), key=lambda r: r["seq"])]
    assert statuses == ["accepted", "running", "succeeded"]


def test_chat_runs_the_glm_model_and_reports_usage_and_provenance(device, cloud: CloudClient) -> None:
    device_id, _, status = device
    cmd = command("chat", chat("Hello GLM", max_tokens=24, seed=7))
    cloud.send(device_id, cmd)
    reply = cloud.wait_terminal(cmd["id"])
    assert reply["status"] == "succeeded", reply
    output, metrics = reply["output"], reply["metrics"]
    assert output["finish_reason"] in {"stop", "length"}
    assert 0 < output["usage"]["completion_tokens"] <= 24
    assert output["usage"]["prompt_tokens"] > 0
    assert metrics["provenance"]["model_sha256"] == status["model"]["sha256"]
    assert metrics["provenance"]["seed"] == 7
    assert metrics["total_ms"] >= metrics["ttft_ms"] >= 0


def test_same_seed_gives_the_same_text(device, cloud: CloudClient) -> None:
    device_id, _, _ = device
    first, second = command("complete", {"prompt": "Once", "max_tokens": 16, "seed": 3}), \
        command("complete", {"prompt": "Once", "max_tokens": 16, "seed": 3})
    for cmd in (first, second):
        cloud.send(device_id, cmd)
    assert cloud.wait_terminal(first["id"])["output"]["text"] == cloud.wait_terminal(second["id"])["output"]["text"]


def test_streaming_chunks_arrive_in_order_and_add_up_to_the_text(device, cloud: CloudClient) -> None:
    device_id, _, _ = device
    cmd = command("chat", chat("Stream please", max_tokens=32, seed=1, stream=True))
    cloud.send(device_id, cmd)
    reply = cloud.wait_terminal(cmd["id"])
    cloud.wait_for(lambda: any(c["done"] for c in cloud.on(f"/stream/{cmd['id']}")), 10, "final chunk")
    chunks = cloud.on(f"/stream/{cmd['id']}")
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert chunks[-1]["done"] is True and not any(c["done"] for c in chunks[:-1])
    assert "".join(c["delta"] for c in chunks) == reply["output"]["text"]


def test_a_duplicate_command_id_is_not_executed_again(start_agent, session_broker, cloud: CloudClient) -> None:
    agent, device_id, store = start_agent(session_broker)
    cloud.wait_online(device_id)
    cmd = command("complete", {"prompt": "dup", "max_tokens": 8, "stream": True})
    cloud.send(device_id, cmd)
    first = cloud.wait_terminal(cmd["id"])
    cloud.wait_for(lambda: any(c["done"] for c in cloud.on(f"/stream/{cmd['id']}")), 10, "final chunk")
    chunks = len(cloud.on(f"/stream/{cmd['id']}"))
    before = len(cloud.replies(cmd["id"]))
    cloud.send(device_id, cmd)  # same id again, to an idle worker: intake finds the id before any early start
    cloud.wait_for(lambda: len(cloud.replies(cmd["id"])) > before, 10, "re-sent reply")
    after = command("ping")
    cloud.send(device_id, after)  # runs once the dropped early start has ended
    cloud.wait_terminal(after["id"])
    resent = cloud.replies(cmd["id"])[before:]
    assert all(r["seq"] == first["seq"] and r["status"] == "succeeded" for r in resent)
    assert len(cloud.terminal(cmd["id"])) == 1  # after dedupe by seq: one terminal reply
    assert not any(r["status"] == "running" for r in resent)
    assert len(cloud.on(f"/stream/{cmd['id']}")) == chunks, "the duplicate published no stream chunk"
    assert read_ledger(store)[cmd["id"]] == "succeeded"
    assert agent.terminate() == 0
    assert "duplicate delivery of command" in agent.log_text()
    assert "dropped the early start" not in agent.log_text(), "the duplicate was not even started"


BAD_PAYLOADS = [
    pytest.param(b"{not json", "bad_json", None, id="malformed-json"),
    pytest.param(b"\xff\xfe\x00", "bad_json", None, id="invalid-utf8"),
    pytest.param(b"[1, 2]", "bad_json", None, id="json-array"),
    pytest.param(json.dumps(command("teleport", command_id="k1")).encode(), "unknown_kind", "k1", id="unknown-kind"),
    pytest.param(json.dumps({"v": 1, "id": "m1", "kind": "ping"}).encode(), "invalid_command", "m1",
                 id="missing-created_at"),
    pytest.param(json.dumps({**command("ping", command_id="w1"), "v": 2}).encode(), "invalid_command", "w1",
                 id="wrong-version"),
    pytest.param(json.dumps(command("chat", {"messages": []}, command_id="e1")).encode(), "invalid_command", "e1",
                 id="empty-messages"),
    pytest.param(json.dumps(command("ping", {"x": 1}, command_id="u1")).encode(), "invalid_command", "u1",
                 id="unknown-param"),
    pytest.param(json.dumps(command("ping", command_id="bad/id")).encode(), "invalid_command", None, id="bad-id"),
    pytest.param(json.dumps(command("ping", command_id="t1", target="someone-else")).encode(), "unauthorized",
                 "t1", id="wrong-target"),
    pytest.param(b'{"v": 1, "pad": "' + b"x" * 300_000 + b'"}', "payload_too_large", None, id="oversized"),
]


@pytest.mark.parametrize(("payload", "code", "command_id"), BAD_PAYLOADS)
def test_a_bad_payload_gets_a_rejected_reply_and_an_event_and_the_agent_keeps_serving(
        device, cloud: CloudClient, payload: bytes, code: str, command_id: str | None) -> None:
    device_id, _, _ = device
    cloud.send(device_id, payload)

    def rejected() -> list[dict]:
        return [r for r in cloud.replies() if r["status"] == "rejected" and r["error"]["code"] == code]
    cloud.wait_for(rejected, 15, f"rejected reply with {code}")
    reply = rejected()[0]
    assert reply["command_id"] == command_id
    assert reply["error"]["message"]
    cloud.wait_for(lambda: [e for e in cloud.on("/event") if e["data"].get("error_code") == code], 15, "event")
    ping = command("ping")
    cloud.send(device_id, ping)
    assert cloud.wait_terminal(ping["id"])["status"] == "succeeded"


def test_replies_also_go_to_the_response_topic_with_correlation_data(device, cloud: CloudClient) -> None:
    device_id, _, _ = device
    cmd = command("ping")
    # a ResponseTopic must lie under the device's reply tree (docs/protocol.md, issue #6)
    cloud.send(device_id, cmd, response_topic=f"autoglm/{device_id}/reply/console-1", correlation=b"corr-42")
    cloud.wait_terminal(cmd["id"])
    cloud.wait_for(lambda: [r for r in cloud.on("/reply/console-1") if r["status"] == "succeeded"], 10,
                   "reply on the response topic")


def test_cancel_stops_a_running_generation(device, cloud: CloudClient) -> None:
    device_id, _, _ = device
    long_run = command("complete", {"prompt": "Long", "max_tokens": 4000, "stream": True})
    cloud.send(device_id, long_run)
    cloud.wait_for(lambda: cloud.on(f"/stream/{long_run['id']}"), 30, "first token")
    cancel = command("cancel", {"target": long_run["id"]})
    cloud.send(device_id, cancel)
    assert cloud.wait_terminal(cancel["id"])["output"]["previous_state"] == "running"
    reply = cloud.wait_terminal(long_run["id"])
    assert reply["status"] == "cancelled"
    assert reply["output"]["finish_reason"] == "cancelled"
    assert reply["output"]["usage"]["completion_tokens"] < 4000


def test_expired_commands_are_never_run(device, cloud: CloudClient) -> None:
    device_id, _, _ = device
    cmd = command("ping", expires_at="2020-01-01T00:00:00Z")
    cloud.send(device_id, cmd)
    reply = cloud.wait_terminal(cmd["id"])
    assert reply["status"] == "expired"
    assert reply["error"]["code"] == "expired"
    assert not [r for r in cloud.replies(cmd["id"]) if r["status"] == "running"]


def test_finished_commands_older_than_ledger_days_are_forgotten_when_the_agent_starts(
        start_agent, session_broker, cloud: CloudClient) -> None:
    agent, device_id, store = start_agent(session_broker)
    cloud.wait_online(device_id)
    ping = command("ping")
    cloud.send(device_id, ping)
    first = cloud.wait_terminal(ping["id"])
    assert agent.terminate() == 0
    with sqlite3.connect(store) as conn:  # as if it had finished 8 days ago
        conn.execute("UPDATE commands SET updated_at = updated_at - 8 * 86400 WHERE id = ?", [ping["id"]])
    conn.close()
    again, _, _ = start_agent(session_broker, device_id=device_id)  # store.ledger_days: 7 by default
    cloud.wait_for(lambda: ping["id"] not in read_ledger(store), 30, "the old command forgotten")
    cloud.wait_for(lambda: "forgot 1 finished command(s) older than 7 days" in again.log_text(), 30,
                   "the log line, written after the ledger commit")
    cloud.send(device_id, ping)  # the same id again: a new command now, run again with a new seq
    cloud.wait_for(lambda: len(cloud.terminal(ping["id"])) == 2, 30, "a second terminal reply")
    second = max(cloud.terminal(ping["id"]), key=lambda r: r["seq"])
    assert second["status"] == "succeeded" and second["seq"] > first["seq"]
    assert again.terminate() == 0
