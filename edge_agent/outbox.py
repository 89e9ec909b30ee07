"""The outbox: replies, events and status stored until the broker acknowledges them, then deleted
(the link's pump publishes them in id order). Bounded by soft caps (`OutboxLimits`): at or above
either, new Events, rejections and the re-sent replies of duplicate deliveries are dropped and
counted, and new commands refused with `busy`; replies of accepted commands are always stored.
Every reply takes the next `seq` when it is stored (above the file's seq mark, `seq_mark.py`).

`Outbox` is what the link and intake use; `SqliteOutbox` keeps the rows in the device's SQLite
file (the inbox writes a state change and its reply in one transaction through it),
`MemoryOutbox` is its in-memory twin for unit tests.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from autoglm_wire.errors import Busy, ProtocolError
from autoglm_wire.lifecycle import ReplyStatus
from autoglm_wire.protocol import ErrorInfo, Event, Reply, format_ts, to_bytes, utc_now
from autoglm_wire.topics import DeviceTopics
from edge_agent.sqlite_file import SqliteFile


@dataclass(frozen=True)
class OutboxLimits:
    """Soft caps on the outbox. At or above either, new events, rejections and duplicates' re-sent
    replies are dropped (counted) and new commands are refused with `busy`; replies of accepted
    commands are always stored."""

    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation_data: bytes | None


@dataclass(frozen=True)
class ReplyDraft:
    """A reply before the outbox gives it a seq and a timestamp."""

    status: ReplyStatus
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, status: ReplyStatus, error: ProtocolError) -> ReplyDraft:
        return cls(status=status, error=ErrorInfo(code=error.code, message=error.message))


def reply_payload(device_id: str, command_id: str | None, seq: int, draft: ReplyDraft) -> bytes:
    """The Reply a draft becomes with its seq, stamped now."""
    reply = Reply(command_id=command_id, device_id=device_id, status=draft.status, seq=seq, ts=format_ts(utc_now()),
                  output=draft.output, error=draft.error, metrics=draft.metrics)
    return to_bytes(reply)


def reply_topics(topics: DeviceTopics, response_topic: str | None) -> list[str]:
    """Where a reply goes: the device's reply topic, and the command's MQTT 5 ResponseTopic if other."""
    if response_topic and response_topic != topics.reply:
        return [topics.reply, response_topic]
    return [topics.reply]


class Outbox(Protocol):
    """The outbox as the link (publish, delete on ack) and intake (reject) see it."""

    def pending(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Rows with id > after_id, oldest first."""
        ...

    def delete(self, ids: list[int]) -> None:
        """Forget rows the broker acknowledged."""
        ...

    def reject(self, command_id: str | None, draft: ReplyDraft, event: Event,
               response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        """Store a `rejected` reply and its Event (unless the outbox is full: both dropped, counted)."""
        ...


class SqliteOutbox:
    """The outbox table of the SQLite file. Thread-safe; every public method but the inbox's
    (`add_reply`, `resend_reply`, `refuse_if_full`: inside its transaction) is one transaction."""

    def __init__(self, file: SqliteFile, topics: DeviceTopics, limits: OutboxLimits | None = None) -> None:
        self._file = file
        self._db = file.db
        self.topics = topics
        self.limits = limits or OutboxLimits()
        self._dropped: Counter[str] = Counter()  # what the caps cost, by kind
        self._full_reported = False
        file.on_writes_recovered = self._writes_recovered
        self.on_reply: Callable[[bytes], None] | None = None  # every reply stored (edge_agent.local_calls)

    @property
    def dropped(self) -> dict[str, int]:
        """What the caps and a full disk cost since the agent started, by kind (Telemetry's `dropped`)."""
        return dict(self._dropped + Counter(store_full_writes=self._file.failed_writes))

    def enqueue_event(self, event: Event) -> bool:
        """Store an Event for publishing; False if the outbox is full (the drop is counted)."""
        with self._file.write():
            return self._enqueue_event_capped(event)

    def enqueue_status(self, payload: bytes) -> None:
        """Store a retained Status (QoS 1) for publishing: a model reload re-announces the device."""
        with self._file.write():
            self._db.execute("INSERT INTO outbox (topic, payload, qos, retain, bytes, created_at) "
                             "VALUES (?, ?, 1, 1, ?, ?)", [self.topics.status, payload, len(payload), time.time()])

    def reject(self, command_id: str | None, draft: ReplyDraft, event: Event,
               response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        """Store a `rejected` reply and its Event; at or above a cap neither (counted in `rejections`
        and `events`): a flood of bad payloads cannot grow the outbox. Committed without its own
        fsync: the link syncs before the PUBACK."""
        with self._file.unsynced(), self._file.write():
            if self._over_cap("rejections"):
                self._dropped["events"] += 1
                return
            self.add_reply(command_id, draft, response_topic, correlation_data)
            self._enqueue(self.topics.event, to_bytes(event), qos=1)

    def pending(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Outbox rows with id > after_id, oldest first."""
        with self._file.lock:
            rows = self._db.query(
                "SELECT id, topic, payload, qos, retain, correlation_data FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                [after_id, limit],
            )
            return [OutboxRow(**{**r, "retain": bool(r["retain"])}) for r in rows]

    def delete(self, ids: Iterable[int]) -> None:
        """Forget acknowledged rows; no fsync (a lost delete only re-publishes acked rows)."""
        id_list = list(ids)
        if not id_list:
            return
        with self._file.unsynced(needs_sync=False), self._file.write():
            self._db.conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in id_list])
            if self._full_reported and not self._full():
                self._full_reported = False
                self._enqueue(self.topics.event, self._event_bytes(
                    "info", "outbox_recovered", "the outbox is below its caps again", self.dropped), qos=1)
                self._file.sync_later()  # this Event row must reach the disk before the pump publishes it

    def depth(self) -> tuple[int, int]:
        """(rows, payload bytes) waiting in the outbox."""
        with self._file.lock:
            return self._size()

    # --- the inbox's side (the caller holds a write transaction of the same file) ----------------

    def add_reply(self, command_id: str | None, draft: ReplyDraft, response_topic: str | None,
                  correlation_data: bytes | None) -> bytes:
        """Give the draft the next seq and store it; returns the reply's bytes (the ledger keeps them)."""
        seq = int(self._file.meta("reply_seq") or 0) + 1
        self._file.seq_mark.cover(seq)
        self._file.set_meta("reply_seq", str(seq))
        payload = reply_payload(self.topics.device_id, command_id, seq, draft)
        self._store_reply(payload, response_topic, correlation_data)
        if self.on_reply is not None:
            self.on_reply(payload)
        return payload

    def resend_reply(self, payload: bytes, response_topic: str | None, correlation_data: bytes | None) -> None:
        """Store a reply stored before, unchanged (a duplicate delivery gets the last reply again);
        at or above a cap it is dropped (counted in `duplicate_replies`): redeliveries cannot grow
        the outbox, and the original reply is still there or already published."""
        if self._over_cap("duplicate_replies"):
            return
        self._store_reply(payload, response_topic, correlation_data)

    def refuse_if_full(self, command_id: str) -> None:
        """A new command would add replies to a full outbox: raise Busy (counted)."""
        if self._full():
            self._dropped["commands_refused"] += 1
            raise Busy(f"the device's outbox is full (caps: {self.limits.max_rows} rows, {self.limits.max_bytes} "
                       "bytes) because the link is slow or down; resend the command later", command_id)

    # --- internals (caller holds the lock and a transaction) -------------------------------------

    def _writes_recovered(self, failed_writes: int) -> None:
        self._enqueue(self.topics.event, self._event_bytes(
            "warning", "store_recovered", "the store accepts writes again after the disk was full",
            {"failed_writes": failed_writes}), qos=1)

    def _size(self) -> tuple[int, int]:
        rows, size = self._db.execute("SELECT rows, bytes FROM outbox_size").fetchone()
        return int(rows), int(size)

    def _full(self) -> bool:
        rows, size = self._size()
        return rows >= self.limits.max_rows or size >= self.limits.max_bytes

    def _enqueue_event_capped(self, event: Event) -> bool:
        """Low-priority rows go first: an Event is dropped (counted) when the outbox is full."""
        if self._over_cap("events"):
            return False
        self._enqueue(self.topics.event, to_bytes(event), qos=1)
        return True

    def _over_cap(self, kind: str) -> bool:
        """At or above a cap: count a dropped row of `kind` and return True; the first drop of a
        full spell stores one `outbox_full` Event despite the cap."""
        if not self._full():
            return False
        self._dropped[kind] += 1
        if not self._full_reported:
            self._full_reported = True
            self._enqueue(self.topics.event, self._event_bytes(
                "error", "outbox_full", "the outbox reached its cap; new events, rejections and re-sent replies "
                "are dropped and new commands refused until the broker acknowledges the backlog", self.dropped),
                qos=1)
        return True

    def _store_reply(self, payload: bytes, response_topic: str | None, correlation_data: bytes | None) -> None:
        for topic in reply_topics(self.topics, response_topic):
            self._enqueue(topic, payload, qos=1, correlation=correlation_data)

    def _event_bytes(self, level: str, code: str, message: str, data: dict[str, Any]) -> bytes:
        return to_bytes(Event(device_id=self.topics.device_id, ts=format_ts(utc_now()), level=level,  # type: ignore[arg-type]
                              code=code, message=message, data=data))

    def _enqueue(self, topic: str, payload: bytes, qos: int, correlation: bytes | None = None) -> None:
        self._db.execute(
            "INSERT INTO outbox (topic, payload, qos, correlation_data, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [topic, payload, qos, correlation, len(payload) + len(correlation or b""), time.time()],
        )


class MemoryOutbox:
    """The outbox in memory, for unit tests of the link and the executor: rows with ids and replies
    with seqs as the SQLite outbox stores them; no caps, no disk."""

    def __init__(self, topics: DeviceTopics) -> None:
        self.topics = topics
        self.lock = threading.RLock()  # MemoryInbox holds it too: a state change and its reply are one step
        self.rows: list[OutboxRow] = []
        self._seq = 0
        self._last_id = 0

    def pending(self, after_id: int, limit: int) -> list[OutboxRow]:
        with self.lock:
            return [row for row in self.rows if row.id > after_id][:limit]

    def delete(self, ids: Iterable[int]) -> None:
        gone = set(ids)
        with self.lock:
            self.rows = [row for row in self.rows if row.id not in gone]

    def reject(self, command_id: str | None, draft: ReplyDraft, event: Event,
               response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        with self.lock:
            self.add_reply(command_id, draft, response_topic, correlation_data)
            self._append(self.topics.event, to_bytes(event), None)

    def add_reply(self, command_id: str | None, draft: ReplyDraft, response_topic: str | None,
                  correlation_data: bytes | None) -> bytes:
        with self.lock:
            self._seq += 1
            payload = reply_payload(self.topics.device_id, command_id, self._seq, draft)
            self.resend_reply(payload, response_topic, correlation_data)
        return payload

    def resend_reply(self, payload: bytes, response_topic: str | None, correlation_data: bytes | None) -> None:
        with self.lock:
            for topic in reply_topics(self.topics, response_topic):
                self._append(topic, payload, correlation_data)

    def refuse_if_full(self, command_id: str) -> None:
        """Never full: the caps are the SQLite outbox's (tests/faults/test_outbox_caps.py)."""

    def _append(self, topic: str, payload: bytes, correlation_data: bytes | None) -> None:
        self._last_id += 1
        self.rows.append(OutboxRow(id=self._last_id, topic=topic, payload=payload, qos=1, retain=False,
                                   correlation_data=correlation_data))
