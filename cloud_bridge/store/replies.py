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
from cloud_bridge.store.connection import Connection
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
        ts = stamp(now)
        payload = reply.model_dump_json()
        with self._db.transaction():
            inserted = self._db.execute(
                "INSERT INTO replies (device_id, seq, command_id, status, payload, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (reply.device_id, reply.seq, reply.command_id, reply.status, payload, ts),
            ) == 1
            self._devices.ensure(reply.device_id, ts)
            if not inserted:
                self._counters.bump("duplicate_replies")
                return False
            if reply.command_id is not None:
                if reply.is_terminal and is_local_reply(reply.metrics):
                    self._commands.add_local(reply, ts)  # a device's local API command (docs/protocol.md)
                if not self._commands.advance(reply, payload, ts):
                    self._counters.bump("illegal_transitions")
                if reply.status == "succeeded" and reply.output is not None:
                    self._devices.record_policy(reply)
        return True

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

    def decode_speeds(self, device_id: str, limit: int) -> list[float]:
        """`tokens_per_s` of the device's last `limit` succeeded generations, newest first."""
        tps = self._db.backend.json_number("payload", "metrics", "tokens_per_s")
        rows = self._db.query(
            f"SELECT {tps} AS tps FROM replies "
            f"WHERE device_id = ? AND status = 'succeeded' AND {tps} IS NOT NULL ORDER BY id DESC LIMIT ?",
            (device_id, limit),
        )
        return [float(row["tps"]) for row in rows]


class Chunks(_Answers):
    def record(self, device_id: str, chunk: StreamChunk, now: datetime | None = None) -> bool:
        """Store a stream chunk. Returns False for a duplicate (command_id, index)."""
        ts = stamp(now)
        with self._db.transaction():
            inserted = self._db.execute(
                "INSERT INTO stream_chunks (device_id, command_id, idx, delta, done, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (device_id, chunk.command_id, chunk.index, chunk.delta, chunk.done, ts),
            ) == 1
            self._devices.ensure(device_id, ts)
            if not inserted:
                self._counters.bump("duplicate_chunks")
        return inserted

    def of_command(self, command_id: str, from_idx: int = 0) -> list[ChunkRow]:
        """Stored chunks of a command with index >= `from_idx`, in index order (gaps possible: QoS 0)."""
        wire_id, device_id = self._commands.on_the_wire(command_id)
        rows = self._db.query(
            "SELECT * FROM stream_chunks WHERE command_id = ? AND (? IS NULL OR device_id = ?) "
            "AND idx >= ? ORDER BY idx",
            (wire_id, device_id, device_id, from_idx),
        )
        return [ChunkRow.from_row({**row, "command_id": command_id}) for row in rows]
