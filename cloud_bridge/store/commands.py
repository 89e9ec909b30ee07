"""Commands: queueing, the bridge's sends and local ends, and moving a command forward on a reply.

Command states only move forward (`autoglm_wire.lifecycle.rank`); every state change is one
conditional UPDATE, so the serve process and a console process (or several bridge replicas) never
race each other into a regression. One exception: the bridge's own expiry of a command the device
never accepted (`expired` with no reply from the device) is provisional. The device may have received
a copy and run it anyway; its own reports (`accepted`, `running`, a terminal reply) then replace the
bridge's verdict, so the record never says `expired` for work that ran.

Lock order: a transaction that changes several command rows locks them first in id order (`lock`,
`lock_answered`), so the ingest of a batch of replies and the dispatch loop, on two replicas of one
PostgreSQL, never deadlock each other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta

from autoglm_wire.lifecycle import (
    BRIDGE_STATES,
    TERMINAL_STATES,
    State,
    is_illegal_after,
    is_terminal,
    rank,
    rejectable,
)
from autoglm_wire.local_origin import ORIGIN_LOCAL
from autoglm_wire.protocol import Command, Reply, format_ts
from cloud_bridge.errors import DuplicateCommand, UnknownCommand
from cloud_bridge.store.backends import IntegrityError
from cloud_bridge.store.connection import Connection, placeholders, slices
from cloud_bridge.store.rows import CommandRow, stamp


def _rank_sql(column: str) -> str:
    """SQL CASE expression giving `lifecycle.rank` of a state column."""
    whens = " ".join(f"WHEN '{state.value}' THEN {rank(state)}" for state in State)
    return f"(CASE {column} {whens} END)"


_REJECTABLE = "(" + ", ".join(f"'{state.value}'" for state in State if rejectable(state)) + ")"


class Commands:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def add(self, command: Command, device_id: str, now: datetime | None = None,
            batch: str | None = None, row_id: str | None = None) -> CommandRow:
        """Queue a command for a device (state `pending`). Raises DuplicateCommand if the id exists.

        `batch` names the fan-out (a group or a filter) the command belongs to, if any. `row_id`
        is for one member of a group command: the row is `row_id`, the device sees `command.id`.
        """
        ts = stamp(now)
        expires = format_ts(command.expires_at) if command.expires_at else None
        key = row_id or command.id
        try:
            self._db.execute(
                "INSERT INTO commands (id, device_id, kind, payload, created_at, expires_at, updated_at, priority, "
                "batch, wire_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, device_id, command.kind, command.model_dump_json(by_alias=True), ts, expires, ts,
                 command.priority, batch, command.id),
            )
        except IntegrityError as exc:
            raise DuplicateCommand(key) from exc
        return self.get(key)

    def add_many(self, commands: Sequence[tuple[Command, str, str | None]], now: datetime | None = None,
                 batch: str | None = None) -> list[CommandRow]:
        """Queue the (command, device id, row id) of one fan-out, as `add` does each, in one statement
        per slice (a filter over a thousand devices is not a thousand round trips). Raises
        DuplicateCommand, and queues none of them, if an id exists."""
        ts = stamp(now)
        rows = [(row_id or command.id, device_id, command.kind, command.model_dump_json(by_alias=True),
                 format_ts(command.expires_at) if command.expires_at else None, command.priority, command.id)
                for command, device_id, row_id in commands]
        keys = [row[0] for row in rows]
        for part in slices(keys):
            taken = self._db.query(f"SELECT id FROM commands WHERE id IN ({placeholders(part)}) LIMIT 1", part)
            if taken:
                raise DuplicateCommand(taken[0]["id"])
        try:
            for part in slices(rows):
                rowset, params = self._db.rowset(("text", "text", "text", "text", "text", "bigint", "text"), part)
                self._db.execute(
                    f"WITH v (i, d, k, p, e, pr, w) AS ({rowset}) INSERT INTO commands (id, device_id, kind, payload, "
                    "created_at, expires_at, updated_at, priority, batch, wire_id) "
                    "SELECT i, d, k, p, ?, e, ?, pr, ?, w FROM v",
                    [*params, ts, ts, batch],
                )
        except IntegrityError as exc:  # queued meanwhile by another process
            raise DuplicateCommand(keys[0]) from exc
        return [CommandRow(id=key, device_id=device_id, kind=kind, payload=json.loads(payload), state="pending",
                           attempts=0, created_at=ts, expires_at=expires, last_sent_at=None, updated_at=ts,
                           reply=None, error=None, priority=priority, batch=batch, wire_id=wire_id,
                           raw_payload=payload)
                for key, device_id, kind, payload, expires, priority, wire_id in rows]

    def get(self, command_id: str) -> CommandRow:
        """The command with this id. Raises UnknownCommand."""
        rows = self._db.query("SELECT * FROM commands WHERE id = ?", (command_id,))
        if not rows:
            raise UnknownCommand(command_id)
        return CommandRow.from_row(rows[0])

    def recent(self, device_id: str | None = None, limit: int = 20, batch: str | None = None) -> list[CommandRow]:
        """Most recent commands first, optionally of one device and/or one batch."""
        rows = self._db.query(
            "SELECT * FROM commands WHERE (? IS NULL OR device_id = ?) AND (? IS NULL OR batch = ?) "
            "ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (device_id, device_id, batch, batch, limit),
        )
        return [CommandRow.from_row(row) for row in rows]

    def page(self, device_id: str | None = None, state: str | None = None, kind: str | None = None,
             limit: int = 50, offset: int = 0, batch: str | None = None) -> tuple[list[CommandRow], int]:
        """Newest first, filtered by device, state, kind and batch (each optional): `limit` rows after
        skipping `offset`, and how many match in all."""
        where = ("(? IS NULL OR device_id = ?) AND (? IS NULL OR state = ?) AND (? IS NULL OR kind = ?) "
                 "AND (? IS NULL OR batch = ?)")
        params = (device_id, device_id, state, state, kind, kind, batch, batch)
        total = int(self._db.query(f"SELECT COUNT(*) AS n FROM commands WHERE {where}", params)[0]["n"])
        rows = self._db.query(f"SELECT * FROM commands WHERE {where} ORDER BY created_at DESC, rowid DESC "
                              "LIMIT ? OFFSET ?", (*params, limit, offset))
        return [CommandRow.from_row(row) for row in rows], total

    def active(self) -> list[CommandRow]:
        """Commands the bridge still has to deliver (`pending` or `sent`): highest priority, then oldest first."""
        rows = self._db.query(
            f"SELECT * FROM commands WHERE state IN ({placeholders(BRIDGE_STATES)}) "
            "ORDER BY priority DESC, created_at, rowid",
            BRIDGE_STATES,
        )
        return [CommandRow.from_row(row) for row in rows]

    def due(self, now: datetime, resend_interval_s: float) -> list[tuple[CommandRow, str | None]]:
        """The active commands the dispatcher may have to act on at `now`, each with its device's last
        reported state (None if it never reported): every `pending` one, and a `sent` one whose
        `expires_at` has passed or whose resend is due while its device is not known `offline`.

        A superset of what `dispatcher.decide` sends or expires, read in one statement: a `sent`
        command waiting for `accepted` is not read again until its resend time, so a pass costs what
        is due, not what is in flight. Highest priority, then oldest first.
        """
        rows = self._db.query(
            "SELECT c.*, d.state AS device_state FROM commands c LEFT JOIN devices d ON d.device_id = c.device_id "
            "WHERE c.state = 'pending' OR (c.state = 'sent' AND (c.expires_at <= ? OR "
            "((c.last_sent_at IS NULL OR c.last_sent_at <= ?) AND COALESCE(d.state, '') <> 'offline'))) "
            "ORDER BY c.priority DESC, c.created_at, c.rowid",
            (stamp(now), stamp(now - timedelta(seconds=resend_interval_s))),
        )
        due = []
        for row in rows:
            device_state = row.pop("device_state")
            due.append((CommandRow.from_row(row), device_state))
        return due

    def claim_sends(self, rows: Sequence[CommandRow], now: datetime) -> set[str]:
        """Count one more send of each of these commands, as the caller read them, in one statement;
        returns the ids claimed. A command is not claimed when a reply moved it past `sent` since it
        was read, or when someone else sent it since (its `attempts` changed): of several bridge
        replicas deciding on the same row, exactly one wins each send."""
        claimed: set[str] = set()
        ts = stamp(now)
        for part in slices(rows):
            rowset, params = self._db.rowset(("text", "bigint"), [(row.id, row.attempts) for row in part])
            returned = self._db.query(
                f"WITH v (i, a) AS ({rowset}) "
                "UPDATE commands SET state = 'sent', attempts = attempts + 1, last_sent_at = ?, updated_at = ? "
                "WHERE state IN ('pending', 'sent') AND id IN (SELECT i FROM v) "
                "AND attempts = (SELECT a FROM v WHERE v.i = commands.id) RETURNING id",
                [*params, ts, ts],
            )
            claimed.update(row["id"] for row in returned)
        return claimed

    def mark_expired(self, command_id: str, message: str, now: datetime | None = None) -> bool:
        """Expire a command the device never accepted. False if a reply got there first."""
        return self.close_locally(command_id, "expired", message, now)

    def close_locally(self, command_id: str, state: str, message: str, now: datetime | None = None) -> bool:
        """End a command the device never accepted with a terminal `state` (`expired`, `cancelled`).

        The error code is the state's name. Returns False if a device reply moved it past `sent`
        first (then the device owns it and will report its end itself).
        """
        if not is_terminal(state):
            raise ValueError(f"close_locally needs a terminal state, not {state!r}")
        error = json.dumps({"code": state, "message": message})
        return self._db.execute(
            "UPDATE commands SET state = ?, error = ?, updated_at = ? WHERE id = ? AND state IN ('pending', 'sent')",
            (state, error, stamp(now), command_id),
        ) == 1

    def add_local(self, reply: Reply, ts: str) -> None:
        """Record a command the device minted for its local API (origin `local`, docs/protocol.md),
        unless a command of that id is already known; `advance` then gives it the reply's state."""
        payload = {"v": 1, "id": reply.command_id, "kind": reply.metrics["kind"], "params": {},
                   "created_at": reply.ts, "origin": ORIGIN_LOCAL}
        self._db.execute(
            "INSERT INTO commands (id, device_id, kind, payload, state, created_at, updated_at, wire_id) "
            "VALUES (?, ?, ?, ?, 'sent', ?, ?, ?) ON CONFLICT DO NOTHING",
            (reply.command_id, reply.device_id, reply.metrics["kind"], json.dumps(payload), ts, ts, reply.command_id),
        )

    def advance(self, reply: Reply, payload: str, ts: str) -> bool:
        """Move the reply's command forward to the reply's status (never backward, except from the
        bridge's provisional expiry; `rejected` only before the device accepted); a terminal reply is
        kept, with its error. Returns False when the reply was lifecycle-illegal
        (`lifecycle.is_illegal_after`): it changed nothing, and the caller counts it."""
        return self.advance_many([(reply, payload)], ts)[0]

    def advance_many(self, answers: list[tuple[Reply, str]], ts: str) -> list[bool]:
        """`advance` for each (reply, its payload as stored), as if one by one in list order.

        In rounds: round k moves every command by its k-th reply of the list, all in one conditional
        UPDATE (per slice), so that no command meets two of its replies in one statement; a batch
        where each device sent accepted, running and its terminal reply takes three statements."""
        rounds: list[list[int]] = []
        nth: dict[tuple[str, str], int] = {}
        for i, (reply, _) in enumerate(answers):
            key = (reply.command_id, reply.device_id)
            k = nth[key] = nth.get(key, -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(i)
        legal = [True] * len(answers)
        for members in rounds:
            for part in slices(members):
                moved = self._advance_once([answers[i] for i in part], ts)
                stuck = [i for i in part if (answers[i][0].command_id, answers[i][0].device_id) not in moved]
                if stuck:
                    states = self._states([answers[i][0] for i in stuck])
                    for i in stuck:
                        reply = answers[i][0]
                        state = states.get((reply.command_id, reply.device_id))
                        legal[i] = not (state is not None and is_illegal_after(state, reply.status))
        return legal

    def _advance_once(self, answers: list[tuple[Reply, str]], ts: str) -> set[tuple[str, str]]:
        """One conditional UPDATE for replies to distinct commands; the (wire id, device) pairs it moved."""
        rowset, params = self._db.rowset(("text", "text", "text", "boolean", "text", "text"), [
            (reply.command_id, reply.device_id, reply.status, reply.is_terminal, payload,
             reply.error.model_dump_json() if reply.error else None)
            for reply, payload in answers
        ])
        rows = self._db.query(
            f"WITH v (w, d, status, terminal, payload, error) AS ({rowset}) "
            "UPDATE commands SET state = v.status, updated_at = ?, "
            "reply = CASE WHEN v.terminal THEN v.payload ELSE commands.reply END, "
            "error = CASE WHEN v.terminal THEN v.error END FROM v "
            "WHERE commands.wire_id = v.w AND commands.device_id = v.d "
            f"AND (({_rank_sql('commands.state')} < {_rank_sql('v.status')} "
            f"AND (v.status <> 'rejected' OR commands.state IN {_REJECTABLE})) "
            "OR (commands.state = 'expired' AND commands.reply IS NULL)) "
            "RETURNING wire_id, device_id",
            [*params, ts],
        )
        return {(row["wire_id"], row["device_id"]) for row in rows}

    def _states(self, replies: list[Reply]) -> dict[tuple[str, str], str]:
        """The current state of the commands these replies answer, by (wire id, device)."""
        rowset, params = self._db.rowset(("text", "text"), [(reply.command_id, reply.device_id) for reply in replies])
        rows = self._db.query(
            f"WITH v (w, d) AS ({rowset}) "
            "SELECT wire_id, device_id, state FROM commands JOIN v ON wire_id = v.w AND device_id = v.d",
            params,
        )
        return {(row["wire_id"], row["device_id"]): row["state"] for row in rows}

    def config_answered(self, replies: list[Reply]) -> set[tuple[str, str]]:
        """Of the commands these replies answer, the `config` ones, as (wire id, device) pairs."""
        found: set[tuple[str, str]] = set()
        for part in slices(replies):
            rowset, params = self._db.rowset(("text", "text"), [(reply.command_id, reply.device_id) for reply in part])
            found.update((row["wire_id"], row["device_id"]) for row in self._db.query(
                f"WITH v (w, d) AS ({rowset}) SELECT wire_id, device_id FROM commands "
                "JOIN v ON wire_id = v.w AND device_id = v.d WHERE kind = 'config'",
                params,
            ))
        return found

    def lock(self, command_ids: list[str]) -> None:
        """Lock these commands' rows until the transaction ends, in id order."""
        if command_ids:
            self._db.lock(f"SELECT id FROM commands WHERE id IN ({placeholders(command_ids)}) ORDER BY id",
                          command_ids)

    def lock_answered(self, answered: list[tuple[str, str]]) -> None:
        """Lock the rows of the commands these (device id, command id on the wire) pairs answer, in id order."""
        if answered:  # one statement, however many (the ORDER BY must cover them all)
            rowset, params = self._db.rowset(("text", "text"), answered)
            self._db.lock(f"WITH v (d, w) AS ({rowset}) SELECT id FROM commands "
                          "WHERE (device_id, wire_id) IN (SELECT d, w FROM v) ORDER BY id", params)

    def on_the_wire(self, command_id: str) -> tuple[str, str | None]:
        """(id the device uses, device) of a queued command; (command_id, None) for one never queued here."""
        rows = self._db.query("SELECT wire_id, device_id FROM commands WHERE id = ?", (command_id,))
        if not rows or rows[0]["wire_id"] is None:
            return command_id, None
        return rows[0]["wire_id"], rows[0]["device_id"]

    def active_counts(self) -> dict[str, int]:
        """Unfinished commands per device (how busy each device is)."""
        rows = self._db.query(
            f"SELECT device_id, count(*) AS n FROM commands WHERE state NOT IN ({placeholders(TERMINAL_STATES)}) "
            "GROUP BY device_id",
            TERMINAL_STATES,
        )
        return {row["device_id"]: row["n"] for row in rows}

    def outcomes_of(self, device_ids: list[str], limit: int) -> dict[str, list[str]]:
        """States of each device's last `limit` commands it ran to the end (`succeeded` or `failed`), newest
        first: rejections, cancellations and expiries say nothing about the device's health. One
        statement per slice of devices."""
        found: dict[str, list[str]] = {device_id: [] for device_id in device_ids}
        for part in slices(device_ids):
            rowset, params = self._db.rowset(("text",), [(device_id,) for device_id in part])
            rows = self._db.query(
                f"WITH v (d) AS ({rowset}) SELECT device_id, state FROM (SELECT device_id, state, row_number() "
                "OVER (PARTITION BY device_id ORDER BY updated_at DESC, rowid DESC) AS n FROM commands "
                "WHERE device_id IN (SELECT d FROM v) AND state IN ('succeeded', 'failed')) AS c "
                "WHERE n <= ? ORDER BY device_id, n",
                [*params, limit],
            )
            for row in rows:
                found[row["device_id"]].append(row["state"])
        return found
