"""Retention: deleting what the registry may forget (`[retention]`), in small transactions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from autoglm_wire.lifecycle import TERMINAL_STATES
from cloud_bridge.store.connection import Connection, placeholders
from cloud_bridge.store.rollouts import ACTIVE_STATES
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
        notifications no longer pending, and rollouts no longer running or paused with their
        devices' rows, unless one of those changed since or has a deploy or rollback under way), stream
        chunks older than `chunks_before`, dead letters older than `dead_letters_before` and audit
        log entries older than `audit_before`; None keeps that kind. Works in transactions of at
        most `batch` rows, so ingest is never held up for long. Returns the rows deleted, by table."""
        terminal = placeholders(TERMINAL_STATES)
        finished_rollout = (  # parameters: ACTIVE_STATES, the cutoff twice
            f"r.state NOT IN ({placeholders(ACTIVE_STATES)}) AND r.updated_at < ? AND NOT EXISTS (SELECT 1 "
            "FROM rollout_devices d WHERE d.rollout_id = r.id AND (d.updated_at >= ? OR d.state IN ('waiting', "
            "'queued') OR d.rollback IN ('wanted', 'queued')))")
        # (table, the key of its rows, the keys of a batch to delete, cutoff (None: keep that kind),
        # the select's parameters with None where the cutoff goes)
        plans: list[tuple[str, str, str, datetime | None, tuple[Any, ...]]] = [
            ("stream_chunks", "id", "SELECT id FROM stream_chunks WHERE received_at < ?", chunks_before, (None,)),
            ("commands", "id", f"SELECT id FROM commands WHERE updated_at < ? AND state IN ({terminal})", before,
             (None, *TERMINAL_STATES)),
            ("replies", "id", "SELECT id FROM replies r WHERE received_at < ? AND NOT EXISTS (SELECT 1 FROM commands "
             f"c WHERE c.wire_id = r.command_id AND c.device_id = r.device_id AND c.state NOT IN ({terminal}))",
             before, (None, *TERMINAL_STATES)),
            ("events", "id", "SELECT id FROM events WHERE received_at < ?", before, (None,)),
            ("alerts", "id", "SELECT id FROM alerts WHERE cleared_at < ?", before, (None,)),
            ("device_states", "id", "SELECT id FROM device_states WHERE ts < ?", before, (None,)),
            ("alert_deliveries", "id", "SELECT id FROM alert_deliveries WHERE created_at < ? AND state <> 'pending'",
             before, (None,)),
            ("rollout_devices", "(rollout_id, device_id)", "SELECT rd.rollout_id, rd.device_id FROM rollout_devices "
             f"rd JOIN rollouts r ON r.id = rd.rollout_id WHERE {finished_rollout}", before,
             (*ACTIVE_STATES, None, None)),
            ("rollouts", "id", f"SELECT r.id FROM rollouts r WHERE {finished_rollout} AND NOT EXISTS "
             "(SELECT 1 FROM rollout_devices rd WHERE rd.rollout_id = r.id)", before, (*ACTIVE_STATES, None, None)),
            ("dead_letters", "id", "SELECT id FROM dead_letters WHERE received_at < ?", dead_letters_before, (None,)),
            ("audit_log", "id", "SELECT id FROM audit_log WHERE ts < ?", audit_before, (None,)),
        ]
        deleted: dict[str, int] = {}
        for table, key, select, cutoff, params in plans:
            if cutoff is None:
                continue
            values = tuple(stamp(cutoff) if value is None else value for value in params)
            deleted[table] = 0
            while True:
                with self._db.transaction():
                    n = self._db.execute(f"DELETE FROM {table} WHERE {key} IN ({select} LIMIT ?)", (*values, batch))
                deleted[table] += n
                if n < batch:
                    break
        return deleted
