"""The registry on a real SQLite file: dedupe, forward-only states, devices, shared access."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_wire.lifecycle import is_terminal, rank
from autoglm_wire.protocol import Event, Telemetry, format_ts
from cloud_bridge.errors import BridgeError, DuplicateCommand, RegistryMissing, UnknownCommand
from cloud_bridge.registry import Registry

from .factories import T0, at, chunk, command, offline, online, reply


def test_a_new_command_is_pending_with_no_attempts(registry):
    row = registry.add_command(command(), "dev-1", T0)
    assert (row.state, row.attempts, row.device_id, row.kind) == ("pending", 0, "dev-1", "ping")
    assert row.payload["id"] == "c1" and row.payload["target"] == "dev-1"
    assert row.expires_at == format_ts(at(3600))


def test_a_command_id_cannot_be_queued_twice(registry):
    registry.add_command(command(), "dev-1", T0)
    with pytest.raises(DuplicateCommand, match="pick another --id"):
        registry.add_command(command(), "dev-1", T0)


def test_an_unknown_command_id_says_how_to_list_commands(registry):
    with pytest.raises(UnknownCommand, match="cloud-bridge commands"):
        registry.command("nope")


def test_the_stored_payload_is_exactly_what_gets_published(registry):
    cmd = command(kind="chat", params={"messages": [{"role": "user", "content": "hi"}]})
    row = registry.add_command(cmd, "dev-1", T0)
    assert row.raw_payload == cmd.model_dump_json(by_alias=True)


def test_each_send_counts_an_attempt_and_keeps_the_command_sent(registry):
    registry.add_command(command(), "dev-1", T0)
    assert registry.mark_sent("c1", at(1))
    assert registry.mark_sent("c1", at(6))
    row = registry.command("c1")
    assert (row.state, row.attempts, row.last_sent_at) == ("sent", 2, format_ts(at(6)))


def test_a_reply_moves_the_command_forward_and_the_terminal_reply_is_kept(registry):
    registry.add_command(command(), "dev-1", T0)
    registry.mark_sent("c1", at(1))
    assert registry.record_reply(reply(1, "accepted"), at(2))
    assert registry.command("c1").state == "accepted"
    assert registry.record_reply(reply(2, "succeeded", output={"pong": True}), at(3))
    row = registry.command("c1")
    assert row.state == "succeeded" and row.reply["output"] == {"pong": True} and row.error is None


def test_a_late_accepted_after_succeeded_does_not_regress_the_state(registry):
    registry.add_command(command(), "dev-1", T0)
    registry.record_reply(reply(2, "succeeded", output={"pong": True}), at(2))
    registry.record_reply(reply(1, "accepted"), at(3))
    row = registry.command("c1")
    assert row.state == "succeeded" and row.reply["seq"] == 2
    assert len(registry.replies("c1")) == 2


def test_the_first_terminal_status_is_final(registry):
    registry.add_command(command(), "dev-1", T0)
    registry.record_reply(reply(1, "cancelled", error={"code": "cancelled", "message": "by operator"}), at(1))
    registry.record_reply(reply(2, "succeeded"), at(2))
    row = registry.command("c1")
    assert row.state == "cancelled" and row.error["code"] == "cancelled"


def test_a_duplicate_reply_is_stored_once_and_counted(registry):
    registry.add_command(command(), "dev-1", T0)
    assert registry.record_reply(reply(1, "accepted"), at(1))
    assert not registry.record_reply(reply(1, "accepted"), at(2))
    assert len(registry.replies("c1")) == 1
    assert registry.counters()["duplicate_replies"] == 1


def test_the_same_seq_from_two_devices_is_two_replies(registry):
    registry.record_reply(reply(1, "accepted", device_id="dev-1"), at(1))
    registry.record_reply(reply(1, "accepted", device_id="dev-2"), at(1))
    assert len(registry.replies("c1")) == 2


def test_a_reply_from_another_device_does_not_touch_the_command(registry):
    registry.add_command(command(), "dev-1", T0)
    registry.record_reply(reply(1, "succeeded", device_id="dev-2"), at(1))
    assert registry.command("c1").state == "pending"


def test_a_reply_without_command_id_is_stored(registry):
    assert registry.record_reply(reply(1, "rejected", command_id=None,
                                       error={"code": "bad_json", "message": "not JSON"}), at(1))
    assert [r.status for r in registry.replies_after(0)] == ["rejected"]


def test_a_send_after_the_device_accepted_is_refused(registry):
    registry.add_command(command(), "dev-1", T0)
    registry.record_reply(reply(1, "accepted"), at(1))
    assert not registry.mark_sent("c1", at(2))
    assert registry.command("c1").attempts == 0


def test_expiry_records_the_expired_error_code(registry):
    registry.add_command(command(), "dev-1", T0)
    assert registry.mark_expired("c1", "no `accepted` before expires_at", at(3601))
    row = registry.command("c1")
    assert row.state == "expired" and row.error == {"code": "expired", "message": "no `accepted` before expires_at"}


def test_expiry_does_not_override_a_device_reply(registry):
    registry.add_command(command(), "dev-1", T0)
    registry.record_reply(reply(1, "running"), at(1))
    assert not registry.mark_expired("c1", "late", at(3601))
    assert registry.command("c1").state == "running"


def test_active_commands_are_only_pending_and_sent(registry):
    for cid in ("a", "b", "c"):
        registry.add_command(command(cid), "dev-1", T0)
    registry.mark_sent("b", at(1))
    registry.record_reply(reply(1, "accepted", command_id="c"), at(1))
    assert [r.id for r in registry.active_commands()] == ["a", "b"]


def test_stream_chunks_are_deduplicated_by_command_and_index(registry):
    assert registry.record_chunk("dev-1", chunk(0, "Hel"), at(1))
    assert registry.record_chunk("dev-1", chunk(1, "lo"), at(1))
    assert not registry.record_chunk("dev-1", chunk(1, "lo"), at(2))
    assert [c.delta for c in registry.chunks("c1")] == ["Hel", "lo"]
    assert registry.counters()["duplicate_chunks"] == 1


def test_an_online_status_records_the_device_identity(registry):
    assert registry.record_status(online(), at(1))
    device = registry.device("dev-1")
    assert (device.state, device.since, device.last_seen) == ("online", format_ts(at(1)), format_ts(at(1)))
    assert (device.model_name, device.model_sha256, device.n_gpu_layers) == ("glm-4-tiny", "ab" * 32, 0)
    assert device.groups == ["lab"] and "chat" in device.kinds and device.agent_version == "0.1.0"


def test_the_last_will_marks_the_device_offline_and_keeps_its_identity(registry):
    registry.record_status(online(), at(1))
    assert registry.record_status(offline(), at(5))
    device = registry.device("dev-1")
    assert (device.state, device.since, device.model_name) == ("offline", format_ts(at(5)), "glm-4-tiny")
    assert device.last_seen == format_ts(at(1))


def test_a_repeated_status_is_not_a_state_change(registry):
    registry.record_status(online(), at(1))
    assert not registry.record_status(online(), at(2))
    assert registry.device("dev-1").since == format_ts(at(1))
    assert [c.state for c in registry.device_states_after(0)] == ["online"]


def test_a_retained_status_replay_is_not_counted_as_seeing_the_device(registry):
    registry.record_status(online(), at(100), retained=True)
    device = registry.device("dev-1")
    assert device.last_seen is None and device.since == format_ts(T0)


def test_telemetry_and_events_are_kept(registry):
    telemetry = Telemetry(device_id="dev-1", ts=format_ts(T0), queue_depth=1, outbox_depth=0, outbox_bytes=0,
                          tokens_per_s_ewma=12.5, rss_mb=300.0, gpu_layers=0, uptime_s=5.0)
    registry.record_telemetry(telemetry, at(1))
    registry.record_event(Event(device_id="dev-1", ts=format_ts(T0), level="warning", code="disk_low",
                                message="5% free", data={"free": 5}), at(1))
    assert registry.device("dev-1").last_telemetry["tokens_per_s_ewma"] == 12.5
    assert [(e.code, e.data) for e in registry.events_after(0)] == [("disk_low", {"free": 5})]


def test_the_console_does_not_create_a_missing_registry(tmp_path):
    with pytest.raises(RegistryMissing, match="is `cloud-bridge serve` running with this config"):
        Registry.open(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()


def test_two_connections_share_the_file(tmp_path):
    serve_side = Registry.open(tmp_path / "r.db")
    console_side = Registry.open(tmp_path / "r.db", create=False)
    try:
        console_side.add_command(command(), "dev-1", T0)
        assert [r.id for r in serve_side.active_commands()] == ["c1"]
        serve_side.record_reply(reply(1, "succeeded"), at(1))
        assert console_side.command("c1").state == "succeeded"
    finally:
        serve_side.close()
        console_side.close()


def test_a_failed_batch_writes_nothing(registry):
    with pytest.raises(RuntimeError):
        with registry.transaction():
            registry.record_reply(reply(1, "accepted"), at(1))
            raise RuntimeError("disk on fire")
    assert registry.replies_after(0) == []


def test_a_new_registry_is_in_wal_mode_and_leaves_no_staging_file(tmp_path):
    Registry.open(tmp_path / "r.db").close()
    conn = sqlite3.connect(tmp_path / "r.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("r.db")) == []


def test_another_programs_database_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE inbox (id TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(BridgeError, match="not a cloud-bridge registry"):
        Registry.open(tmp_path / "other.db")


STATUSES = ["accepted", "running", "succeeded", "failed", "rejected", "expired", "cancelled"]


@settings(max_examples=60, deadline=None)
@given(statuses=st.lists(st.sampled_from(STATUSES), min_size=1, max_size=8))
def test_any_order_of_replies_never_moves_a_command_backward(tmp_path_factory, statuses):
    reg = Registry.open(tmp_path_factory.mktemp("prop") / "r.db")
    try:
        reg.add_command(command(), "dev-1", T0)
        seen = ["pending"]
        for seq, status in enumerate(statuses, start=1):
            reg.record_reply(reply(seq, status), at(seq))
            seen.append(reg.command("c1").state)
        ranks = [rank(s) for s in seen]
        assert ranks == sorted(ranks)
        first_terminal = next((s for s in statuses if is_terminal(s)), None)
        assert seen[-1] == (first_terminal or max(statuses, key=rank))
    finally:
        reg.close()


def test_a_version_1_registry_is_upgraded_in_place_and_keeps_its_rows(tmp_path):
    from cloud_bridge.registry import SCHEMA_VERSION

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE devices (device_id TEXT PRIMARY KEY, state TEXT, since TEXT, last_seen TEXT, agent_version TEXT,"
        " model_name TEXT, model_sha256 TEXT, n_gpu_layers INTEGER, groups TEXT, kinds TEXT, last_telemetry TEXT);"
        "CREATE TABLE commands (id TEXT PRIMARY KEY, device_id TEXT NOT NULL, kind TEXT NOT NULL,"
        " payload TEXT NOT NULL,"
        " state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,"
        " expires_at TEXT, last_sent_at TEXT, updated_at TEXT NOT NULL, reply TEXT, error TEXT);"
        "CREATE TABLE stream_chunks (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, command_id TEXT NOT NULL,"
        " idx INTEGER NOT NULL, delta TEXT NOT NULL, done INTEGER NOT NULL, received_at TEXT NOT NULL,"
        " UNIQUE (command_id, idx));"
        "INSERT INTO stream_chunks VALUES (1, 'old-gw', 'c0', 0, 'hi', 1, '2026-11-21T10:00:00.000Z');"
        "INSERT INTO devices (device_id, state) VALUES ('old-gw', 'online');"
        "PRAGMA user_version = 1;"
    )
    conn.close()
    registry = Registry.open(path)
    try:
        assert registry.device("old-gw").state == "online" and registry.device("old-gw").policy is None
        assert registry.add_command(command(), "old-gw", T0).priority == 0
        assert registry.alerts() == [] and registry.chunks_after(0)[0].delta == "hi"
        assert registry._sqlite().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        registry.close()


def test_of_two_replicas_claiming_the_same_send_exactly_one_wins(registry):
    row = registry.add_command(command(), "dev-1", T0)
    assert registry.mark_sent(row.id, at(1), claim=row) is True
    assert registry.mark_sent(row.id, at(1), claim=row) is False  # the other replica read the same row
    assert registry.command(row.id).attempts == 1


# --- retention -----------------------------------------------------------------------------------


def _event(n: int) -> Event:
    return Event(device_id="dev-1", ts=format_ts(T0), level="info", code="tick", message=f"tick {n}", data={})


def test_prune_deletes_what_is_finished_and_old_and_keeps_what_is_active_or_recent(registry):
    registry.record_status(online(), at(0))
    registry.add_command(command("old-done"), "dev-1", T0)
    registry.record_reply(reply(1, "accepted", "old-done"), at(1))
    registry.record_reply(reply(2, "succeeded", "old-done", output={"pong": True}), at(2))
    registry.add_command(command("old-running"), "dev-1", T0)
    registry.record_reply(reply(3, "running", "old-running"), at(3))
    registry.record_chunk("dev-1", chunk(0, "partial", "old-running"), at(4))
    registry.record_event(_event(0), at(5))
    registry.raise_alert("dev-1", "offline", "gone", at(6))
    registry.clear_alert("dev-1", "offline", at(7))
    registry.raise_alert("dev-1", "error_rate", "still failing", at(8))
    registry.add_command(command("new-done"), "dev-1", at(100))
    registry.record_reply(reply(4, "succeeded", "new-done", output={"pong": True}), at(101))
    registry.record_chunk("dev-1", chunk(0, "fresh", "new-done"), at(101))

    deleted = registry.prune(before=at(50), chunks_before=at(50))

    assert deleted == {"stream_chunks": 1, "commands": 1, "replies": 2, "events": 1, "alerts": 1, "device_states": 1}
    with pytest.raises(UnknownCommand):
        registry.command("old-done")
    assert registry.command("old-running").state == "running"
    assert [r.seq for r in registry.replies("old-running")] == [3], "an active command keeps its replies"
    assert registry.command("new-done").state == "succeeded" and [r.seq for r in registry.replies("new-done")] == [4]
    assert [c.delta for c in registry.chunks("new-done")] == ["fresh"]
    assert registry.device("dev-1").state == "online", "the device's current state is not history"
    assert registry.prune(before=at(50), chunks_before=at(50)) == dict.fromkeys(deleted, 0)


def test_prune_works_in_batches_until_nothing_old_is_left(registry):
    for n in range(7):
        registry.record_event(_event(n), at(n))
    assert registry.prune(before=at(5), chunks_before=None, batch=2) == {
        "commands": 0, "replies": 0, "events": 5, "alerts": 0, "device_states": 0}
    assert [e.message for e in registry.events_after(0)] == ["tick 5", "tick 6"]


def test_prune_with_no_cutoffs_deletes_nothing(registry):
    registry.record_event(_event(0), at(0))
    assert registry.prune(before=None, chunks_before=None) == {}
    assert len(registry.events_after(0)) == 1
