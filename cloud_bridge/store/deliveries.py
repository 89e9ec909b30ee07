"""The webhook outbox and delivery log of alerts: one row per (alert change, webhook), written in the
transaction that raises or clears the alert, so a notification survives a crash (at least once)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cloud_bridge.store.connection import Connection
from cloud_bridge.store.rows import stamp


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    alert_id: int
    event: str
    webhook: str
    format: str
    payload: str
    state: str
    attempts: int
    last_error: str | None
    created_at: str
    next_attempt_at: str
    delivered_at: str | None


class Deliveries:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def enqueue(self, alert_id: int, event: str, webhook: str, format_: str, payload: str,
                now: datetime | None = None) -> None:
        ts = stamp(now)
        self._db.execute(
            "INSERT INTO alert_deliveries (alert_id, event, webhook, format, payload, state, created_at, "
            "next_attempt_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
            (alert_id, event, webhook, format_, payload, ts, ts),
        )

    def due(self, now: datetime | None = None, limit: int = 50) -> list[DeliveryRow]:
        """Pending deliveries whose next attempt is due, oldest first."""
        rows = self._db.query(
            "SELECT * FROM alert_deliveries WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
            (stamp(now), limit),
        )
        return [DeliveryRow(**row) for row in rows]

    def claim(self, row: DeliveryRow, retry_at: datetime) -> bool:
        """Take a due delivery (pushing its next attempt to `retry_at` in case this bridge dies while
        sending). False when another replica took it first."""
        return self._db.execute(
            "UPDATE alert_deliveries SET next_attempt_at = ? WHERE id = ? AND state = 'pending' "
            "AND next_attempt_at = ?",
            (stamp(retry_at), row.id, row.next_attempt_at),
        ) == 1

    def finish(self, delivery_id: int, attempts: int, error: str | None, state: str,
               now: datetime | None = None) -> None:
        """Record a round of attempts: `delivered`, still `pending` (retried at the claimed time) or `failed`."""
        self._db.execute(
            "UPDATE alert_deliveries SET attempts = attempts + ?, last_error = ?, state = ?, "
            "delivered_at = CASE WHEN ? = 'delivered' THEN ? END WHERE id = ?",
            (attempts, error, state, state, stamp(now), delivery_id),
        )

    def recent(self, limit: int = 50) -> list[DeliveryRow]:
        """The delivery log, newest first."""
        rows = self._db.query("SELECT * FROM alert_deliveries ORDER BY id DESC LIMIT ?", (limit,))
        return [DeliveryRow(**row) for row in rows]
