"""The registry's rows as the bridge reads them, and how values are stored: timestamps as protocol
`ts` strings (UTC, milliseconds, `Z`, which sort as text), lists and objects as JSON text."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Self

from autoglm_wire.lifecycle import is_terminal
from autoglm_wire.protocol import format_ts, utc_now
from cloud_bridge.dispatcher import CommandView


def stamp(moment: datetime | None) -> str:
    """`moment` (default: now) as stored."""
    return format_ts(moment or utc_now())


def parse_ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def loads(value: str | None) -> Any:
    return json.loads(value) if value else None


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    state: str | None
    since: str | None
    last_seen: str | None
    agent_version: str | None
    model_name: str | None
    model_sha256: str | None
    n_gpu_layers: int | None
    groups: list[str]
    kinds: list[str]
    last_telemetry: dict[str, Any] | None
    policy: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> DeviceRow:
        values = dict(row)
        for key in ("groups", "kinds"):
            values[key] = loads(values[key]) or []
        for key in ("last_telemetry", "policy"):
            values[key] = loads(values[key])
        return cls(**values)


@dataclass(frozen=True)
class CommandRow:
    id: str
    device_id: str
    kind: str
    payload: dict[str, Any]
    state: str
    attempts: int
    created_at: str
    expires_at: str | None
    last_sent_at: str | None
    updated_at: str
    reply: dict[str, Any] | None
    error: dict[str, Any] | None
    priority: int = 0
    batch: str | None = None
    wire_id: str | None = None  # the id on the wire (differs from `id` for a group command's member row)
    raw_payload: str = field(repr=False, default="")  # the exact bytes that are published

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CommandRow:
        values = dict(row, raw_payload=row["payload"])
        values.pop("rowid", None)  # PostgreSQL's stand-in for SQLite's rowid (insertion order)
        for key in ("payload", "reply", "error"):
            values[key] = loads(values[key])
        return cls(**values)

    @property
    def terminal(self) -> bool:
        return is_terminal(self.state)

    def view(self) -> CommandView:
        """The dispatcher's view of this row."""
        return CommandView(self.state, self.attempts, parse_ts(self.last_sent_at), parse_ts(self.expires_at))


class JsonColumnRow:
    """A row with one JSON text column (`json_column`), decoded when the row is read."""

    json_column: ClassVar[str]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Self:
        return cls(**{**row, cls.json_column: json.loads(row[cls.json_column])})


@dataclass(frozen=True)
class ReplyRow(JsonColumnRow):
    """A stored reply, unique by (device_id, seq); `payload` is the whole Reply."""

    json_column: ClassVar[str] = "payload"
    id: int
    device_id: str
    seq: int
    command_id: str | None
    status: str
    payload: dict[str, Any]
    received_at: str


@dataclass(frozen=True)
class EventRow(JsonColumnRow):
    """A stored device Event; `data` is its free-form object."""

    json_column: ClassVar[str] = "data"
    id: int
    data: dict[str, Any]
    device_id: str
    ts: str
    level: str
    code: str
    message: str
    received_at: str


@dataclass(frozen=True)
class ChunkRow:
    """A stored stream chunk (for a group member's row, `command_id` is the member row's id)."""

    id: int
    device_id: str
    command_id: str
    idx: int
    delta: str
    done: bool
    received_at: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ChunkRow:
        return cls(**{**row, "done": bool(row["done"])})


@dataclass(frozen=True)
class AlertRow:
    id: int
    device_id: str
    kind: str
    message: str
    raised_at: str
    cleared_at: str | None


@dataclass(frozen=True)
class StateChange:
    id: int
    device_id: str
    state: str
    ts: str
