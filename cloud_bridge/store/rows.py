"""The registry's rows as the bridge reads them, and how values are stored: timestamps as protocol
`ts` strings (UTC, milliseconds, `Z`, which sort as text), lists and objects as JSON text."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Self

from pydantic import TypeAdapter

from autoglm_wire.lifecycle import is_terminal
from autoglm_wire.protocol import Timestamp, format_ts, utc_now
from cloud_bridge.dispatcher import CommandView


def stamp(moment: datetime | None) -> str:
    """`moment` (default: now) as stored."""
    return format_ts(moment or utc_now())


_TIMESTAMP: TypeAdapter[datetime] = TypeAdapter(Timestamp)


def wire_ts(value: str) -> str:
    """A device's own `ts` as stored. Raises ValueError (a pydantic ValidationError) unless it is an
    ISO 8601 time with an offset in the years protocol v1 accepts."""
    return format_ts(_TIMESTAMP.validate_python(value))


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
    groups: list[str]  # the groups the registry assigns it (`device_groups`): the membership routing uses
    kinds: list[str]
    last_telemetry: dict[str, Any] | None
    policy: dict[str, Any] | None = None
    status_ts: str | None = None  # `ts` of the newest timestamped Status applied
    claimed_groups: list[str] = field(default_factory=list)  # what its last online Status announced: a hint
    previous_model_name: str | None = None  # the slot a `model` rollback returns to (None: older agent)
    previous_model_sha256: str | None = None
    rollout: str | None = None  # the rollout of the last deploy that changed the model

    @classmethod
    def from_row(cls, row: dict[str, Any], groups: list[str]) -> DeviceRow:
        values = dict(row, groups=sorted(groups))
        for key in ("claimed_groups", "kinds"):
            values[key] = loads(values[key]) or []
        for key in ("last_telemetry", "policy"):
            values[key] = loads(values[key])
        return cls(**values)

    @property
    def group_mismatch(self) -> bool:
        """Its announced groups differ from its assignment (only once it announced any: state known)."""
        return self.state is not None and set(self.claimed_groups) != set(self.groups)

    @property
    def routable_groups(self) -> list[str]:
        """The groups whose work may go to it: assigned AND announced (it subscribes to that group's
        topic), and none at all while it announces a group it is not assigned (a suspect device)."""
        if not set(self.claimed_groups) <= set(self.groups):
            return []
        return [g for g in self.groups if g in self.claimed_groups]


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
    dedupe_key: str | None = None  # None for events stored before schema version 3


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
class DeadLetterRow:
    """A message the bridge received but could not store: its raw payload, where it came from and why."""

    PREVIEW_CHARS: ClassVar[int] = 200
    id: int
    device_id: str | None
    topic: str
    payload: bytes = field(repr=False)
    size: int
    error: str
    received_at: str

    @property
    def preview(self) -> str:
        """The payload's start as text for people: undecodable bytes and control characters escaped."""
        text = self.payload[: self.PREVIEW_CHARS].decode("utf-8", "backslashreplace")
        return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)

    def as_json(self) -> dict[str, Any]:
        """The row for JSON: the exact payload in base64, and its start as text."""
        return {"id": self.id, "device_id": self.device_id, "topic": self.topic, "size": self.size,
                "error": self.error, "received_at": self.received_at, "preview": self.preview,
                "payload_base64": base64.b64encode(self.payload).decode("ascii")}


@dataclass(frozen=True)
class AlertRow:
    id: int
    device_id: str
    kind: str
    message: str
    raised_at: str
    cleared_at: str | None
    acknowledged_at: str | None = None
    acknowledged_by: str | None = None


@dataclass(frozen=True)
class StateChange:
    id: int
    device_id: str
    state: str
    ts: str
