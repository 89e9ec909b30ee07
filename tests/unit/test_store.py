"""The device's SQLite store: command ledger, outbox, reply sequence — on a real file in tmp_path."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from autoglm_wire.errors import BadJson, InvalidCommand
from autoglm_wire.lifecycle import State
from autoglm_wire.protocol import ErrorInfo, Event, format_ts, utc_now
from autoglm_wire.topics import DeviceTopics
from edge_agent.agent import Agent
from edge_agent.store import OutboxRow, ReplyDraft, Store, StoreError, StoreFull

TOPICS = DeviceTopics("autoglm", "d1")
REPLY = "autoglm/d1/reply"
EVENT = "autoglm/d1/event"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "edge.db"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    opened = Store(path, TOPICS)
    yield opened
    opened.close()


def accept(store: Store, command_id: str = "c1", priority: int = 0, **kwargs: Any) -> Any:
    payload = json.dumps({"v": 1, "id": command_id, "kind": "ping"})
    return store.accept(command_id, "ping", payload, priority, kwargs.pop("expires_at", None), **kwargs)


def rows(store: Store) -> list[OutboxRow]:
    return store.pending(after_id=0, limit=10_000)


def body(row: OutboxRow) -> dict[str, Any]:
    return json.loads(row.payload)


def replies(store: Store) -> list[dict[str, Any]]:
    return [body(r) for r in rows(store) if r.topic == REPLY]


def event(code: str = "bad_json") -> Event:
    return Event(device_id="d1", ts=format_ts(utc_now()), level="error", code=code, message="rejected a payload")


# --- accept --------------------------------------------------------------------------------------


def test_accept_stores_the_command_as_accepted(store: Store) -> None:
    intake = accept(store, "c1", priority=3, expires_at=1234.5)
    assert (intake.duplicate, intake.state) == (False, "accepted")
    stored = store.get("c1")
    assert stored is not None
    assert (stored.kind, stored.priority, stored.state, stored.expires_at) == ("ping", 3, "accepted", 1234.5)
    assert json.loads(stored.payload)["id"] == "c1"


def test_accept_enqueues_an_accepted_reply_with_seq_1(store: Store) -> None:
    accept(store, "c1")
    [row] = rows(store)
    assert row.topic == REPLY
    assert row.qos == 1
    assert row.retain is False
    reply = body(row)
    assert reply["v"] == 1
    assert (reply["command_id"], reply["device_id"], reply["status"], reply["seq"]) == ("c1", "d1", "accepted", 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", reply["ts"])


def test_the_stored_last_reply_is_the_enqueued_reply(store: Store) -> None:
    accept(store, "c1")
    stored = store.get("c1")
    assert stored is not None and stored.last_reply == rows(store)[0].payload


def test_a_duplicate_accept_stores_no_second_command_and_resends_the_same_reply(store: Store) -> None:
    assert not store.known("c1")
    accept(store, "c1")
    assert store.known("c1") and not store.known("c2")
    again = store.accept("c1", "complete", '{"changed": true}', 9, None)
    assert (again.duplicate, again.state) == (True, "accepted")
    assert store.count_in_state("accepted") == 1
    stored = store.get("c1")
    assert stored is not None and (stored.kind, stored.priority) == ("ping", 0), "the first delivery wins"
    first, second = rows(store)
    assert first.payload == second.payload
    assert body(second)["seq"] == 1


def test_a_duplicate_of_a_finished_command_resends_its_terminal_reply(store: Store) -> None:
    accept(store, "c1")
    store.transition("c1", "running", ReplyDraft(status="running"))
    store.transition("c1", "succeeded", ReplyDraft(status="succeeded", output={"pong": True}))
    terminal = rows(store)[-1].payload
    again = accept(store, "c1")
    assert (again.duplicate, again.state) == (True, "succeeded")
    assert rows(store)[-1].payload == terminal
    assert [r["status"] for r in replies(store)] == ["accepted", "running", "succeeded", "succeeded"]


# --- transition ----------------------------------------------------------------------------------


def test_a_transition_moves_the_state_and_enqueues_the_reply_announcing_it(store: Store) -> None:
    accept(store, "c1")
    assert store.transition("c1", "running", ReplyDraft(status="running")) is True
    assert store.get("c1").state == "running"  # type: ignore[union-attr]
    reply = replies(store)[-1]
    assert (reply["status"], reply["seq"]) == ("running", 2)


def test_a_transition_with_only_from_refuses_from_any_other_state(store: Store) -> None:
    accept(store, "c1")
    before = rows(store)
    moved = store.transition("c1", "succeeded", ReplyDraft(status="succeeded"), only_from={"running"})
    assert moved is False
    assert store.get("c1").state == "accepted"  # type: ignore[union-attr]
    assert rows(store) == before, "a refused transition enqueues nothing"


def test_a_transition_with_only_from_goes_ahead_from_a_listed_state(store: Store) -> None:
    accept(store, "c1")
    assert store.transition("c1", "running", ReplyDraft(status="running"), only_from=["accepted"]) is True
    assert store.transition("c1", "running", ReplyDraft(status="running"), only_from=["accepted"]) is False


def test_a_claim_moves_an_accepted_command_to_running_once(store: Store) -> None:
    intake = accept(store, "c1")
    assert intake.command is not None and intake.command.state == "accepted" and intake.command.id == "c1"
    assert store.claim("c1") is True
    assert store.claim("c1") is False, "a second claim of the same command must lose"
    stored = store.get("c1")
    assert stored is not None and stored.state == "running"
    assert [r["status"] for r in replies(store)] == ["accepted", "running"]


def test_intake_and_claim_commit_without_fsync_and_sync_fsyncs_the_wal_once_each(
        store: Store, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    store.sync()
    assert synced == [], "nothing to sync in a fresh store"
    accept(store, "c1")
    store.sync()
    store.sync()
    assert synced == [f"{path}-wal"], "the accept is synced once"
    store.claim("c1")
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2, "back to FULL after the claim"
    store.sync()
    assert synced == [f"{path}-wal"] * 2
    store.transition("c1", State.SUCCEEDED, ReplyDraft(status="succeeded"))
    store.sync()
    assert len(synced) == 2, "a terminal reply is fsynced by its own commit"


def test_an_accept_with_claim_stores_the_command_running_with_both_replies_in_one_unsynced_commit(
        store: Store, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    intake = accept(store, "c1", claim=True)
    assert synced == [], "the intake commit skips its fsync"
    assert intake.state == "running" and intake.command.state == "running"
    assert store.get("c1").state == "running"  # type: ignore[union-attr]
    assert [(r["status"], r["seq"]) for r in replies(store)] == [("accepted", 1), ("running", 2)]
    assert store.claim("c1") is False, "already claimed: nobody else can run it"
    store.sync()
    assert synced == [f"{path}-wal"], "one fsync makes both durable"


def test_an_accept_with_claim_of_a_duplicate_claims_nothing_and_resends_the_last_reply(store: Store) -> None:
    accept(store, "c1")
    intake = accept(store, "c1", claim=True)
    assert intake.duplicate and intake.state == "accepted"
    assert store.get("c1").state == "accepted"  # type: ignore[union-attr]
    assert [r["status"] for r in replies(store)] == ["accepted", "accepted"]


def test_deleting_acked_rows_commits_without_fsync_and_leaves_nothing_for_the_next_sync(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    accept(store, "c1")
    store.sync()
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    store.delete_outbox([row.id for row in rows(store)])
    store.db.conn.set_trace_callback(None)
    store.sync()
    assert synced == [] and rows(store) == []
    deletes = [i for i, s in enumerate(statements) if s.startswith("DELETE FROM outbox")]
    assert deletes and statements.index("PRAGMA synchronous=NORMAL") < deletes[0] < \
        statements.index("PRAGMA synchronous=FULL"), statements


def test_with_synchronous_normal_a_claim_leaves_nothing_for_sync(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    normal = Store(path, TOPICS, synchronous="normal")
    try:
        accept(normal, "c1")
        assert normal.claim("c1") is True
        normal.sync()
        assert synced == [] and normal.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        normal.close()


def test_a_failure_reply_carries_the_error_code_and_message(store: Store) -> None:
    accept(store, "c1")
    store.transition("c1", "failed", ReplyDraft.failure("failed", InvalidCommand("no model", "c1")))
    assert replies(store)[-1]["error"] == {"code": "invalid_command", "message": "no model"}


def test_a_transition_of_an_unknown_command_is_a_store_error(store: Store) -> None:
    with pytest.raises(StoreError, match="nope"):
        store.transition("nope", "running", ReplyDraft(status="running"))


# --- seq -----------------------------------------------------------------------------------------


def test_seq_strictly_increases_across_close_and_reopen(path: Path) -> None:
    first = Store(path, TOPICS)
    accept(first, "c1")
    first.transition("c1", "running", ReplyDraft(status="running"))
    accept(first, "c2")
    first.close()
    second = Store(path, TOPICS)
    accept(second, "c3")
    second.transition("c1", "succeeded", ReplyDraft(status="succeeded"))
    seqs = [r["seq"] for r in replies(second)]
    second.close()
    assert seqs == [1, 2, 3, 4, 5]


def test_the_outbox_survives_close_and_reopen(path: Path) -> None:
    first = Store(path, TOPICS)
    accept(first, "c1")
    kept = rows(first)
    first.close()
    second = Store(path, TOPICS)
    assert rows(second) == kept
    assert second.get("c1") is not None
    second.close()


def _age(store: Store, command_id: str, seconds: float) -> None:
    store.db.execute("UPDATE commands SET updated_at = updated_at - ? WHERE id = ?", [seconds, command_id])


def test_forget_finished_deletes_only_finished_commands_changed_before_the_cutoff(store: Store) -> None:
    for command_id in ("old-done", "old-failed", "old-running", "old-queued", "new-done"):
        accept(store, command_id)
    finished = (("old-done", State.SUCCEEDED), ("old-failed", State.FAILED), ("new-done", State.SUCCEEDED))
    for command_id, state in finished:
        store.claim(command_id)
        store.transition(command_id, state, ReplyDraft(status=state.value))
    store.claim("old-running")
    for command_id in ("old-done", "old-failed", "old-running", "old-queued"):
        _age(store, command_id, 8 * 86400)
    outbox_before = rows(store)

    assert store.forget_finished(time.time() - 7 * 86400, batch=1) == 2

    assert store.get("old-done") is None and store.get("old-failed") is None
    assert store.get("old-running").state == "running" and store.get("old-queued").state == "accepted"
    assert store.get("new-done").state == "succeeded"
    assert rows(store) == outbox_before, "replies waiting in the outbox are not the ledger's to delete"
    assert store.forget_finished(time.time() - 7 * 86400) == 0


def test_a_forgotten_command_id_is_a_new_command_again(store: Store) -> None:
    accept(store, "c1")
    store.claim("c1")
    store.transition("c1", State.SUCCEEDED, ReplyDraft(status="succeeded"))
    _age(store, "c1", 30 * 86400)
    store.forget_finished(time.time() - 86400)
    assert not store.known("c1")
    assert accept(store, "c1").duplicate is False


def test_a_full_disk_while_forgetting_is_logged_and_the_agent_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    class FullDisk:
        def forget_finished(self, before: float) -> int:
            raise StoreFull("the disk holding edge.db is full")

    agent = SimpleNamespace(store=FullDisk(), config=SimpleNamespace(store=SimpleNamespace(ledger_days=7.0)))
    Agent._forget_finished(agent)  # type: ignore[arg-type]  # the serve loop goes on; the next check retries
    assert "could not forget finished commands: the disk holding edge.db is full" in caplog.text


# --- outbox --------------------------------------------------------------------------------------


def test_pending_returns_rows_after_an_id_in_id_order_up_to_a_limit(store: Store) -> None:
    for n in range(5):
        accept(store, f"c{n}")
    ids = [r.id for r in rows(store)]
    assert ids == sorted(ids) and len(ids) == 5
    page = store.pending(after_id=ids[1], limit=2)
    assert [r.id for r in page] == ids[2:4]
    assert [body(r)["command_id"] for r in page] == ["c2", "c3"]
    assert store.pending(after_id=ids[-1], limit=10) == []


def test_delete_outbox_removes_only_the_given_ids(store: Store) -> None:
    for n in range(4):
        accept(store, f"c{n}")
    ids = [r.id for r in rows(store)]
    store.delete_outbox([ids[0], ids[2]])
    assert [r.id for r in rows(store)] == [ids[1], ids[3]]
    store.delete_outbox([])
    store.delete_outbox([10_000])
    assert [r.id for r in rows(store)] == [ids[1], ids[3]]


def test_outbox_depth_counts_rows_and_payload_bytes(store: Store) -> None:
    assert store.outbox_depth() == (0, 0)
    accept(store, "c1")
    accept(store, "c2")
    current = rows(store)
    assert store.outbox_depth() == (2, sum(len(r.payload) for r in current))
    store.delete_outbox([current[0].id])
    assert store.outbox_depth() == (1, len(current[1].payload))


def test_the_outbox_size_kept_by_triggers_equals_a_count_of_the_rows(path: Path) -> None:
    store = Store(path, TOPICS)
    for n in range(6):
        accept(store, f"c{n}")
        store.enqueue_event(event())
    store.delete_outbox([r.id for r in rows(store)][::2])
    with pytest.raises(RuntimeError), store.db.atomic():  # a rolled-back insert leaves no trace in the size
        store.db.execute("INSERT INTO outbox (topic, payload, qos, bytes, created_at) VALUES ('t', x'00', 1, 1, 0)")
        raise RuntimeError("roll back")
    counted = store.db.execute("SELECT COUNT(*), SUM(bytes) FROM outbox").fetchone()
    assert store.outbox_depth() == tuple(counted) == (6, sum(len(r.payload) for r in rows(store)))
    store.close()


def test_a_store_made_before_the_outbox_size_table_gets_it_counted_when_opened(path: Path) -> None:
    old = Store(path, TOPICS)
    for n in range(3):
        accept(old, f"c{n}")
    kept = rows(old)
    for statement in ("DROP TRIGGER outbox_size_insert", "DROP TRIGGER outbox_size_delete", "DROP TABLE outbox_size"):
        old.db.execute(statement)
    old.close()
    reopened = Store(path, TOPICS)
    assert reopened.outbox_depth() == (3, sum(len(r.payload) for r in kept))
    reopened.delete_outbox([kept[0].id])
    accept(reopened, "c9")
    assert reopened.outbox_depth() == (3, sum(len(r.payload) for r in rows(reopened)))
    reopened.close()


def test_an_event_is_enqueued_on_the_event_topic(store: Store) -> None:
    store.enqueue_event(event("agent_started"))
    [row] = rows(store)
    assert row.topic == EVENT and row.qos == 1
    assert body(row)["code"] == "agent_started"


# --- MQTT 5 response topic -----------------------------------------------------------------------


def test_a_reply_with_a_response_topic_goes_to_both_topics_with_correlation_data(store: Store) -> None:
    accept(store, "c1", response_topic="client/7/inbox", correlation_data=b"\x00corr")
    store.transition("c1", "running", ReplyDraft(status="running"))
    current = rows(store)
    assert [r.topic for r in current] == [REPLY, "client/7/inbox", REPLY, "client/7/inbox"]
    assert all(r.correlation_data == b"\x00corr" for r in current)
    assert current[0].payload == current[1].payload
    assert current[2].payload == current[3].payload


def test_a_response_topic_equal_to_the_reply_topic_is_not_sent_twice(store: Store) -> None:
    accept(store, "c1", response_topic=REPLY, correlation_data=b"x")
    assert [r.topic for r in rows(store)] == [REPLY]


def test_a_duplicate_accept_resends_to_the_stored_response_topic(store: Store) -> None:
    accept(store, "c1", response_topic="client/7/inbox", correlation_data=b"k")
    accept(store, "c1")
    assert [(r.topic, r.correlation_data) for r in rows(store)[2:]] == [(REPLY, b"k"), ("client/7/inbox", b"k")]


# --- reject --------------------------------------------------------------------------------------


def test_reject_without_an_id_enqueues_a_rejected_reply_and_an_event(store: Store) -> None:
    store.reject(None, ReplyDraft.failure("rejected", BadJson("payload is not JSON")), event())
    reply_row, event_row = rows(store)
    assert reply_row.topic == REPLY and event_row.topic == EVENT
    reply = body(reply_row)
    assert reply["command_id"] is None
    assert reply["status"] == "rejected"
    assert reply["error"] == {"code": "bad_json", "message": "payload is not JSON"}
    assert reply["seq"] == 1
    assert body(event_row)["code"] == "bad_json"


def test_reject_with_an_id_stores_no_command(store: Store) -> None:
    draft = ReplyDraft(status="rejected", error=ErrorInfo(code="unknown_kind", message="no"))
    store.reject("c9", draft, event("unknown_kind"), response_topic="client/inbox", correlation_data=b"z")
    assert store.get("c9") is None
    assert [(r.topic, r.correlation_data) for r in rows(store)] == [
        (REPLY, b"z"),
        ("client/inbox", b"z"),
        (EVENT, None),
    ]
    assert body(rows(store)[0])["command_id"] == "c9"


def test_a_rejected_reply_takes_the_next_seq(store: Store) -> None:
    accept(store, "c1")
    store.reject(None, ReplyDraft.failure("rejected", BadJson("x")), event())
    accept(store, "c2")
    assert [r["seq"] for r in replies(store)] == [1, 2, 3]


# --- queue ---------------------------------------------------------------------------------------


def test_the_next_runnable_command_is_the_highest_priority_then_the_oldest(store: Store) -> None:
    accept(store, "low", priority=-1)
    accept(store, "first", priority=5)
    accept(store, "second", priority=5)
    order = []
    while (nxt := store.next_runnable()) is not None:
        order.append(nxt.id)
        store.transition(nxt.id, "running", ReplyDraft(status="running"))
    assert order == ["first", "second", "low"]
    assert {c.id for c in store.in_state("running")} == {"low", "first", "second"}
    assert store.count_in_state("accepted") == 0


# --- a corrupt file ------------------------------------------------------------------------------


def test_a_healthy_file_is_not_quarantined(path: Path) -> None:
    Store(path, TOPICS).close()
    reopened = Store(path, TOPICS)
    assert reopened.quarantined is None
    reopened.close()


def test_a_corrupt_file_is_moved_aside_and_a_fresh_store_works(path: Path) -> None:
    path.parent.mkdir(parents=True)
    garbage = b"this is not an SQLite database \x00\xff" * 200
    path.write_bytes(garbage)
    store = Store(path, TOPICS)
    try:
        assert store.quarantined is not None
        assert re.fullmatch(r"edge\.db\.corrupt-\d{8}T\d{6}Z", store.quarantined.name)
        assert store.quarantined.parent == path.parent
        assert store.quarantined.read_bytes() == garbage
        accept(store, "c1")
        assert store.get("c1") is not None
        assert [r["status"] for r in replies(store)] == ["accepted"]
    finally:
        store.close()


def test_seq_keeps_increasing_after_a_corrupt_store_is_replaced(path: Path) -> None:
    old = Store(path, TOPICS)
    for n in range(3):
        accept(old, f"c{n}")
    old.close()
    path.write_bytes(b"garbage " * 512)
    fresh = Store(path, TOPICS)
    try:
        assert fresh.quarantined is not None
        accept(fresh, "c9")
        assert replies(fresh)[0]["seq"] > 3
    finally:
        fresh.close()
