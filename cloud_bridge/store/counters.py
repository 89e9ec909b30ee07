"""Named counters of what the bridge dropped or ignored (bad payloads, duplicate replies and chunks)."""

from __future__ import annotations

from cloud_bridge.store.connection import Connection


class Counters:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def bump(self, name: str, by: int = 1) -> None:
        """Add `by` to a named counter (bad payloads, duplicates, ...)."""
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
            (name, by),
        )

    def all(self) -> dict[str, int]:
        """Every counter, by name."""
        return {row["name"]: row["value"] for row in self._db.query("SELECT name, value FROM counters ORDER BY name")}
