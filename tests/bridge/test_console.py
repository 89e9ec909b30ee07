"""The console functions behind `cloud-bridge send/devices/commands/watch`, on a tmp registry."""

from __future__ import annotations

import pytest

from cloud_bridge.console import (
    SendRequest,
    StreamFollower,
    build_command,
    commands_table,
    describe_failure,
    devices_table,
    exit_code,
    final_json,
    format_outcome,
    queue_command,
    render_table,
)
from cloud_bridge.errors import InvalidRequest

from .factories import T0, at, chunk, offline, online, reply


def test_chat_turns_the_prompt_into_one_user_message():
    cmd = build_command(SendRequest("dev-1", "chat", "Hi there", max_tokens=8, seed=3, stream=True), T0)
    assert cmd.params == {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 8, "seed": 3,
                          "stream": True}
    assert cmd.target == "dev-1" and len(cmd.id) == 32


def test_complete_sends_the_prompt_and_cancel_the_target_id():
    assert build_command(SendRequest("dev-1", "complete", "Once"), T0).params == {"prompt": "Once"}
    assert build_command(SendRequest("dev-1", "cancel", "abc"), T0).params == {"target": "abc"}


def test_params_json_is_merged_last():
    cmd = build_command(SendRequest("dev-1", "complete", "x", temperature=0.5, params={"temperature": 0.1}), T0)
    assert cmd.params["temperature"] == 0.1


def test_the_command_expires_after_expires_in_and_keeps_a_given_id():
    cmd = build_command(SendRequest("dev-1", "ping", expires_in_s=30, command_id="job:1"), T0)
    assert cmd.id == "job:1" and (cmd.expires_at - cmd.created_at).total_seconds() == 30


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (SendRequest("dev-1", "dance"), "unknown kind 'dance'"),
        (SendRequest("dev-1", "chat"), "needs a PROMPT"),
        (SendRequest("dev-1", "cancel"), "needs the target command id"),
        (SendRequest("dev-1", "ping", "hello"), "takes no PROMPT"),
        (SendRequest("dev-1", "chat", "x", temperature=9.0), "temperature"),
        (SendRequest("dev 1", "ping"), "device id"),
        (SendRequest("dev-1", "ping", command_id="a b"), "command id"),
        (SendRequest("dev-1", "complete", "x", params={"colour": "red"}), "colour"),
    ],
)
def test_invalid_requests_fail_before_anything_is_queued(request_, message):
    with pytest.raises(InvalidRequest, match=message):
        build_command(request_, T0)


def test_queueing_for_a_device_that_never_reported_warns_but_queues(registry):
    row, warnings = queue_command(registry, SendRequest("ghost", "ping"), T0)
    assert row.state == "pending"
    assert "never reported status" in warnings[0]


def test_queueing_for_an_offline_device_warns_that_the_session_holds_it(registry):
    registry.devices.record_status(online(), T0)
    registry.devices.record_status(offline(), at(1))
    _, warnings = queue_command(registry, SendRequest("dev-1", "ping"), at(2))
    assert "offline" in warnings[0]


def test_queueing_a_kind_the_device_does_not_serve_warns(registry):
    registry.devices.record_status(online(kinds=["ping"]), T0)
    _, warnings = queue_command(registry, SendRequest("dev-1", "complete", "x"), at(1))
    assert "does not list kind 'complete'" in warnings[0]


def test_a_ping_outcome_prints_pong(registry):
    row, _ = queue_command(registry, SendRequest("dev-1", "ping", command_id="c1"), T0)
    registry.replies.record(reply(1, "succeeded", output={"pong": True, "agent_version": "0.1.0", "model": "m"}), at(1))
    row = registry.commands.get("c1")
    assert format_outcome(row).startswith("pong from dev-1")
    assert exit_code(row) == 0 and final_json(row)["output"]["pong"] is True


def test_a_chat_outcome_prints_text_and_metrics(registry):
    queue_command(registry, SendRequest("dev-1", "chat", "hi", command_id="c1"), T0)
    output = {"text": "Hello!", "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    metrics = {"tokens_per_s": 20.0, "ttft_ms": 15.2}
    registry.replies.record(reply(1, "succeeded", output=output, metrics=metrics), at(1))
    text = format_outcome(registry.commands.get("c1"))
    assert text.splitlines()[0] == "Hello!"
    assert "finish_reason=stop" in text and "tokens/s=20.0" in text and "ttft_ms=15" in text


def test_streamed_deltas_are_printed_in_order_and_a_lost_chunk_shows_the_full_text(registry):
    queue_command(registry, SendRequest("dev-1", "chat", "hi", command_id="c1", stream=True), T0)
    printed: list[str] = []
    follower = StreamFollower(registry, "c1", printed.append)
    registry.chunks.record("dev-1", chunk(0, "Hel"), at(1))
    registry.chunks.record("dev-1", chunk(2, "!"), at(1))
    follower.poll()
    assert printed == ["Hel"]
    follower.poll(final=True)
    assert printed == ["Hel", "!"] and follower.gaps == 1
    registry.replies.record(reply(1, "succeeded", output={"text": "Hello!", "finish_reason": "stop"}), at(2))
    assert "stream incomplete" in format_outcome(registry.commands.get("c1"), follower)


def test_a_failed_or_unfinished_command_explains_itself(registry):
    queue_command(registry, SendRequest("dev-1", "ping", command_id="c1"), T0)
    assert "stays queued" in describe_failure(registry.commands.get("c1"))
    assert exit_code(registry.commands.get("c1")) == 2
    registry.commands.mark_expired("c1", "no accepted", at(10))
    row = registry.commands.get("c1")
    assert exit_code(row) == 1 and "ended expired: expired: no accepted" in describe_failure(row)
    assert final_json(row)["status"] == "expired" and final_json(row)["source"] == "cloud-bridge"


def test_tables_list_devices_and_commands(registry):
    assert "no devices yet" in devices_table(registry)
    registry.devices.record_status(online(), T0)
    queue_command(registry, SendRequest("dev-1", "ping", command_id="c1"), T0)
    assert "glm-4-tiny" in devices_table(registry) and "abababababab" in devices_table(registry)
    assert "c1" in commands_table(registry) and "no commands yet for dev-2" in commands_table(registry, "dev-2")


def test_render_table_aligns_columns():
    assert render_table(["A", "BB"], [["xxx", "y"]]) == "A    BB\nxxx  y"


def test_cancelling_a_command_the_device_never_accepted_stops_its_resends(registry):
    queue_command(registry, SendRequest("dev-1", "ping", command_id="c1"), T0)
    registry.commands.mark_sent("c1", at(1))
    cancel, notes = queue_command(registry, SendRequest("dev-1", "cancel", "c1", command_id="x1"), at(2))
    assert registry.commands.get("c1").state == "cancelled" and "no longer resent" in notes[0]
    assert cancel.state == "pending" and [r.id for r in registry.commands.active()] == ["x1"]


def test_cancelling_a_command_the_device_accepted_leaves_it_to_the_device(registry):
    queue_command(registry, SendRequest("dev-1", "ping", command_id="c1"), T0)
    registry.replies.record(reply(1, "running"), at(1))
    _, notes = queue_command(registry, SendRequest("dev-1", "cancel", "c1", command_id="x1"), at(2))
    assert registry.commands.get("c1").state == "running" and notes[0].startswith("device dev-1 has never")


def test_the_devices_table_shows_the_bridge_counters(registry):
    registry.devices.record_status(online(), T0)
    registry.counters.bump("bad_payloads")
    assert devices_table(registry).splitlines()[-1] == "bad_payloads=1"


def test_watch_shows_streamed_text_as_it_arrives_and_json_lines_for_scripts(registry):
    import json

    from cloud_bridge.console import watch

    registry.devices.record_status(online(), T0)
    registry.chunks.record("dev-1", chunk(0, "Hel", "c9"), T0)  # before watch starts: not shown

    def produce() -> None:
        for index, delta in enumerate(["lo", " wor", "ld"], start=1):
            registry.chunks.record("dev-1", chunk(index, delta, "c9"), at(1))
        registry.replies.record(reply(1, "succeeded", "c9"), at(2))

    text_lines: list[str] = []
    watch(registry, text_lines.append, for_s=0.01, on_ready=produce)
    assert any('stream dev-1 c9 "lo world"' in line for line in text_lines)
    json_lines: list[str] = []
    watch(registry, json_lines.append, for_s=0.01, on_ready=lambda: registry.chunks.record(
        "dev-1", chunk(4, "!", "c9"), at(3)), as_json=True)
    assert json.loads(json_lines[0]) == {
        "type": "stream", "device_id": "dev-1", "command_id": "c9", "first_index": 4, "text": "!",
        "received_at": "2026-11-21T10:00:03.000Z"}
