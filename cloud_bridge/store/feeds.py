"""The `watch` feed: rows newer than a cursor in each feed table.

`Feeds` reads rows past an id. `FeedReader` follows the tables from "now" on without losing a row
to a late commit: row ids are handed out at insert, so with several writers (bridge replicas on
one PostgreSQL, or one bridge's own threads) a transaction holding a lower id can commit after
one holding a higher id. A reader that only asked for `id > highest seen` would pass the lower
row by for ever. `TableCursor` remembers the ids it passed without seeing (pure logic, below) and
the reader asks for them again until they turn up or `GAP_WAIT_S` has passed: an id can also stay
missing for good (a rolled-back insert; on PostgreSQL an `ON CONFLICT DO NOTHING` duplicate takes
an id too). On SQLite writers take turns and ids come in order, so nothing goes missing there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cloud_bridge.store.connection import Connection
from cloud_bridge.store.rows import ChunkRow, EventRow, ReplyRow, StateChange

FEED_TABLES = ("replies", "events", "device_states", "stream_chunks")
# How long an id passed without its row is looked for: far longer than any batch transaction of
# the ingest takes to commit (STORE_ATTEMPTS' backoff aside, a commit is milliseconds).
GAP_WAIT_S = 30.0
# The most missing ids a cursor looks for again at once (each is a query parameter): a larger jump
# in ids keeps only the ids just below the new highest.
MAX_MISSING = 500



class _Row(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def device_id(self) -> str: ...


R = TypeVar("R", bound=_Row)


@dataclass
class TableCursor:
    """A reader's place in one feed table: the highest id seen, and the ids below it not seen yet
    (with the `time.monotonic()` they were first missed)."""

    last: int
    missing: dict[int, float] = field(default_factory=dict)

    def record(self, ids: Iterable[int], now: float) -> None:
        """Take in the ids a read returned (ascending: rows past `last` and missing rows that turned
        up); ids skipped on the way up become missing; missing ids older than GAP_WAIT_S are given up."""
        for row_id in ids:
            if row_id > self.last:
                for skipped in range(max(self.last + 1, row_id - MAX_MISSING), row_id):
                    self.missing[skipped] = now
                self.last = row_id
            else:
                self.missing.pop(row_id, None)
        for row_id, since in list(self.missing.items()):
            if now - since > GAP_WAIT_S:
                del self.missing[row_id]
        if len(self.missing) > MAX_MISSING:
            for row_id in sorted(self.missing)[:len(self.missing) - MAX_MISSING]:
                del self.missing[row_id]


class Feeds:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def last_ids(self) -> dict[str, int]:
        """Highest row id of each feed table, so `watch` can start at "now"."""
        return {
            table: self._db.query(f"SELECT coalesce(max(id), 0) AS m FROM {table}")[0]["m"]
            for table in FEED_TABLES
        }

    def _after(self, table: str, make: Callable[[dict[str, Any]], R],
               after_id: int, device_id: str | None) -> list[R]:
        rows = self._db.query(
            f"SELECT * FROM {table} WHERE id > ? AND (? IS NULL OR device_id = ?) ORDER BY id",
            (after_id, device_id, device_id),
        )
        return [make(row) for row in rows]

    def past(self, table: str, make: Callable[[dict[str, Any]], R], cursor: TableCursor) -> list[R]:
        """Rows past `cursor.last` and the rows of its missing ids that have turned up, ascending by id."""
        missing = sorted(cursor.missing)
        also = f" OR id IN ({', '.join('?' * len(missing))})" if missing else ""
        rows = self._db.query(f"SELECT * FROM {table} WHERE id > ?{also} ORDER BY id", (cursor.last, *missing))
        return [make(row) for row in rows]

    def replies(self, after_id: int, device_id: str | None = None) -> list[ReplyRow]:
        """Replies with id > `after_id`, oldest first."""
        return self._after("replies", ReplyRow.from_row, after_id, device_id)

    def events(self, after_id: int, device_id: str | None = None) -> list[EventRow]:
        """Events with id > `after_id`, oldest first."""
        return self._after("events", EventRow.from_row, after_id, device_id)

    def device_states(self, after_id: int, device_id: str | None = None) -> list[StateChange]:
        """Device state changes with id > `after_id`, oldest first."""
        return self._after("device_states", lambda row: StateChange(**row), after_id, device_id)

    def chunks(self, after_id: int, device_id: str | None = None) -> list[ChunkRow]:
        """Stream chunks with id > `after_id`, in arrival order."""
        return self._after("stream_chunks", ChunkRow.from_row, after_id, device_id)


class FeedReader:
    """The feed tables from the moment it was made on: each call returns the rows not returned
    before, late commits included (module docstring). With `device_id`, only that device's rows
    (filtered after the read: every new row is read, so that no id looks missing)."""

    def __init__(self, feeds: Feeds, device_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._feeds, self._device_id, self._clock = feeds, device_id, clock
        self._cursors = {table: TableCursor(last) for table, last in feeds.last_ids().items()}

    def _new(self, table: str, make: Callable[[dict[str, Any]], R]) -> list[R]:
        cursor = self._cursors[table]
        rows = self._feeds.past(table, make, cursor)
        cursor.record((row.id for row in rows), self._clock())
        return [row for row in rows if self._device_id is None or row.device_id == self._device_id]

    def replies(self) -> list[ReplyRow]:
        return self._new("replies", ReplyRow.from_row)

    def events(self) -> list[EventRow]:
        return self._new("events", EventRow.from_row)

    def device_states(self) -> list[StateChange]:
        return self._new("device_states", lambda row: StateChange(**row))

    def chunks(self) -> list[ChunkRow]:
        return self._new("stream_chunks", ChunkRow.from_row)
