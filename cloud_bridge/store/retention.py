"""Retention: deleting what the registry may forget (`[retention]`), in small transactions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from autoglm_wire.lifecycle import TERMINAL_STATES
from cloud_bridge.store.connection import Connection, placeholders
from cloud_bridge.store.rows import stamp

PRUNE_BATCH = 5000  # rows per transaction when old rows are deleted


class Retention:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def prune(self, before: datetime | None, chunks_before: datetime | None,
              dead_letters_before: datetime | None = None, audit_before: datetime | None = None,
              batch: int = PRUNE_BATCH) -> dict[str, int]:
        """Delete what is finished and older than `before` (commands in a terminal state and
        replies of commands no longer active, events, cleared alerts, device state history, alert
        notifications no longer pending), stream chunks older than `chunks_before`, dead letters older
        than `dead_letters_before` and audit log entries older than `audit_before`; None
        keeps that kind. Works in transactions of at most `batch` rows, so ingest is never held up
        for long. Returns the rows deleted, by table."""
        terminal = placeholders(TERMINAL_STATES)
        plans: list[tuple[str, str, datetime | None, tuple[Any, ...]]] = [
            ("stream_chunks", "SELECT id FROM stream_chunks WHERE received_at < ?", chunks_before, ()),
            ("commands", f"SELECT id FROM commands WHERE updated_at < ? AND state IN ({terminal})", before,
             TERMINAL_STATES),
            ("replies", "SELECT id FROM replies r WHERE received_at < ? AND NOT EXISTS (SELECT 1 FROM commands c "
             f"WHERE c.wire_id = r.command_id AND c.device_id = r.device_id AND c.state NOT IN ({terminal}))",
             before, TERMINAL_STATES),
            ("events", "SELECT id FROM events WHERE received_at < ?", before, ()),
            ("alerts", "SELECT id FROM alerts WHERE cleared_at < ?", before, ()),
            ("device_states", "SELECT id FROM device_states WHERE ts < ?", before, ()),
            ("alert_deliveries", "SELECT id FROM alert_deliveries WHERE created_at < ? AND state <> 'pending'",
             before, ()),
            ("dead_letters", "SELECT id FROM dead_letters WHERE received_at < ?", dead_letters_before, ()),
            ("audit_log", "SELECT id FROM audit_log WHERE ts < ?", audit_before, ()),
        ]
        deleted: dict[str, int] = {}
        for table, select, cutoff, params in plans:
            if cutoff is None:
                continue
            deleted[table] = 0
            while True:
                with self._db.transaction():
                    n = self._db.execute(f"DELETE FROM {table} WHERE id IN ({select} LIMIT ?)",
                                         (stamp(cutoff), *params, batch))
                deleted[table] += n
                if n < batch:
                    break
        return deleted
