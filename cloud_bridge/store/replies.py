"""Replies and stream chunks: what devices answered, stored once each.

Replies are unique on (device_id, seq) and stream chunks on (device_id, command_id, idx):
duplicates from the device are ignored and counted in `counters`. Storing a reply moves its
command forward (`Commands.advance`); a lifecycle-illegal one (`rejected` after `accepted`, a
second terminal state) changes nothing and is counted as `illegal_transitions`; a succeeded
`config` reply records the device's policy.
"""

from __future__ import annotations

from datetime import datetime

from autoglm_wire.local_origin import is_local_reply
from autoglm_wire.protocol import Reply, StreamChunk
from cloud_bridge.store.commands import Commands
from cloud_bridge.store.connection import Connection, first_copies, slices
from cloud_bridge.store.counters import Counters
from cloud_bridge.store.devices import Devices
from cloud_bridge.store.rows import ChunkRow, ReplyRow, stamp


class _Answers:
    """What storing a device's answers needs: its device row, the command answered, the duplicate counters."""

    def __init__(self, connection: Connection, devices: Devices, commands: Commands, counters: Counters) -> None:
        self._db = connection
        self._devices = devices
        self._commands = commands
        self._counters = counters


class Replies(_Answers):
    def record(self, reply: Reply, now: datetime | None = None) -> bool:
        """Store a reply and move its command forward. Returns False for a duplicate (device_id, seq)."""
        return self.record_many([reply], now)[0]

    def record_many(self, replies: list[Reply], now: datetime | None = None) -> list[bool]:
        """Store replies and move their commands forward, as if one by one in list order, with one
        statement per table (per slice) rather than per reply. For each reply: False for a duplicate
        (device_id, seq), also one that came earlier in the same list."""
        ts = stamp(now)
        payloads = [reply.model_dump_json() for reply in replies]
        with self._db.transaction():
            self._devices.touch(sorted({reply.device_id for reply in replies}),
                                {reply.device_id for reply in replies}, now)
            inserted: set[tuple[str, int]] = set()
            rows = [(r.device_id, r.seq, r.command_id, r.status, payload, ts)
                    for r, payload in zip(replies, payloads, strict=True)]
            for part in slices(rows):
                rowset, params = self._db.rowset(("text", "bigint", "text", "text", "text", "text"), part)
                inserted.update((row["device_id"], row["seq"]) for row in self._db.query(
                    f"WITH v (d, seq, c, status, payload, received) AS ({rowset}) "
                    "INSERT INTO replies (device_id, seq, command_id, status, payload, received_at) "
                    "SELECT * FROM v WHERE true ON CONFLICT DO NOTHING RETURNING device_id, seq",
                    params,
                ))
            stored = first_copies([(reply.device_id, reply.seq) for reply in replies], inserted)
            if duplicates := stored.count(False):
                self._counters.bump("duplicate_replies", duplicates)
            answers = [(reply, payload) for reply, payload, new in zip(replies, payloads, stored, strict=True)
                       if new and reply.command_id is not None]
            for reply, _ in answers:
                if reply.is_terminal and is_local_reply(reply.metrics):
                    self._commands.add_local(reply, ts)  # a device's local API command (docs/protocol.md)
            if illegal := self._commands.advance_many(answers, ts).count(False):
                self._counters.bump("illegal_transitions", illegal)
            outputs = [reply for reply, _ in answers if reply.status == "succeeded" and reply.output is not None]
            if outputs:
                configs = self._commands.config_answered(outputs)
                for reply in outputs:
                    if (reply.command_id, reply.device_id) in configs:
                        self._devices.record_policy(reply)
        return stored

    def count(self) -> int:
        """How many distinct replies are stored."""
        return self._db.query("SELECT count(*) AS n FROM replies")[0]["n"]

    def of_command(self, command_id: str) -> list[ReplyRow]:
        """The replies the command's device sent for it, in arrival order."""
        wire_id, device_id = self._commands.on_the_wire(command_id)
        rows = self._db.query(
            "SELECT * FROM replies WHERE command_id = ? AND (? IS NULL OR device_id = ?) ORDER BY id",
            (wire_id, device_id, device_id),
        )
        return [ReplyRow.from_row(row) for row in rows]

    def recent(self, device_id: str | None = None, limit: int = 50) -> list[ReplyRow]:
        """Most recent replies first."""
        rows = self._db.query(
            "SELECT * FROM replies WHERE (? IS NULL OR device_id = ?) ORDER BY id DESC LIMIT ?",
            (device_id, device_id, limit),
        )
        return [ReplyRow.from_row(row) for row in rows]

    def newest_id(self) -> int:
        """The highest reply row id (0 when there is none)."""
        return self._db.query("SELECT coalesce(max(id), 0) AS m FROM replies")[0]["m"]

    def devices_after(self, reply_id: int) -> set[str]:
        """The devices with a reply stored under a row id above `reply_id`."""
        return {row["device_id"] for row in self._db.query("SELECT DISTINCT device_id FROM replies WHERE id > ?",
                                                             (reply_id,))}

    def decode_speeds_of(self, device_ids: list[str], limit: int) -> dict[str, list[float]]:
        """`tokens_per_s` of each device's last `limit` succeeded generations, newest first; one
        statement per slice of devices."""
        tps = self._db.backend.json_number("payload", "metrics", "tokens_per_s")
        speeds: dict[str, list[float]] = {device_id: [] for device_id in device_ids}
        for part in slices(device_ids):
            rowset, params = self._db.rowset(("text",), [(device_id,) for device_id in part])
            rows = self._db.query(
                f"WITH v (d) AS ({rowset}) SELECT device_id, tps FROM (SELECT device_id, {tps} AS tps, "
                "row_number() OVER (PARTITION BY device_id ORDER BY id DESC) AS n FROM replies "
                f"WHERE device_id IN (SELECT d FROM v) AND status = 'succeeded' AND {tps} IS NOT NULL) AS r "
                "WHERE n <= ? ORDER BY device_id, n",
                [*params, limit],
            )
            for row in rows:
                speeds[row["device_id"]].append(float(row["tps"]))
        return speeds


class Chunks(_Answers):
    def record(self, device_id: str, chunk: StreamChunk, now: datetime | None = None) -> bool:
        """Store a stream chunk. Returns False for a duplicate (command_id, index)."""
        return self.record_many([(device_id, chunk)], now)[0]

    def record_many(self, chunks: list[tuple[str, StreamChunk]], now: datetime | None = None) -> list[bool]:
        """Store (device id, chunk) pairs, one statement per slice. For each: False for a duplicate
        (device_id, command_id, index), also one that came earlier in the same list."""
        ts = stamp(now)
        with self._db.transaction():
            devices = {device_id for device_id, _ in chunks}
            self._devices.touch(sorted(devices), devices, now)
            inserted: set[tuple[str, str, int]] = set()
            rows = [(device_id, c.command_id, c.index, c.delta, c.done, ts) for device_id, c in chunks]
            for part in slices(rows):
                rowset, params = self._db.rowset(("text", "text", "bigint", "text", "boolean", "text"), part)
                inserted.update((row["device_id"], row["command_id"], row["idx"]) for row in self._db.query(
                    f"WITH v (d, c, idx, delta, done, received) AS ({rowset}) "
                    "INSERT INTO stream_chunks (device_id, command_id, idx, delta, done, received_at) "
                    "SELECT * FROM v WHERE true ON CONFLICT DO NOTHING RETURNING device_id, command_id, idx",
                    params,
                ))
            stored = first_copies([(device_id, c.command_id, c.index) for device_id, c in chunks], inserted)
            if duplicates := stored.count(False):
                self._counters.bump("duplicate_chunks", duplicates)
        return stored

    def of_command(self, command_id: str, from_idx: int = 0) -> list[ChunkRow]:
        """Stored chunks of a command with index >= `from_idx`, in index order (gaps possible: QoS 0)."""
        wire_id, device_id = self._commands.on_the_wire(command_id)
        rows = self._db.query(
            "SELECT * FROM stream_chunks WHERE command_id = ? AND (? IS NULL OR device_id = ?) "
            "AND idx >= ? ORDER BY idx",
            (wire_id, device_id, device_id, from_idx),
        )
        return [ChunkRow.from_row({**row, "command_id": command_id}) for row in rows]
