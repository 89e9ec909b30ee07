"""The outbox of the SQLite file: rows in id order, deletes, depth, replies and their seq, rejections
(the caps and their policy: tests/faults/test_outbox_caps.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autoglm_wire.errors import BadJson
from autoglm_wire.protocol import ErrorInfo, Event, format_ts, utc_now
from autoglm_wire.topics import DeviceTopics
from edge_agent.outbox import OutboxRow, ReplyDraft, SqliteOutbox
from tests.support.sqlite_syncs import count_sqlite_syncs, record_os_fsyncs
from tests.support.store import OpenStore, open_store

TOPICS = DeviceTopics("autoglm", "d1")
REPLY = "autoglm/d1/reply"
EVENT = "autoglm/d1/event"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "edge.db"


@pytest.fixture
def store(path: Path) -> Iterator[OpenStore]:
    opened = open_store(path, TOPICS)
    yield opened
    opened.close()


def accept(store: OpenStore, command_id: str = "c1") -> Any:
    payload = json.dumps({"v": 1, "id": command_id, "kind": "ping"})
    return store.inbox.accept(command_id, "ping", payload, 0, None)


def rows(outbox: SqliteOutbox) -> list[OutboxRow]:
    return outbox.pending(after_id=0, limit=10_000)


def body(row: OutboxRow) -> dict[str, Any]:
    return json.loads(row.payload)


def replies(outbox: SqliteOutbox) -> list[dict[str, Any]]:
    return [body(r) for r in rows(outbox) if r.topic == REPLY]


def event(code: str = "bad_json") -> Event:
    return Event(device_id="d1", ts=format_ts(utc_now()), level="error", code=code, message="rejected a payload")


# --- replies and seq -----------------------------------------------------------------------------


def test_accept_enqueues_an_accepted_reply_with_seq_1(store: OpenStore) -> None:
    accept(store, "c1")
    [row] = rows(store.outbox)
    assert row.topic == REPLY
    assert row.qos == 1
    assert row.retain is False
    reply = body(row)
    assert reply["v"] == 1
    assert (reply["command_id"], reply["device_id"], reply["status"], reply["seq"]) == ("c1", "d1", "accepted", 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", reply["ts"])


def test_seq_strictly_increases_across_close_and_reopen(path: Path) -> None:
    first = open_store(path, TOPICS)
    accept(first, "c1")
    first.inbox.transition("c1", "running", ReplyDraft(status="running"))  # type: ignore[arg-type]
    accept(first, "c2")
    first.close()
    second = open_store(path, TOPICS)
    accept(second, "c3")
    second.inbox.transition("c1", "succeeded", ReplyDraft(status="succeeded"))  # type: ignore[arg-type]
    seqs = [r["seq"] for r in replies(second.outbox)]
    second.close()
    assert seqs == [1, 2, 3, 4, 5]


def test_a_response_topic_equal_to_the_reply_topic_is_not_sent_twice(store: OpenStore) -> None:
    store.inbox.accept("c1", "ping", "{}", 0, None, response_topic=REPLY, correlation_data=b"x")
    assert [r.topic for r in rows(store.outbox)] == [REPLY]


# --- pending, delete, depth ----------------------------------------------------------------------


def test_pending_returns_rows_after_an_id_in_id_order_up_to_a_limit(store: OpenStore) -> None:
    for n in range(5):
        accept(store, f"c{n}")
    ids = [r.id for r in rows(store.outbox)]
    assert ids == sorted(ids) and len(ids) == 5
    page = store.outbox.pending(after_id=ids[1], limit=2)
    assert [r.id for r in page] == ids[2:4]
    assert [body(r)["command_id"] for r in page] == ["c2", "c3"]
    assert store.outbox.pending(after_id=ids[-1], limit=10) == []


def test_delete_removes_only_the_given_ids(store: OpenStore) -> None:
    for n in range(4):
        accept(store, f"c{n}")
    ids = [r.id for r in rows(store.outbox)]
    store.outbox.delete([ids[0], ids[2]])
    assert [r.id for r in rows(store.outbox)] == [ids[1], ids[3]]
    store.outbox.delete([])
    store.outbox.delete([10_000])
    assert [r.id for r in rows(store.outbox)] == [ids[1], ids[3]]


def test_deleting_acked_rows_commits_without_fsync_and_leaves_nothing_for_the_next_sync(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = f"{path}-wal"
    with count_sqlite_syncs() as sqlite_syncs:  # SQLite's own syncs; the barrier's are os.fsync
        store = open_store(path, TOPICS)
        try:
            accept(store, "c1")
            store.file.sync()
            barrier = record_os_fsyncs(monkeypatch)
            before = sqlite_syncs[wal]
            store.outbox.delete([row.id for row in rows(store.outbox)])
            store.file.sync()
            assert (sqlite_syncs[wal], barrier) == (before, []) and rows(store.outbox) == []
            store.outbox.enqueue_event(Event(device_id="d1", ts=format_ts(utc_now()), level="info", code="x",
                                             message="an Event's commit is synced by SQLite itself"))
            assert sqlite_syncs[wal] == before + 1
        finally:
            store.close()


def test_depth_counts_rows_and_payload_bytes(store: OpenStore) -> None:
    assert store.outbox.depth() == (0, 0)
    accept(store, "c1")
    accept(store, "c2")
    current = rows(store.outbox)
    assert store.outbox.depth() == (2, sum(len(r.payload) for r in current))
    store.outbox.delete([current[0].id])
    assert store.outbox.depth() == (1, len(current[1].payload))


def test_depth_counts_the_correlation_data_stored_with_a_reply(store: OpenStore) -> None:
    payload = json.dumps({"v": 1, "id": "c1", "kind": "ping"})
    store.inbox.accept("c1", "ping", payload, 0, None, correlation_data=b"k" * 200)
    (row,) = rows(store.outbox)
    assert row.correlation_data == b"k" * 200
    assert store.outbox.depth() == (1, len(row.payload) + 200)


def test_the_outbox_size_kept_by_triggers_equals_a_count_of_the_rows(path: Path) -> None:
    store = open_store(path, TOPICS)
    for n in range(6):
        accept(store, f"c{n}")
        store.outbox.enqueue_event(event())
    store.outbox.delete([r.id for r in rows(store.outbox)][::2])
    db = store.file.db
    with pytest.raises(RuntimeError), db.atomic():  # a rolled-back insert leaves no trace in the size
        db.execute("INSERT INTO outbox (topic, payload, qos, bytes, created_at) VALUES ('t', x'00', 1, 1, 0)")
        raise RuntimeError("roll back")
    counted = db.execute("SELECT COUNT(*), SUM(bytes) FROM outbox").fetchone()
    assert store.outbox.depth() == tuple(counted) == (6, sum(len(r.payload) for r in rows(store.outbox)))
    store.close()


def test_a_store_made_before_the_outbox_size_table_gets_it_counted_when_opened(path: Path) -> None:
    old = open_store(path, TOPICS)
    for n in range(3):
        accept(old, f"c{n}")
    kept = rows(old.outbox)
    for statement in ("DROP TRIGGER outbox_size_insert", "DROP TRIGGER outbox_size_delete", "DROP TABLE outbox_size"):
        old.file.db.execute(statement)
    old.close()
    reopened = open_store(path, TOPICS)
    assert reopened.outbox.depth() == (3, sum(len(r.payload) for r in kept))
    reopened.outbox.delete([kept[0].id])
    accept(reopened, "c9")
    assert reopened.outbox.depth() == (3, sum(len(r.payload) for r in rows(reopened.outbox)))
    reopened.close()


def test_an_event_is_enqueued_on_the_event_topic(store: OpenStore) -> None:
    store.outbox.enqueue_event(event("agent_started"))
    [row] = rows(store.outbox)
    assert row.topic == EVENT and row.qos == 1
    assert body(row)["code"] == "agent_started"


# --- reject --------------------------------------------------------------------------------------


def test_reject_without_an_id_enqueues_a_rejected_reply_and_an_event(store: OpenStore) -> None:
    store.outbox.reject(None, ReplyDraft.failure("rejected", BadJson("payload is not JSON")), event())
    reply_row, event_row = rows(store.outbox)
    assert reply_row.topic == REPLY and event_row.topic == EVENT
    reply = body(reply_row)
    assert reply["command_id"] is None
    assert reply["status"] == "rejected"
    assert reply["error"] == {"code": "bad_json", "message": "payload is not JSON"}
    assert reply["seq"] == 1
    assert body(event_row)["code"] == "bad_json"


def test_reject_with_an_id_stores_no_command(store: OpenStore) -> None:
    draft = ReplyDraft(status="rejected", error=ErrorInfo(code="unknown_kind", message="no"))
    store.outbox.reject("c9", draft, event("unknown_kind"), response_topic="client/inbox", correlation_data=b"z")
    assert store.inbox.get("c9") is None
    assert [(r.topic, r.correlation_data) for r in rows(store.outbox)] == [
        (REPLY, b"z"),
        ("client/inbox", b"z"),
        (EVENT, None),
    ]
    assert body(rows(store.outbox)[0])["command_id"] == "c9"


def test_a_rejected_reply_takes_the_next_seq(store: OpenStore) -> None:
    accept(store, "c1")
    store.outbox.reject(None, ReplyDraft.failure("rejected", BadJson("x")), event())
    accept(store, "c2")
    assert [r["seq"] for r in replies(store.outbox)] == [1, 2, 3]
