"""The device's SQLite file: the fsync barrier, durability across reopen, the integrity check."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from autoglm_wire.lifecycle import State
from autoglm_wire.topics import DeviceTopics
from edge_agent.outbox import ReplyDraft
from edge_agent.sqlite_file import SqliteFile
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
