"""Replies and stream chunks in the registry: dedupe, and replies only moving a command forward."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_wire.lifecycle import is_illegal_after, rank, rejectable
from cloud_bridge.store.registry import Registry

from .factories import T0, at, chunk, command, mark_sent, reply


def test_a_reply_moves_the_command_forward_and_the_terminal_reply_is_kept(registry):
    registry.commands.add(command(), "dev-1", T0)
    mark_sent(registry, "c1", at(1))
    assert registry.replies.record(reply(1, "accepted"), at(2))
    assert registry.commands.get("c1").state == "accepted"
    assert registry.replies.record(reply(2, "succeeded", output={"pong": True}), at(3))
    row = registry.commands.get("c1")
    assert row.state == "succeeded" and row.reply["output"] == {"pong": True} and row.error is None


def test_a_late_accepted_after_succeeded_does_not_regress_the_state(registry):
    registry.commands.add(command(), "dev-1", T0)
    registry.replies.record(reply(2, "succeeded", output={"pong": True}), at(2))
    registry.replies.record(reply(1, "accepted"), at(3))
    row = registry.commands.get("c1")
    assert row.state == "succeeded" and row.reply["seq"] == 2
    assert len(registry.replies.of_command("c1")) == 2


def test_the_first_terminal_status_is_final(registry):
    registry.commands.add(command(), "dev-1", T0)
    registry.replies.record(reply(1, "cancelled", error={"code": "cancelled", "message": "by operator"}), at(1))
    registry.replies.record(reply(2, "succeeded"), at(2))
    row = registry.commands.get("c1")
    assert row.state == "cancelled" and row.error["code"] == "cancelled"


def test_a_terminal_state_after_another_one_is_counted_as_illegal(registry):
    registry.commands.add(command(), "dev-1", T0)
    registry.replies.record(reply(1, "succeeded"), at(1))
    registry.replies.record(reply(2, "failed", error={"code": "internal", "message": "x"}), at(2))
    registry.replies.record(reply(3, "running"), at(3))  # late, out of order: not illegal
    assert registry.commands.get("c1").state == "succeeded"
    assert registry.counters.all()["illegal_transitions"] == 1


def test_rejected_after_the_device_accepted_is_ignored_and_counted(registry):
    registry.commands.add(command(), "dev-1", T0)
    mark_sent(registry, "c1", at(1))
    registry.replies.record(reply(1, "accepted"), at(2))
    registry.replies.record(reply(2, "rejected", error={"code": "unauthorized", "message": "unsigned"}), at(3))
    row = registry.commands.get("c1")
    assert row.state == "accepted" and row.error is None
    assert registry.counters.all()["illegal_transitions"] == 1
    registry.replies.record(reply(3, "succeeded", output={"pong": True}), at(4))
    assert registry.commands.get("c1").state == "succeeded"


def test_rejected_before_acceptance_is_recorded_and_not_counted(registry):
    registry.commands.add(command(), "dev-1", T0)
    mark_sent(registry, "c1", at(1))
    registry.replies.record(reply(1, "rejected", error={"code": "unauthorized", "message": "unsigned"}), at(2))
    assert registry.commands.get("c1").state == "rejected"
    assert "illegal_transitions" not in registry.counters.all()


def test_a_duplicate_reply_is_stored_once_and_counted(registry):
    registry.commands.add(command(), "dev-1", T0)
    assert registry.replies.record(reply(1, "accepted"), at(1))
    assert not registry.replies.record(reply(1, "accepted"), at(2))
    assert len(registry.replies.of_command("c1")) == 1
    assert registry.counters.all()["duplicate_replies"] == 1


def test_the_same_seq_from_two_devices_is_two_replies(registry):
    registry.replies.record(reply(1, "accepted", device_id="dev-1"), at(1))
    registry.replies.record(reply(1, "accepted", device_id="dev-2"), at(1))
    assert len(registry.replies.of_command("c1")) == 2


def test_a_reply_from_another_device_does_not_touch_the_command(registry):
    registry.commands.add(command(), "dev-1", T0)
    registry.replies.record(reply(1, "succeeded", device_id="dev-2"), at(1))
    assert registry.commands.get("c1").state == "pending"


def test_a_reply_without_command_id_is_stored(registry):
    assert registry.replies.record(reply(1, "rejected", command_id=None,
                                       error={"code": "bad_json", "message": "not JSON"}), at(1))
    assert [r.status for r in registry.feeds.replies(0)] == ["rejected"]


def test_stream_chunks_are_deduplicated_by_command_and_index(registry):
    assert registry.chunks.record("dev-1", chunk(0, "Hel"), at(1))
    assert registry.chunks.record("dev-1", chunk(1, "lo"), at(1))
    assert not registry.chunks.record("dev-1", chunk(1, "lo"), at(2))
    assert [c.delta for c in registry.chunks.of_command("c1")] == ["Hel", "lo"]
    assert registry.counters.all()["duplicate_chunks"] == 1


STATUSES = ["accepted", "running", "succeeded", "failed", "rejected", "expired", "cancelled"]


@settings(max_examples=60, deadline=None)
@given(statuses=st.lists(st.sampled_from(STATUSES), min_size=1, max_size=8))
def test_any_order_of_replies_never_moves_a_command_backward(tmp_path_factory, statuses):
    reg = Registry.open(tmp_path_factory.mktemp("prop") / "r.db")
    try:
        reg.commands.add(command(), "dev-1", T0)
        seen = ["pending"]
        for seq, status in enumerate(statuses, start=1):
            reg.replies.record(reply(seq, status), at(seq))
            seen.append(reg.commands.get("c1").state)
        ranks = [rank(s) for s in seen]
        assert ranks == sorted(ranks)
        expected = "pending"  # forward only; `rejected` only before the device accepted
        for status in statuses:
            if rank(expected) < rank(status) and (status != "rejected" or rejectable(expected)):
                expected = status
        assert seen[-1] == expected
        illegal = sum(is_illegal_after(before, status) for before, status in zip(seen, statuses, strict=False))
        assert reg.counters.all().get("illegal_transitions", 0) == illegal
    finally:
        reg.close()


def test_a_local_commands_terminal_reply_records_the_command_with_origin_local(registry):
    marks = {"origin": "local", "kind": "chat", "ttft_ms": 1.0}
    assert registry.replies.record(reply(1, "running", command_id="local-1"), at(1))
    assert registry.commands.recent() == []  # recorded at its terminal reply, which carries the marks
    assert registry.replies.record(reply(2, "succeeded", command_id="local-1", output={"text": "hi"},
                                         metrics=marks), at(2))
    row = registry.commands.get("local-1")
    assert (row.device_id, row.kind, row.state) == ("dev-1", "chat", "succeeded")
    assert row.payload["origin"] == "local" and row.reply["output"] == {"text": "hi"}
    assert [r.status for r in registry.replies.of_command("local-1")] == ["running", "succeeded"]


def test_a_reply_marked_local_never_rewrites_a_command_the_bridge_sent(registry):
    registry.commands.add(command(), "dev-1", T0)
    mark_sent(registry, "c1", at(1))
    registry.replies.record(reply(1, "succeeded", metrics={"origin": "local", "kind": "complete"}), at(2))
    row = registry.commands.get("c1")
    assert row.kind == command().kind and "origin" not in row.payload and row.state == "succeeded"


def test_an_unmarked_reply_for_an_unknown_command_creates_no_command(registry):
    registry.replies.record(reply(1, "succeeded", command_id="nobody-sent-this"), at(1))
    assert registry.commands.recent() == []
