"""The device's SQLite file: the fsync barrier, durability across reopen, the integrity check, the
seq mark beside it, and which write failures are StoreUnavailable."""

from __future__ import annotations

import errno
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
from tests.support.sqlite_syncs import count_sqlite_syncs, record_os_fsyncs
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
# SQLite's commits are observed through its VFS (`count_sqlite_syncs`: xSync per file), the barrier
# through `os.fsync`, which `SqliteFile.sync` calls itself (`record_os_fsyncs`).


def test_intake_and_claim_commit_without_fsync_and_sync_fsyncs_the_wal_once_each(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = f"{path}-wal"
    with count_sqlite_syncs() as sqlite_syncs:
        store = open_store(path, TOPICS)
        barrier = record_os_fsyncs(monkeypatch)
        try:
            store.file.sync()
            assert barrier == [], "nothing to sync in a fresh store"
            before = sqlite_syncs[wal]
            accept(store, "c1")
            assert sqlite_syncs[wal] == before, "SQLite did not sync the intake commit"
            store.file.sync()
            store.file.sync()
            assert barrier == [wal], "the barrier synced the accept, once"
            store.inbox.claim("c1")
            assert sqlite_syncs[wal] == before, "nor the claim"
            store.file.sync()
            assert barrier == [wal] * 2
            store.inbox.transition("c1", State.SUCCEEDED, ReplyDraft(status="succeeded"))
            assert sqlite_syncs[wal] == before + 1, "a terminal reply's commit is synced by SQLite itself"
            store.file.sync()
            assert len(barrier) == 2, "so the barrier has nothing left to do"
        finally:
            store.close()


def test_with_synchronous_normal_no_commit_is_synced_and_sync_has_nothing_to_do(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = f"{path}-wal"
    with count_sqlite_syncs() as sqlite_syncs:
        normal = open_store(path, TOPICS, synchronous="normal")
        barrier = record_os_fsyncs(monkeypatch)
        try:
            before = sqlite_syncs[wal]
            accept(normal, "c1")
            assert normal.inbox.claim("c1") is True
            normal.inbox.transition("c1", State.SUCCEEDED, ReplyDraft(status="succeeded"))
            normal.file.sync()
            assert (sqlite_syncs[wal], barrier) == (before, [])
            assert normal.file.db.execute("PRAGMA synchronous").fetchone()[0] == 1
        finally:
            normal.close()


def test_a_failed_fsync_raises_and_the_next_sync_tries_again(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(path, TOPICS)
    try:
        accept(store, "c1")
        real_fsync = os.fsync

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="Input/output error"):
            store.file.sync()
        monkeypatch.setattr(os, "fsync", real_fsync)
        barrier = record_os_fsyncs(monkeypatch)
        store.file.sync()
        assert barrier == [f"{path}-wal"], "the accept is still not durable: this sync must fsync it"
        store.file.sync()
        assert len(barrier) == 1
    finally:
        store.close()


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
