"""Dead letters: messages the bridge received and acknowledged but could not store, kept as received
(raw payload, topic, error, time) so that nothing a device sends disappears without a trace.

A message is dead-lettered when it does not follow protocol v1 or when storing it failed for a cause
that retrying cannot cure (a value the database refuses, a bug); `ingest` decides. Each one bumps
the `dead_letters` counter; `retention` prunes old ones (`[retention] dead_letter_days`).
"""

from __future__ import annotations

from datetime import datetime

from cloud_bridge.store.connection import Connection
from cloud_bridge.store.counters import Counters
from cloud_bridge.store.rows import DeadLetterRow, stamp

MAX_STORED_BYTES = 4 * 1024 * 1024  # of a larger payload only the start is kept (`size` says how large it was)
MAX_TEXT_CHARS = 2000  # of the topic and of the error


def storable_text(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with what a TEXT column of either database refuses (NUL,
    lone surrogates) escaped."""
    text = text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")


class DeadLetters:
    def __init__(self, connection: Connection, counters: Counters) -> None:
        self._db = connection
        self._counters = counters

    def record(self, topic: str, device_id: str | None, payload: bytes, error: str,
               now: datetime | None = None) -> None:
        """Keep a message that could not be stored, with why; counts it in `dead_letters`."""
        with self._db.transaction():
            self._db.execute(
                "INSERT INTO dead_letters (device_id, topic, payload, size, error, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (device_id, storable_text(topic, MAX_TEXT_CHARS), payload[:MAX_STORED_BYTES], len(payload),
                 storable_text(error, MAX_TEXT_CHARS), stamp(now)),
            )
            self._counters.bump("dead_letters")

    def recent(self, device_id: str | None = None, limit: int = 50) -> list[DeadLetterRow]:
        """Most recent dead letters first, optionally of one device."""
        rows = self._db.query(
            "SELECT * FROM dead_letters WHERE (? IS NULL OR device_id = ?) ORDER BY id DESC LIMIT ?",
            (device_id, device_id, limit),
        )
        return [DeadLetterRow(**row) for row in rows]

    def count(self) -> int:
        """How many dead letters are kept."""
        return self._db.query("SELECT count(*) AS n FROM dead_letters")[0]["n"]

    def by_device_since(self, since: datetime) -> dict[str | None, int]:
        """Dead letters received since `since`, by device (None: topics that name no device)."""
        rows = self._db.query(
            "SELECT device_id, count(*) AS n FROM dead_letters WHERE received_at >= ? GROUP BY device_id",
            (stamp(since),),
        )
        return {row["device_id"]: row["n"] for row in rows}
