"""The `watch` feed: rows newer than a cursor (the highest row id seen) in each feed table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from cloud_bridge.store.connection import Connection
from cloud_bridge.store.rows import ChunkRow, EventRow, ReplyRow, StateChange

FEED_TABLES = ("replies", "events", "device_states", "stream_chunks")

R = TypeVar("R")


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
