"""`commands`: building and validating a request, queueing it with its warnings, following a stream,
cancelling (the fan-out by target is in test_api and test_dispatch_loop), on a tmp registry."""

from __future__ import annotations

import pytest

from cloud_bridge.commands import CommandRequest, Follower, build_command, queue_command
from cloud_bridge.console import format_outcome
from cloud_bridge.errors import InvalidRequest

from .factories import T0, at, chunk, mark_sent, offline, online, reply


def test_chat_turns_the_prompt_into_one_user_message():
    request = CommandRequest(target="dev-1", kind="chat", prompt="Hi there", max_tokens=8, seed=3, stream=True)
    cmd = build_command(request, T0)
    assert cmd.params == {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 8, "seed": 3,
                          "stream": True}
    assert cmd.target == "dev-1" and len(cmd.id) == 32


def test_complete_sends_the_prompt_and_cancel_the_target_id():
    complete = CommandRequest(target="dev-1", kind="complete", prompt="Once")
    assert build_command(complete, T0).params == {"prompt": "Once"}
    assert build_command(CommandRequest(target="dev-1", kind="cancel", prompt="abc"), T0).params == {"target": "abc"}


def test_params_json_is_merged_last():
    request = CommandRequest(target="dev-1", kind="complete", prompt="x", temperature=0.5, params={"temperature": 0.1})
    cmd = build_command(request, T0)
    assert cmd.params["temperature"] == 0.1


def test_the_command_expires_after_expires_in_and_keeps_a_given_id():
    cmd = build_command(CommandRequest(target="dev-1", kind="ping", expires_in_s=30, id="job:1"), T0)
    assert cmd.id == "job:1" and (cmd.expires_at - cmd.created_at).total_seconds() == 30


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (CommandRequest(target="dev-1", kind="dance"), "unknown kind 'dance'"),
        (CommandRequest(target="dev-1", kind="chat"), "needs a PROMPT"),
        (CommandRequest(target="dev-1", kind="cancel"), "needs the target command id"),
        (CommandRequest(target="dev-1", kind="ping", prompt="hello"), "takes no PROMPT"),
        (CommandRequest(target="dev-1", kind="chat", prompt="x", temperature=9.0), "temperature"),
        (CommandRequest(target="dev 1", kind="ping"), "device id"),
        (CommandRequest(target="dev-1", kind="ping", id="a b"), "command id"),
        (CommandRequest(target="dev-1", kind="complete", prompt="x", params={"colour": "red"}), "colour"),
    ],
)
def test_invalid_requests_fail_before_anything_is_queued(request_, message):
    with pytest.raises(InvalidRequest, match=message):
        build_command(request_, T0)


def test_queueing_for_a_device_that_never_reported_warns_but_queues(registry):
    row, warnings = queue_command(registry, CommandRequest(target="ghost", kind="ping"), T0)
    assert row.state == "pending"
    assert "never reported status" in warnings[0]


def test_queueing_for_an_offline_device_warns_that_the_session_holds_it(registry):
    registry.devices.record_status(online(), T0)
    registry.devices.record_status(offline(), at(1))
    _, warnings = queue_command(registry, CommandRequest(target="dev-1", kind="ping"), at(2))
    assert "offline" in warnings[0]


def test_queueing_a_kind_the_device_does_not_serve_warns(registry):
    registry.devices.record_status(online(kinds=["ping"]), T0)
    _, warnings = queue_command(registry, CommandRequest(target="dev-1", kind="complete", prompt="x"), at(1))
    assert "does not list kind 'complete'" in warnings[0]


def test_streamed_deltas_are_printed_in_order_and_a_lost_chunk_shows_the_full_text(registry):
    queue_command(registry, CommandRequest(target="dev-1", kind="chat", prompt="hi", id="c1", stream=True), T0)
    printed: list[str] = []
    follower = Follower(registry, "c1")
    registry.chunks.record("dev-1", chunk(0, "Hel"), at(1))
    registry.chunks.record("dev-1", chunk(2, "!"), at(1))
    printed += follower.read()
    assert printed == ["Hel"]
    printed += follower.read(final=True)
    assert printed == ["Hel", "!"] and follower.gaps == 1
    registry.replies.record(reply(1, "succeeded", output={"text": "Hello!", "finish_reason": "stop"}), at(2))
    assert "stream incomplete" in format_outcome(registry.commands.get("c1"), follower.text, follower.gaps)


def test_cancelling_a_command_the_device_never_accepted_stops_its_resends(registry):
    queue_command(registry, CommandRequest(target="dev-1", kind="ping", id="c1"), T0)
    mark_sent(registry, "c1", at(1))
    cancel, notes = queue_command(registry, CommandRequest(target="dev-1", kind="cancel", prompt="c1", id="x1"), at(2))
    assert registry.commands.get("c1").state == "cancelled" and "no longer resent" in notes[0]
    assert cancel.state == "pending" and [r.id for r in registry.commands.active()] == ["x1"]


def test_cancelling_a_command_the_device_accepted_leaves_it_to_the_device(registry):
    queue_command(registry, CommandRequest(target="dev-1", kind="ping", id="c1"), T0)
    registry.replies.record(reply(1, "running"), at(1))
    _, notes = queue_command(registry, CommandRequest(target="dev-1", kind="cancel", prompt="c1", id="x1"), at(2))
    assert registry.commands.get("c1").state == "running" and notes[0].startswith("device dev-1 has never")


def test_a_filter_queues_one_row_per_device_in_one_go_and_a_reused_batch_id_queues_none(registry):
    from cloud_bridge.commands import DeviceFilter, send
    from cloud_bridge.errors import DuplicateCommand

    registry.devices.record_status(online("dev-1"), T0)
    registry.devices.record_status(offline("dev-2"), T0)
    request = CommandRequest(filter=DeviceFilter(device_ids=("dev-1", "dev-2")), kind="ping", id="b1")
    queued = send(registry, request, T0)
    assert [(r.id, r.device_id, r.state, r.batch, r.wire_id) for r in queued.rows] == [
        ("b1.dev-1", "dev-1", "pending", "b1", "b1.dev-1"), ("b1.dev-2", "dev-2", "pending", "b1", "b1.dev-2")]
    assert [registry.commands.get(r.id) for r in queued.rows] == queued.rows, "the rows returned are the rows stored"
    assert any("dev-2 is offline" in w for w in queued.warnings)
    registry.devices.record_status(online("dev-3"), T0)
    again = CommandRequest(filter=DeviceFilter(device_ids=("dev-3", "dev-1")), kind="ping", id="b1")
    with pytest.raises(DuplicateCommand, match="b1.dev-1"):
        send(registry, again, at(1))
    assert registry.commands.recent(device_id="dev-3") == [], "nothing of the refused batch is queued"
