"""The device's SQLite file: the fsync barrier, durability across reopen, the integrity check, the
seq mark beside it, and which write failures are StoreUnavailable."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import pytest

from autoglm_wire.lifecycle import State
from autoglm_wire.topics import DeviceTopics
from edge_agent import seq_mark
from edge_agent.outbox import ReplyDraft
from edge_agent.sqlite_file import SqliteFile, StoreFull, StoreUnavailable
from tests.support.store import OpenStore, open_store

TOPICS = DeviceTopics("autoglm", "d1")
REPLY = "autoglm/d1/reply"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "edge.db"


def accept(store: OpenStore, command_id: str) -> None:
    store.inbox.accept(command_id, "ping", json.dumps({"v": 1, "id": command_id, "kind": "ping"}), 0, None)


def reply_statuses(store: OpenStore) -> list[str]:
    return [json.loads(r.payload)["status"] for r in store.outbox.pending(0, 10_000) if r.topic == REPLY]


# --- the fsync barrier ---------------------------------------------------------------------------


def test_intake_and_claim_commit_without_fsync_and_sync_fsyncs_the_wal_once_each(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(path, TOPICS)
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    try:
        store.file.sync()
        assert synced == [], "nothing to sync in a fresh store"
        accept(store, "c1")
        store.file.sync()
        store.file.sync()
        assert synced == [f"{path}-wal"], "the accept is synced once"
        store.inbox.claim("c1")
        assert store.file.db.execute("PRAGMA synchronous").fetchone()[0] == 2, "back to FULL after the claim"
        store.file.sync()
        assert synced == [f"{path}-wal"] * 2
        store.inbox.transition("c1", State.SUCCEEDED, ReplyDraft(status="succeeded"))
        store.file.sync()
        assert len(synced) == 2, "a terminal reply is fsynced by its own commit"
    finally:
        store.close()


def test_with_synchronous_normal_a_claim_leaves_nothing_for_sync(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    normal = open_store(path, TOPICS, synchronous="normal")  # writes the seq mark (fsynced) once
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    try:
        accept(normal, "c1")
        assert normal.inbox.claim("c1") is True
        normal.file.sync()
        assert synced == [] and normal.file.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        normal.close()


# --- across close and reopen ---------------------------------------------------------------------


def test_the_outbox_and_the_ledger_survive_close_and_reopen(path: Path) -> None:
    first = open_store(path, TOPICS)
    accept(first, "c1")
    kept = first.outbox.pending(0, 10_000)
    first.close()
    second = open_store(path, TOPICS)
    assert second.outbox.pending(0, 10_000) == kept
    assert second.inbox.get("c1") is not None
    second.close()


# --- a corrupt file ------------------------------------------------------------------------------


def test_a_healthy_file_is_not_quarantined(path: Path) -> None:
    SqliteFile(path).close()
    reopened = SqliteFile(path)
    assert reopened.quarantined is None
    reopened.close()


def test_a_corrupt_file_is_moved_aside_and_a_fresh_store_works(path: Path) -> None:
    path.parent.mkdir(parents=True)
    garbage = b"this is not an SQLite database \x00\xff" * 200
    path.write_bytes(garbage)
    store = open_store(path, TOPICS)
    try:
        quarantined = store.file.quarantined
        assert quarantined is not None
        assert re.fullmatch(r"edge\.db\.corrupt-\d{8}T\d{6}Z", quarantined.name)
        assert quarantined.parent == path.parent
        assert quarantined.read_bytes() == garbage
        accept(store, "c1")
        assert store.inbox.get("c1") is not None
        assert reply_statuses(store) == ["accepted"]
    finally:
        store.close()


def test_seq_keeps_increasing_after_a_corrupt_store_is_replaced(path: Path) -> None:
    old = open_store(path, TOPICS)
    for n in range(3):
        accept(old, f"c{n}")
    old.close()
    path.write_bytes(b"garbage " * 512)
    fresh = open_store(path, TOPICS)
    try:
        assert fresh.file.quarantined is not None
        accept(fresh, "c9")
        first = json.loads(fresh.outbox.pending(0, 1)[0].payload)
        assert first["seq"] > 3
    finally:
        fresh.close()


def last_seq(store: OpenStore) -> int:
    return max(json.loads(r.payload)["seq"] for r in store.outbox.pending(0, 10_000) if r.topic == REPLY)


@pytest.mark.parametrize("loss", ["garbled", "deleted"])
def test_seq_continues_above_the_old_store_even_when_the_clock_reads_1970(
        path: Path, monkeypatch: pytest.MonkeyPatch, loss: str) -> None:
    monkeypatch.setattr(seq_mark, "SEQ_BLOCK", 5)
    old = open_store(path, TOPICS)
    for n in range(12):  # past two blocks of the mark
        accept(old, f"c{n}")
    seq_before = last_seq(old)
    old.close()
    if loss == "garbled":
        path.write_bytes(b"garbage " * 512)
    else:
        path.unlink()
    monkeypatch.setattr("time.time", lambda: 0.0)  # a power cut left the clock at 1970-01-01
    fresh = open_store(path, TOPICS)
    try:
        assert (fresh.file.quarantined is not None) == (loss == "garbled")
        accept(fresh, "after")
        assert last_seq(fresh) > seq_before
    finally:
        fresh.close()


def test_the_seq_mark_is_raised_in_blocks_and_fsynced_before_the_seq_is_committed(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seq_mark, "SEQ_BLOCK", 5)
    store = open_store(path, TOPICS, synchronous="normal")
    mark = path.with_name("edge.db.seq")
    try:
        assert int(mark.read_text()) == 6, "a new store writes its mark at once: above seq 1"
        synced: list[str] = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
        for n in range(5):
            accept(store, f"c{n}")  # seqs 1-5: under the mark, nothing written
        assert synced == [] and int(mark.read_text()) == 6
        accept(store, "c5")  # seq 6 reaches the mark: raised to 11 (file and directory fsynced) first
        assert int(mark.read_text()) == 11 and last_seq(store) == 6
        assert synced == [f"{mark}.tmp", str(path.parent)]
    finally:
        store.close()


def test_a_garbled_mark_is_rewritten_from_the_store(path: Path) -> None:
    open_store(path, TOPICS).close()
    path.with_name("edge.db.seq").write_text("not a number")
    store = open_store(path, TOPICS)
    try:
        accept(store, "c1")
        assert int(path.with_name("edge.db.seq").read_text()) > last_seq(store)
    finally:
        store.close()


def _operational_error(code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(f"sqlite error {code}")
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(("raised", "expected"), [
    (_operational_error(sqlite3.SQLITE_FULL), StoreFull),
    (OSError(28, "No space left on device"), StoreFull),
    (_operational_error(sqlite3.SQLITE_IOERR_WRITE), StoreUnavailable),
    (_operational_error(sqlite3.SQLITE_BUSY), StoreUnavailable),
    (OSError(5, "Input/output error"), StoreUnavailable),
    (_operational_error(sqlite3.SQLITE_ERROR), sqlite3.OperationalError),  # e.g. a bad statement: a bug
])
def test_write_failures_outside_the_agent_are_store_unavailable_and_bugs_are_not(
        path: Path, raised: Exception, expected: type[Exception]) -> None:
    file = SqliteFile(path)
    try:
        with pytest.raises(expected) as caught:
            with file.write():
                raise raised
        assert (caught.type is expected) and isinstance(caught.value, StoreUnavailable) == (expected is not
                                                                                             sqlite3.OperationalError)
    finally:
        file.close()
