"""The command ledger: the contract on the SQLite file and on its in-memory twin alike, then what
only the SQLite inbox does (unsynced commits, forgetting finished commands)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from autoglm_wire.errors import InvalidCommand
from autoglm_wire.lifecycle import State
from autoglm_wire.topics import DeviceTopics
from edge_agent.agent import Agent
from edge_agent.inbox import Inbox, MemoryInbox
from edge_agent.outbox import MemoryOutbox, Outbox, OutboxRow, ReplyDraft
from edge_agent.sqlite_file import StoreError, StoreFull
from tests.support.sqlite_syncs import count_sqlite_syncs, record_os_fsyncs
from tests.support.store import OpenStore, open_store

TOPICS = DeviceTopics("autoglm", "d1")
REPLY = "autoglm/d1/reply"


@dataclass(frozen=True)
class Ledger:
    inbox: Inbox
    outbox: Outbox


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "edge.db"


@pytest.fixture
def store(path: Path) -> Iterator[OpenStore]:
    opened = open_store(path, TOPICS)
    yield opened
    opened.close()


@pytest.fixture(params=["sqlite", "memory"])
def ledger(request: pytest.FixtureRequest, path: Path) -> Iterator[Ledger]:
    """The same tests on the SQLite inbox and on MemoryInbox (what the executor's tests use)."""
    if request.param == "memory":
        outbox = MemoryOutbox(TOPICS)
        yield Ledger(MemoryInbox(outbox), outbox)
        return
    opened = open_store(path, TOPICS)
    yield Ledger(opened.inbox, opened.outbox)
    opened.close()


def accept(inbox: Inbox, command_id: str = "c1", priority: int = 0, **kwargs: Any) -> Any:
    payload = json.dumps({"v": 1, "id": command_id, "kind": "ping"})
    return inbox.accept(command_id, "ping", payload, priority, kwargs.pop("expires_at", None), **kwargs)


def rows(outbox: Outbox) -> list[OutboxRow]:
    return outbox.pending(after_id=0, limit=10_000)


def replies(outbox: Outbox) -> list[dict[str, Any]]:
    return [json.loads(r.payload) for r in rows(outbox) if r.topic == REPLY]


# --- accept --------------------------------------------------------------------------------------


def test_accept_stores_the_command_as_accepted(ledger: Ledger) -> None:
    intake = accept(ledger.inbox, "c1", priority=3, expires_at=1234.5)
    assert (intake.duplicate, intake.state) == (False, "accepted")
    stored = ledger.inbox.get("c1")
    assert stored is not None
    assert (stored.kind, stored.priority, stored.state, stored.expires_at) == ("ping", 3, "accepted", 1234.5)
    assert json.loads(stored.payload)["id"] == "c1"


def test_the_stored_last_reply_is_the_enqueued_reply(ledger: Ledger) -> None:
    accept(ledger.inbox, "c1")
    stored = ledger.inbox.get("c1")
    assert stored is not None and stored.last_reply == rows(ledger.outbox)[0].payload


def test_a_duplicate_accept_stores_no_second_command_and_resends_the_same_reply(ledger: Ledger) -> None:
    inbox = ledger.inbox
    assert not inbox.known("c1")
    accept(inbox, "c1")
    assert inbox.known("c1") and not inbox.known("c2")
    again = inbox.accept("c1", "complete", '{"changed": true}', 9, None)
    assert (again.duplicate, again.state) == (True, "accepted")
    assert len(inbox.in_state("accepted")) == 1
    stored = inbox.get("c1")
    assert stored is not None and (stored.kind, stored.priority) == ("ping", 0), "the first delivery wins"
    first, second = rows(ledger.outbox)
    assert first.payload == second.payload
    assert json.loads(second.payload)["seq"] == 1


def test_a_duplicate_of_a_finished_command_resends_its_terminal_reply(ledger: Ledger) -> None:
    accept(ledger.inbox, "c1")
    ledger.inbox.transition("c1", State.RUNNING, ReplyDraft(status="running"))
    ledger.inbox.transition("c1", State.SUCCEEDED, ReplyDraft(status="succeeded", output={"pong": True}))
    terminal = rows(ledger.outbox)[-1].payload
    again = accept(ledger.inbox, "c1")
    assert (again.duplicate, again.state) == (True, "succeeded")
    assert rows(ledger.outbox)[-1].payload == terminal
    assert [r["status"] for r in replies(ledger.outbox)] == ["accepted", "running", "succeeded", "succeeded"]


def test_a_duplicate_accept_resends_to_the_stored_response_topic(ledger: Ledger) -> None:
    accept(ledger.inbox, "c1", response_topic="client/7/inbox", correlation_data=b"k")
    accept(ledger.inbox, "c1")
    assert [(r.topic, r.correlation_data) for r in rows(ledger.outbox)[2:]] == [
        (REPLY, b"k"), ("client/7/inbox", b"k")]


# --- transition ----------------------------------------------------------------------------------


def test_a_transition_moves_the_state_and_enqueues_the_reply_announcing_it(ledger: Ledger) -> None:
    accept(ledger.inbox, "c1")
    assert ledger.inbox.transition("c1", State.RUNNING, ReplyDraft(status="running")) is True
    assert ledger.inbox.get("c1").state == "running"  # type: ignore[union-attr]
    reply = replies(ledger.outbox)[-1]
    assert (reply["status"], reply["seq"]) == ("running", 2)


def test_a_transition_with_only_from_refuses_from_any_other_state(ledger: Ledger) -> None:
    accept(ledger.inbox, "c1")
    before = rows(ledger.outbox)
    moved = ledger.inbox.transition("c1", State.SUCCEEDED, ReplyDraft(status="succeeded"), only_from={"running"})
    assert moved is False
    assert ledger.inbox.get("c1").state == "accepted"  # type: ignore[union-attr]
    assert rows(ledger.outbox) == before, "a refused transition enqueues nothing"


def test_a_transition_with_only_from_goes_ahead_from_a_listed_state(ledger: Ledger) -> None:
    accept(ledger.inbox, "c1")
    assert ledger.inbox.transition("c1", State.RUNNING, ReplyDraft(status="running"), only_from=["accepted"]) is True
    assert ledger.inbox.transition("c1", State.RUNNING, ReplyDraft(status="running"), only_from=["accepted"]) is False


def test_a_claim_moves_an_accepted_command_to_running_once(ledger: Ledger) -> None:
    intake = accept(ledger.inbox, "c1")
    assert intake.command is not None and intake.command.state == "accepted" and intake.command.id == "c1"
    assert ledger.inbox.claim("c1") is True
    assert ledger.inbox.claim("c1") is False, "a second claim of the same command must lose"
    stored = ledger.inbox.get("c1")
    assert stored is not None and stored.state == "running"
    assert [r["status"] for r in replies(ledger.outbox)] == ["accepted", "running"]


def test_an_accept_with_claim_stores_the_command_running_with_both_replies(ledger: Ledger) -> None:
    intake = accept(ledger.inbox, "c1", claim=True)
    assert intake.state == "running" and intake.command.state == "running"
    assert ledger.inbox.get("c1").state == "running"  # type: ignore[union-attr]
    assert [(r["status"], r["seq"]) for r in replies(ledger.outbox)] == [("accepted", 1), ("running", 2)]
    assert ledger.inbox.claim("c1") is False, "already claimed: nobody else can run it"


def test_an_accept_with_claim_of_a_duplicate_claims_nothing_and_resends_the_last_reply(ledger: Ledger) -> None:
    accept(ledger.inbox, "c1")
    intake = accept(ledger.inbox, "c1", claim=True)
    assert intake.duplicate and intake.state == "accepted"
    assert ledger.inbox.get("c1").state == "accepted"  # type: ignore[union-attr]
    assert [r["status"] for r in replies(ledger.outbox)] == ["accepted", "accepted"]


def test_a_failure_reply_carries_the_error_code_and_message(ledger: Ledger) -> None:
    accept(ledger.inbox, "c1")
    ledger.inbox.transition("c1", State.FAILED, ReplyDraft.failure("failed", InvalidCommand("no model", "c1")))
    assert replies(ledger.outbox)[-1]["error"] == {"code": "invalid_command", "message": "no model"}


def test_a_transition_of_an_unknown_command_is_a_store_error(ledger: Ledger) -> None:
    with pytest.raises(StoreError, match="nope"):
        ledger.inbox.transition("nope", State.RUNNING, ReplyDraft(status="running"))


def test_a_reply_with_a_response_topic_goes_to_both_topics_with_correlation_data(ledger: Ledger) -> None:
    accept(ledger.inbox, "c1", response_topic="client/7/inbox", correlation_data=b"\x00corr")
    ledger.inbox.transition("c1", State.RUNNING, ReplyDraft(status="running"))
    current = rows(ledger.outbox)
    assert [r.topic for r in current] == [REPLY, "client/7/inbox", REPLY, "client/7/inbox"]
    assert all(r.correlation_data == b"\x00corr" for r in current)
    assert current[0].payload == current[1].payload
    assert current[2].payload == current[3].payload


# --- queue ---------------------------------------------------------------------------------------


def test_the_next_runnable_command_is_the_highest_priority_then_the_oldest(ledger: Ledger) -> None:
    accept(ledger.inbox, "low", priority=-1)
    accept(ledger.inbox, "first", priority=5)
    accept(ledger.inbox, "second", priority=5)
    order = []
    while (nxt := ledger.inbox.next_runnable()) is not None:
        order.append(nxt.id)
        ledger.inbox.transition(nxt.id, State.RUNNING, ReplyDraft(status="running"))
    assert order == ["first", "second", "low"]
    assert {c.id for c in ledger.inbox.in_state("running")} == {"low", "first", "second"}
    assert ledger.inbox.in_state("accepted") == []


def test_count_in_state_counts_the_ledger(store: OpenStore) -> None:
    accept(store.inbox, "c1")
    accept(store.inbox, "c2")
    store.inbox.claim("c1")
    assert (store.inbox.count_in_state("accepted"), store.inbox.count_in_state("running")) == (1, 1)


# --- SQLite: commits without their own fsync -----------------------------------------------------


def test_an_accept_with_claim_is_one_unsynced_commit_that_one_sync_makes_durable(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = f"{path}-wal"
    with count_sqlite_syncs() as sqlite_syncs:  # SQLite's own syncs; the barrier's are os.fsync
        store = open_store(path, TOPICS)
        try:
            barrier = record_os_fsyncs(monkeypatch)
            before = sqlite_syncs[wal]
            accept(store.inbox, "c1", claim=True)
            assert (sqlite_syncs[wal], barrier) == (before, []), "the intake commit skips its fsync"
            store.file.sync()
            assert (sqlite_syncs[wal], barrier) == (before, [wal]), "one fsync makes both durable"
        finally:
            store.close()


# --- forgetting finished commands ----------------------------------------------------------------


def _age(store: OpenStore, command_id: str, seconds: float) -> None:
    store.file.db.execute("UPDATE commands SET updated_at = updated_at - ? WHERE id = ?", [seconds, command_id])


def test_forget_finished_deletes_only_finished_commands_changed_before_the_cutoff(store: OpenStore) -> None:
    inbox = store.inbox
    for command_id in ("old-done", "old-failed", "old-running", "old-queued", "new-done"):
        accept(inbox, command_id)
    finished = (("old-done", State.SUCCEEDED), ("old-failed", State.FAILED), ("new-done", State.SUCCEEDED))
    for command_id, state in finished:
        inbox.claim(command_id)
        inbox.transition(command_id, state, ReplyDraft(status=state.value))
    inbox.claim("old-running")
    for command_id in ("old-done", "old-failed", "old-running", "old-queued"):
        _age(store, command_id, 8 * 86400)
    outbox_before = rows(store.outbox)

    assert inbox.forget_finished(time.time() - 7 * 86400, batch=1) == 2

    assert inbox.get("old-done") is None and inbox.get("old-failed") is None
    assert inbox.get("old-running").state == "running" and inbox.get("old-queued").state == "accepted"
    assert inbox.get("new-done").state == "succeeded"
    assert rows(store.outbox) == outbox_before, "replies waiting in the outbox are not the ledger's to delete"
    assert inbox.forget_finished(time.time() - 7 * 86400) == 0


def test_a_forgotten_command_id_is_a_new_command_again(store: OpenStore) -> None:
    accept(store.inbox, "c1")
    store.inbox.claim("c1")
    store.inbox.transition("c1", State.SUCCEEDED, ReplyDraft(status="succeeded"))
    _age(store, "c1", 30 * 86400)
    store.inbox.forget_finished(time.time() - 86400)
    assert not store.inbox.known("c1")
    assert accept(store.inbox, "c1").duplicate is False


def test_a_full_disk_while_forgetting_is_logged_and_the_agent_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    class FullDisk:
        def forget_finished(self, before: float) -> int:
            raise StoreFull("the disk holding edge.db is full")

    agent = SimpleNamespace(inbox=FullDisk(), config=SimpleNamespace(store=SimpleNamespace(ledger_days=7.0)))
    Agent._forget_finished(agent)  # type: ignore[arg-type]  # the serve loop goes on; the next check retries
    assert "could not forget finished commands: the disk holding edge.db is full" in caplog.text
