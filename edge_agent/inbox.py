"""The inbox: the command ledger. A delivered command is stored `accepted` (or recognised as a
duplicate by its id, and answered with its last reply), claimed by the executor, and moved to its
terminal state; every state change stores the reply announcing it in the outbox, in the same
transaction, so a crash never leaves one without the other. `lifecycle` says which changes are
legal, which is also how two threads agree on who runs or cancels a command. Finished commands are
kept `store.ledger_days` (that is what makes a redelivery a duplicate), then forgotten.

`Inbox` is what intake and the executor use; `SqliteInbox` keeps the ledger in the device's
SQLite file, `MemoryInbox` is its in-memory twin for unit tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from autoglm_wire import lifecycle
from autoglm_wire.lifecycle import State
from edge_agent.outbox import MemoryOutbox, ReplyDraft, SqliteOutbox
from edge_agent.sqlite_file import SqliteFile, StoreError


@dataclass(frozen=True)
class StoredCommand:
    """A row of the command ledger."""

    id: str
    kind: str
    payload: str
    priority: int
    state: str
    received_at: float
    expires_at: float | None
    response_topic: str | None
    correlation_data: bytes | None
    last_reply: bytes | None


COMMAND_COLUMNS = ("id, kind, payload, priority, state, received_at, expires_at, response_topic,"
                   " correlation_data, last_reply")


@dataclass(frozen=True)
class Accepted:
    """What `accept` did: stored a new command, or found a duplicate (and re-sent its last reply)."""

    duplicate: bool
    state: str
    command: StoredCommand | None = None  # the new ledger row (None for a duplicate)


def allowed_sources(new_state: State, only_from: Iterable[str] | None) -> frozenset[str]:
    """The states a transition to `new_state` may start from: `only_from`, or the lifecycle's."""
    return frozenset(only_from) if only_from is not None else lifecycle.sources(new_state)


class Inbox(Protocol):
    """The ledger as intake (accept, dedupe) and the executor (claim, run, finish) see it."""

    def accept(self, command_id: str, kind: str, payload: str, priority: int, expires_at: float | None,
               response_topic: str | None = None, correlation_data: bytes | None = None,
               claim: bool = False) -> Accepted:
        """Store a new command with its `accepted` reply, or re-send the last reply of a known id.
        `claim`: also move the new command to `running` with its reply, in the same commit (the
        caller hands it to an idle worker: one commit on the way to the generation, not two).
        Raises Busy when the outbox is full."""
        ...

    def known(self, command_id: str) -> bool:
        """Whether the ledger holds this id (a duplicate delivery)."""
        ...

    def claim(self, command_id: str) -> bool:
        """accepted -> running with its `running` reply; False if no longer `accepted`."""
        ...

    def transition(self, command_id: str, new_state: State, draft: ReplyDraft,
                   only_from: Iterable[str] | None = None) -> bool:
        """Move a command to `new_state` with the reply announcing it, atomically; False (and
        nothing stored) unless the current state is in `only_from` (default: the lifecycle's)."""
        ...

    def get(self, command_id: str) -> StoredCommand | None: ...

    def next_runnable(self) -> StoredCommand | None:
        """The accepted command to run next: highest priority first, then arrival order."""
        ...

    def in_state(self, state: str) -> list[StoredCommand]:
        """Commands in `state`, in arrival order."""
        ...


class SqliteInbox:
    """The `commands` table of the SQLite file. Thread-safe; every public method is one transaction."""

    def __init__(self, file: SqliteFile, outbox: SqliteOutbox) -> None:
        self._file = file
        self._db = file.db
        self._outbox = outbox

    def accept(self, command_id: str, kind: str, payload: str, priority: int, expires_at: float | None,
               response_topic: str | None = None, correlation_data: bytes | None = None,
               claim: bool = False) -> Accepted:
        """See `Inbox.accept`. Committed without its own fsync: the link syncs before the PUBACK."""
        now = time.time()
        with self._file.unsynced(), self._file.write():
            existing = self._get(command_id)
            if existing is not None:
                if existing.last_reply is not None:
                    self._outbox.resend_reply(existing.last_reply, existing.response_topic, existing.correlation_data)
                return Accepted(duplicate=True, state=existing.state)
            self._outbox.refuse_if_full(command_id)
            self._db.execute(
                "INSERT INTO commands (id, kind, payload, priority, state, received_at, expires_at,"
                " response_topic, correlation_data, updated_at) VALUES (?, ?, ?, ?, 'accepted', ?, ?, ?, ?, ?)",
                [command_id, kind, payload, priority, now, expires_at, response_topic, correlation_data, now],
            )
            row = StoredCommand(id=command_id, kind=kind, payload=payload, priority=priority, state=State.ACCEPTED,
                                received_at=now, expires_at=expires_at, response_topic=response_topic,
                                correlation_data=correlation_data, last_reply=None)
            self._transition(row, State.ACCEPTED, ReplyDraft(status="accepted"))
            if claim:
                row = replace(row, state=State.RUNNING)
                self._transition(row, State.RUNNING, ReplyDraft(status="running"))
            return Accepted(duplicate=False, state=row.state, command=row)

    def claim(self, command_id: str) -> bool:
        """See `Inbox.claim`; committed without waiting for fsync (see sqlite_file)."""
        with self._file.unsynced():
            return self.transition(command_id, State.RUNNING, ReplyDraft(status="running"))

    def transition(self, command_id: str, new_state: State, draft: ReplyDraft,
                   only_from: Iterable[str] | None = None) -> bool:
        """See `Inbox.transition`."""
        allowed = allowed_sources(new_state, only_from)
        with self._file.write():
            current = self._get(command_id)
            if current is None:
                raise StoreError(f"no command {command_id!r} in the ledger")
            if current.state not in allowed:
                return False
            self._transition(current, new_state, draft)
            return True

    def get(self, command_id: str) -> StoredCommand | None:
        with self._file.lock:
            return self._get(command_id)

    def known(self, command_id: str) -> bool:
        """Whether the ledger holds this id, without reading its payload (one primary-key read)."""
        with self._file.lock:
            return self._db.execute("SELECT 1 FROM commands WHERE id = ?", [command_id]).fetchone() is not None

    def next_runnable(self) -> StoredCommand | None:
        query = (f"SELECT {COMMAND_COLUMNS} FROM commands WHERE state = 'accepted'"
                 " ORDER BY priority DESC, received_at, rowid LIMIT 1")
        with self._file.lock:
            rows = list(self._db.query(query))
        return StoredCommand(**rows[0]) if rows else None

    def in_state(self, state: str) -> list[StoredCommand]:
        query = f"SELECT {COMMAND_COLUMNS} FROM commands WHERE state = ? ORDER BY received_at, rowid"
        with self._file.lock:
            return [StoredCommand(**r) for r in self._db.query(query, [state])]

    def count_in_state(self, state: str) -> int:
        with self._file.lock:
            return self._db.execute("SELECT COUNT(*) FROM commands WHERE state = ?", [state]).fetchone()[0]

    def counts(self) -> dict[str, dict[str, int]]:
        """Commands in the ledger by kind, then state (telemetry's `commands`, the agent's /metrics)."""
        with self._file.lock:
            rows = self._db.execute("SELECT kind, state, COUNT(*) FROM commands GROUP BY kind, state").fetchall()
        counts: dict[str, dict[str, int]] = {}
        for kind, state, n in rows:
            counts.setdefault(kind, {})[state] = n
        return counts

    def forget_finished(self, before: float, batch: int = 1000) -> int:
        """Delete finished commands last changed before `before` (epoch seconds), `batch` rows per
        transaction so intake waits little; returns how many. Their replies already sit in the
        outbox on their own. A redelivery of a forgotten id is a new command (answered `expired`
        once its `expires_at` has passed). No fsync: a delete lost to a power cut is redone later."""
        finished = sorted(lifecycle.TERMINAL)
        marks = ", ".join("?" for _ in finished)
        select = f"SELECT id FROM commands WHERE state IN ({marks}) AND updated_at < ? LIMIT ?"
        deleted = 0
        while True:
            with self._file.unsynced(needs_sync=False), self._file.write():
                n = self._db.execute(f"DELETE FROM commands WHERE id IN ({select})",
                                     [*finished, before, batch]).rowcount
            deleted += n
            if n < batch:
                return deleted

    # --- internals (caller holds the lock and a transaction) -------------------------------------

    def _get(self, command_id: str) -> StoredCommand | None:
        rows = list(self._db.query(f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?", [command_id]))
        return StoredCommand(**rows[0]) if rows else None

    def _transition(self, command: StoredCommand, new_state: str, draft: ReplyDraft) -> None:
        payload = self._outbox.add_reply(command.id, draft, command.response_topic, command.correlation_data)
        self._db.execute(
            "UPDATE commands SET state = ?, last_reply = ?, updated_at = ? WHERE id = ?",
            [new_state, payload, time.time(), command.id],
        )


class MemoryInbox:
    """The ledger in memory, for unit tests of the executor (and intake): the same states,
    transitions and replies as `SqliteInbox`, stored in a MemoryOutbox under its lock."""

    def __init__(self, outbox: MemoryOutbox) -> None:
        self._outbox = outbox
        self._lock = outbox.lock
        self._commands: dict[str, StoredCommand] = {}  # in arrival order

    def accept(self, command_id: str, kind: str, payload: str, priority: int, expires_at: float | None,
               response_topic: str | None = None, correlation_data: bytes | None = None,
               claim: bool = False) -> Accepted:
        with self._lock:
            known = self._commands.get(command_id)
            if known is not None:
                if known.last_reply is not None:
                    self._outbox.resend_reply(known.last_reply, known.response_topic, known.correlation_data)
                return Accepted(duplicate=True, state=known.state)
            self._outbox.refuse_if_full(command_id)
            self._commands[command_id] = StoredCommand(
                id=command_id, kind=kind, payload=payload, priority=priority, state=State.ACCEPTED,
                received_at=time.time(), expires_at=expires_at, response_topic=response_topic,
                correlation_data=correlation_data, last_reply=None)
            self._move(command_id, State.ACCEPTED, ReplyDraft(status="accepted"))
            if claim:
                self._move(command_id, State.RUNNING, ReplyDraft(status="running"))
            stored = replace(self._commands[command_id], last_reply=None)
            return Accepted(duplicate=False, state=stored.state, command=stored)

    def known(self, command_id: str) -> bool:
        with self._lock:
            return command_id in self._commands

    def claim(self, command_id: str) -> bool:
        return self.transition(command_id, State.RUNNING, ReplyDraft(status="running"))

    def transition(self, command_id: str, new_state: State, draft: ReplyDraft,
                   only_from: Iterable[str] | None = None) -> bool:
        with self._lock:
            if command_id not in self._commands:
                raise StoreError(f"no command {command_id!r} in the ledger")
            if self._commands[command_id].state not in allowed_sources(new_state, only_from):
                return False
            self._move(command_id, new_state, draft)
            return True

    def get(self, command_id: str) -> StoredCommand | None:
        with self._lock:
            return self._commands.get(command_id)

    def next_runnable(self) -> StoredCommand | None:
        queued = self.in_state(State.ACCEPTED)
        return min(queued, key=lambda c: (-c.priority, c.received_at)) if queued else None

    def in_state(self, state: str) -> list[StoredCommand]:
        with self._lock:
            return [c for c in self._commands.values() if c.state == state]

    def _move(self, command_id: str, new_state: str, draft: ReplyDraft) -> None:
        command = self._commands[command_id]
        payload = self._outbox.add_reply(command_id, draft, command.response_topic, command.correlation_data)
        self._commands[command_id] = replace(command, state=new_state, last_reply=payload)
