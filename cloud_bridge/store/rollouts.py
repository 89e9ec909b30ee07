"""Rollouts of a model to a set of devices, in waves, and each device's progress in one.

Every change is a conditional UPDATE (the state it moves from is in its WHERE clause), so bridge
replicas driving the same rollouts on one PostgreSQL never both start a wave, both queue a rollback
or both settle a device: the one whose UPDATE changed a row does the rest of the step, in the same
transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cloud_bridge.errors import InvalidRequest
from cloud_bridge.store.connection import Connection
from cloud_bridge.store.rows import loads, stamp

ACTIVE_STATES = ("running", "paused")
MAX_NUMBER = 2**63  # progress figures outside [0, 2**63) are dropped (a BIGINT column holds them)
# Device states: a deploy still under way, one that left the device on the new model, one that
# left it on its previous model (a failure, counted against --max-failures), and the others.
UNDER_WAY = ("waiting", "queued")
SUCCEEDED = ("activated", "unchanged")
FAILED = ("rolled_back", "download_failed", "failed")
NOT_COUNTED = ("timed_out", "cancelled")


class UnknownRollout(InvalidRequest):
    def __init__(self, rollout_id: str) -> None:
        super().__init__(f"no rollout {rollout_id!r}; list them with `cloud-bridge rollout status`")


@dataclass(frozen=True)
class RolloutRow:
    id: str
    model_name: str
    model_sha256: str
    target: str
    waves: list[int]
    max_failures: int
    canary: dict[str, Any] | None
    state: str
    wave: int
    reason: str | None
    created_at: str
    updated_at: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RolloutRow:
        return cls(**{**row, "waves": json.loads(row["waves"]), "canary": loads(row["canary"])})


@dataclass(frozen=True)
class RolloutDeviceRow:
    rollout_id: str
    device_id: str
    wave: int
    state: str
    command_id: str | None
    phase: str | None
    percent: float | None
    bytes: int | None
    total: int | None
    canary: dict[str, Any] | None
    reason: str | None
    rollback: str | None
    rollback_command_id: str | None
    updated_at: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RolloutDeviceRow:
        return cls(**{**row, "canary": loads(row["canary"])})

    @property
    def final(self) -> bool:
        return self.state not in UNDER_WAY


class Rollouts:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    # --- rollouts ----------------------------------------------------------------------------------

    def create(self, rollout: RolloutRow, plan: list[list[str]], now: datetime | None = None) -> None:
        """Store a rollout and its devices, wave by wave (every device `waiting`)."""
        ts = stamp(now)
        with self._db.transaction():
            if self._db.query("SELECT 1 FROM rollouts WHERE id = ?", (rollout.id,)):
                raise InvalidRequest(f"rollout id {rollout.id!r} is taken; leave --id out for a fresh one")
            self._db.execute(
                "INSERT INTO rollouts (id, model_name, model_sha256, target, waves, max_failures, canary, state, wave, "
                "reason, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rollout.id, rollout.model_name, rollout.model_sha256, rollout.target, json.dumps(rollout.waves),
                 rollout.max_failures, json.dumps(rollout.canary) if rollout.canary is not None else None,
                 rollout.state, 0, None, ts, ts),
            )
            for wave, devices in enumerate(plan):
                for device_id in devices:
                    self._db.execute(
                        "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, updated_at) "
                        "VALUES (?, ?, ?, 'waiting', ?)",
                        (rollout.id, device_id, wave, ts),
                    )

    def get(self, rollout_id: str) -> RolloutRow:
        rows = self._db.query("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if not rows:
            raise UnknownRollout(rollout_id)
        return RolloutRow.from_row(rows[0])

    def recent(self, limit: int = 20) -> list[RolloutRow]:
        rows = self._db.query("SELECT * FROM rollouts ORDER BY created_at DESC, id LIMIT ?", (limit,))
        return [RolloutRow.from_row(row) for row in rows]

    def needing_attention(self) -> list[RolloutRow]:
        """Rollouts the service loop drives: running or paused ones, and any with a rollback to queue or follow."""
        rows = self._db.query(
            "SELECT * FROM rollouts WHERE state IN ('running', 'paused') OR id IN (SELECT rollout_id FROM "
            "rollout_devices WHERE rollback IN ('wanted', 'queued') OR state IN ('waiting', 'queued')) ORDER BY id"
        )
        return [RolloutRow.from_row(row) for row in rows]

    def move(self, rollout_id: str, from_states: tuple[str, ...], to: str, reason: str | None = None,
             now: datetime | None = None) -> bool:
        """Change the rollout's state if it is in one of `from_states`; False otherwise."""
        marks = ", ".join("?" for _ in from_states)
        return self._db.execute(
            f"UPDATE rollouts SET state = ?, reason = coalesce(?, reason), updated_at = ? WHERE id = ? "
            f"AND state IN ({marks})",
            (to, reason, stamp(now), rollout_id, *from_states),
        ) == 1

    def advance_wave(self, rollout_id: str, wave: int, now: datetime | None = None) -> bool:
        """Wave `wave` -> `wave + 1`, for the one caller that sees it at `wave` and running."""
        return self._db.execute(
            "UPDATE rollouts SET wave = ?, updated_at = ? WHERE id = ? AND wave = ? AND state = 'running'",
            (wave + 1, stamp(now), rollout_id, wave),
        ) == 1

    # --- devices -----------------------------------------------------------------------------------

    def devices(self, rollout_id: str, wave: int | None = None) -> list[RolloutDeviceRow]:
        rows = self._db.query(
            "SELECT * FROM rollout_devices WHERE rollout_id = ? AND (? IS NULL OR wave = ?) ORDER BY wave, device_id",
            (rollout_id, wave, wave),
        )
        return [RolloutDeviceRow.from_row(row) for row in rows]

    def failures(self, rollout_id: str) -> int:
        marks = ", ".join("?" for _ in FAILED)
        rows = self._db.query(
            f"SELECT count(*) AS n FROM rollout_devices WHERE rollout_id = ? AND state IN ({marks})",
            (rollout_id, *FAILED),
        )
        return int(rows[0]["n"])

    def mark_queued(self, rollout_id: str, device_id: str, command_id: str, now: datetime | None = None) -> bool:
        return self._db.execute(
            "UPDATE rollout_devices SET state = 'queued', command_id = ?, updated_at = ? WHERE rollout_id = ? "
            "AND device_id = ? AND state = 'waiting'",
            (command_id, stamp(now), rollout_id, device_id),
        ) == 1

    def settle(self, rollout_id: str, device_id: str, state: str, reason: str | None,
               canary: dict[str, Any] | None, now: datetime | None = None) -> bool:
        """A device's outcome (from `queued` or `waiting`); False if someone settled it first."""
        return self._db.execute(
            "UPDATE rollout_devices SET state = ?, reason = ?, canary = ?, updated_at = ? WHERE rollout_id = ? "
            "AND device_id = ? AND state IN ('waiting', 'queued')",
            (state, reason, json.dumps(canary) if canary is not None else None, stamp(now), rollout_id, device_id),
        ) == 1

    def record_progress(self, device_id: str, data: dict[str, Any], now: datetime | None = None) -> bool:
        """A `model_progress` Event's phase and figures, on the device's row of the rollout it names."""
        rollout_id = data.get("rollout")
        if not isinstance(rollout_id, str):
            return False

        def number(key: str) -> float | None:  # what a BIGINT/REAL column takes; anything else is left out
            value = data.get(key)
            plain = isinstance(value, int | float) and not isinstance(value, bool)
            return value if plain and 0 <= value < MAX_NUMBER else None

        phase = data.get("phase") if isinstance(data.get("phase"), str) else None
        size = number("total")
        done = number("bytes")
        return self._db.execute(
            "UPDATE rollout_devices SET phase = ?, percent = ?, bytes = ?, total = ?, updated_at = ? "
            "WHERE rollout_id = ? AND device_id = ? AND state = 'queued'",
            (phase, number("percent"), int(done) if done is not None else None, int(size) if size is not None else None,
             stamp(now), rollout_id, device_id),
        ) == 1

    def want_rollback(self, rollout_id: str, wave: int | None = None, now: datetime | None = None) -> int:
        """Mark the devices (of one wave, or all) for a bridge rollback: each that activated gets a
        `model` rollback; one still under way gets it if it activates. Returns how many were marked."""
        return self._db.execute(
            "UPDATE rollout_devices SET rollback = 'wanted', updated_at = ? WHERE rollout_id = ? "
            "AND (? IS NULL OR wave = ?) AND rollback IS NULL AND state IN ('waiting', 'queued', 'activated')",
            (stamp(now), rollout_id, wave, wave),
        )

    def mark_rollback(self, rollout_id: str, device_id: str, from_state: str, to: str,
                      command_id: str | None = None, now: datetime | None = None) -> bool:
        return self._db.execute(
            "UPDATE rollout_devices SET rollback = ?, rollback_command_id = coalesce(?, rollback_command_id), "
            "updated_at = ? WHERE rollout_id = ? AND device_id = ? AND rollback = ?",
            (to, command_id, stamp(now), rollout_id, device_id, from_state),
        ) == 1
