"""Commands in the registry (SQLite and PostgreSQL): queueing, sends, local ends, forward-only states."""

from __future__ import annotations

import pytest

from autoglm_wire.protocol import format_ts
from cloud_bridge.errors import DuplicateCommand, UnknownCommand

from .factories import T0, at, command, mark_sent, offline, online, reply


def test_a_new_command_is_pending_with_no_attempts(registry):
    row = registry.commands.add(command(), "dev-1", T0)
    assert (row.state, row.attempts, row.device_id, row.kind) == ("pending", 0, "dev-1", "ping")
    assert row.payload["id"] == "c1" and row.payload["target"] == "dev-1"
    assert row.expires_at == format_ts(at(3600))


def test_a_command_id_cannot_be_queued_twice(registry):
    registry.commands.add(command(), "dev-1", T0)
    with pytest.raises(DuplicateCommand, match="pick another --id"):
        registry.commands.add(command(), "dev-1", T0)


def test_an_unknown_command_id_says_how_to_list_commands(registry):
    with pytest.raises(UnknownCommand, match="cloud-bridge commands"):
        registry.commands.get("nope")


def test_the_stored_payload_is_exactly_what_gets_published(registry):
    cmd = command(kind="chat", params={"messages": [{"role": "user", "content": "hi"}]})
    row = registry.commands.add(cmd, "dev-1", T0)
    assert row.raw_payload == cmd.model_dump_json(by_alias=True)


def test_each_send_counts_an_attempt_and_keeps_the_command_sent(registry):
    registry.commands.add(command(), "dev-1", T0)
    assert mark_sent(registry, "c1", at(1))
    assert mark_sent(registry, "c1", at(6))
    row = registry.commands.get("c1")
    assert (row.state, row.attempts, row.last_sent_at) == ("sent", 2, format_ts(at(6)))


def test_a_send_after_the_device_accepted_is_refused(registry):
    registry.commands.add(command(), "dev-1", T0)
    registry.replies.record(reply(1, "accepted"), at(1))
    assert not mark_sent(registry, "c1", at(2))
    assert registry.commands.get("c1").attempts == 0


def test_expiry_records_the_expired_error_code(registry):
    registry.commands.add(command(), "dev-1", T0)
    assert registry.commands.mark_expired("c1", "no `accepted` before expires_at", at(3601))
    row = registry.commands.get("c1")
    assert row.state == "expired" and row.error == {"code": "expired", "message": "no `accepted` before expires_at"}


def test_expiry_does_not_override_a_device_reply(registry):
    registry.commands.add(command(), "dev-1", T0)
    registry.replies.record(reply(1, "running"), at(1))
    assert not registry.commands.mark_expired("c1", "late", at(3601))
    assert registry.commands.get("c1").state == "running"


def test_active_commands_are_only_pending_and_sent(registry):
    for cid in ("a", "b", "c"):
        registry.commands.add(command(cid), "dev-1", T0)
    mark_sent(registry, "b", at(1))
    registry.replies.record(reply(1, "accepted", command_id="c"), at(1))
    assert [r.id for r in registry.commands.active()] == ["a", "b"]


def test_of_two_replicas_claiming_the_same_send_exactly_one_wins(registry):
    row = registry.commands.add(command(), "dev-1", T0)
    assert registry.commands.claim_sends([row], at(1)) == {row.id}
    assert registry.commands.claim_sends([row], at(1)) == set()  # the other replica read the same row
    assert registry.commands.get(row.id).attempts == 1


def test_one_statement_claims_a_pass_of_sends_and_skips_what_changed_since_it_was_read(registry):
    rows = [registry.commands.add(command(f"c{i}"), "dev-1", T0) for i in range(5)]
    registry.replies.record(reply(1, "accepted", command_id="c1"), at(1))  # the device took it meanwhile
    mark_sent(registry, "c2", at(1))  # another replica sent it meanwhile
    assert registry.commands.claim_sends(rows, at(2)) == {"c0", "c3", "c4"}
    assert [(r.id, r.state, r.attempts) for r in (registry.commands.get(f"c{i}") for i in range(5))] == [
        ("c0", "sent", 1), ("c1", "accepted", 0), ("c2", "sent", 1), ("c3", "sent", 1), ("c4", "sent", 1)]
    assert registry.commands.get("c0").last_sent_at == format_ts(at(2))


def test_more_claims_than_one_statement_holds_are_all_claimed(registry):
    rows = [registry.commands.add(command(f"c{i:04d}"), "dev-1", T0) for i in range(1203)]
    assert len(registry.commands.claim_sends(rows, at(1))) == 1203


def test_due_reads_pending_and_sends_whose_resend_or_expiry_has_come(registry):
    registry.devices.record_status(online("dev-1"), T0)
    registry.devices.record_status(offline("dev-2"), T0)
    registry.commands.add(command("new"), "dev-1", T0)
    registry.commands.add(command("waiting"), "dev-1", T0)
    registry.commands.add(command("resend"), "dev-1", T0)
    registry.commands.add(command("away", device_id="dev-2"), "dev-2", T0)
    registry.commands.add(command("late", expires_in_s=30, device_id="dev-2"), "dev-2", T0)
    registry.commands.add(command("unknown-device", device_id="dev-3"), "dev-3", T0)
    registry.commands.add(command("taken"), "dev-1", T0)
    mark_sent(registry, "waiting", at(25))
    for cid in ("resend", "away", "late", "unknown-device"):
        mark_sent(registry, cid, at(20))
    registry.replies.record(reply(1, "accepted", command_id="taken"), at(1))
    due = registry.commands.due(at(30), resend_interval_s=10)
    assert sorted((row.id, state) for row, state in due) == [
        ("late", "offline"), ("new", "online"), ("resend", "online"), ("unknown-device", None)]
    assert {row.id for row, _ in registry.commands.due(at(35), resend_interval_s=10)} == {
        "new", "waiting", "resend", "late", "unknown-device"}


@pytest.mark.parametrize("reports", [["accepted"], ["running"], ["succeeded"], ["accepted", "running", "failed"]])
def test_the_bridge_expiry_is_provisional_and_the_device_reports_win(registry, reports):
    """Issue #13: the device may have run a copy sent before the bridge gave up; the record must not
    say `expired` for work that ran."""
    registry.commands.add(command(), "dev-1", T0)
    mark_sent(registry, "c1", at(1))
    assert registry.commands.mark_expired("c1", "no `accepted` before expires_at", at(3601))
    for seq, status in enumerate(reports, start=1):
        error = {"code": "model_error", "message": "boom"} if status == "failed" else None
        registry.replies.record(reply(seq, status, error=error), at(3601 + seq))
    row = registry.commands.get("c1")
    assert row.state == reports[-1]
    assert row.error == (None if reports[-1] != "failed" else {"code": "model_error", "message": "boom"})
    assert not mark_sent(registry, "c1", at(3700)), "a command the device reported on is not resent"


def test_the_device_own_expired_reply_is_final(registry):
    registry.commands.add(command(), "dev-1", T0)
    registry.replies.record(reply(1, "expired", error={"code": "expired", "message": "too late"}), at(1))
    registry.replies.record(reply(2, "running"), at(2))
    assert registry.commands.get("c1").state == "expired"
