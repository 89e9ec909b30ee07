"""Wire protocol v1: the pydantic models of every payload and the command parser.

Pure: no I/O. `parse_command` turns raw bytes into a `ParsedCommand` or raises the `ProtocolError`
subclass whose code the rejected reply must carry. The contract is docs/protocol.md.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from autoglm_wire.errors import BadJson, ErrorCode, InvalidCommand, PayloadTooLarge, UnknownKind
from autoglm_wire.lifecycle import ReplyStatus, is_terminal
from autoglm_wire.model_command import ModelParams

PROTOCOL_VERSION = 1
DEVICE_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
COMMAND_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # UTF-8: no character holds a `"` or `\` byte
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPENERS = frozenset(b"[{")
# `\u0000` or a `\uD800`-`\uDFFF` escape: the only ways JSON text can hold a NUL or a lone surrogate.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
YEARS = (1970, 2200)  # a wire datetime outside these years is refused (clocks, SQL and .timestamp() agree here)

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
# Integers that reach SQLite or PostgreSQL columns: 64 bits at most.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
CommandId = Annotated[str, StringConstraints(pattern=COMMAND_ID_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Tolerant(BaseModel):
    """Device -> cloud payloads: a reader ignores fields a newer sender may add."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def _exact_int(value: Any) -> Any:
    """`true` and `1.0` are not the protocol version 1."""
    if type(value) is not int:
        raise ValueError(f"must be the integer {PROTOCOL_VERSION}")
    return value


Version = Annotated[Literal[1], BeforeValidator(_exact_int)]


def _offset_and_range(value: datetime) -> datetime:
    """A wire datetime names its offset (`Z` or `+hh:mm`) and lies in YEARS; it is kept in UTC."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("must carry a UTC offset, e.g. 2026-11-21T10:00:00Z")
    if not YEARS[0] <= value.year < YEARS[1]:
        raise ValueError(f"must lie between the years {YEARS[0]} and {YEARS[1]}")
    return value.astimezone(UTC)


Timestamp = Annotated[datetime, AfterValidator(_offset_and_range)]


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_ts(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as every `ts` on the wire."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# --- Command -------------------------------------------------------------------------------------


class Signature(_Strict):
    key_id: str
    alg: Literal["ed25519"]
    value: str


class Command(_Strict):
    """The command envelope; `params` is validated separately against the kind's model."""

    v: Version
    id: CommandId
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: Timestamp
    expires_at: Timestamp | None = None
    priority: int = Field(default=0, ge=-1000, le=1000)
    target: str | None = None
    sig: Signature | None = None


class PingParams(_Strict):
    pass


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class Sampling(_Strict):
    """Sampling fields shared by `chat` and `complete`."""

    max_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stream: bool = False
    response_format: JsonSchemaFormat | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "observation"]
    content: str


class ChatParams(Sampling):
    messages: list[ChatMessage] = Field(default_factory=list)
    template: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_a_conversation(self) -> ChatParams:
        if not self.messages and self.template is None:
            raise ValueError("`messages` must hold at least one message unless a `template` is named")
        return self


class CompleteParams(Sampling):
    prompt: str = Field(min_length=1)


class CancelParams(_Strict):
    target: CommandId


class OnnxParams(_Strict):
    model: str
    inputs: dict[str, Any]


class ConfigParams(_Strict):
    """A partial agent policy; every field left out keeps its current value."""

    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    telemetry_interval_s: float | None = Field(default=None, ge=1.0, le=86400.0)


PARAMS_BY_KIND: dict[str, type[BaseModel]] = {
    "ping": PingParams,
    "chat": ChatParams,
    "complete": CompleteParams,
    "onnx": OnnxParams,
    "cancel": CancelParams,
    "config": ConfigParams,
    "model": ModelParams,  # issue #14: autoglm_wire/model_command.py
}


class ParsedCommand(BaseModel):
    """A command whose envelope and params both validated."""

    model_config = ConfigDict(frozen=True)

    command: Command
    params: BaseModel

    @property
    def id(self) -> str:
        return self.command.id

    @property
    def kind(self) -> str:
        return self.command.kind


def validation_problems(error: ValidationError, root: str = "(root)") -> list[str]:
    """Each problem of a pydantic error as `where: what`, `where` being the dotted field path."""
    return [f"{'.'.join(str(p) for p in item['loc']) or root}: {item['msg']}" for item in error.errors()]


def describe_validation_error(error: ValidationError, limit: int = 5, root: str = "(root)") -> str:
    """The first `limit` problems of a pydantic error on one line, and how many more there are."""
    parts = validation_problems(error, root)
    more = len(parts) - limit
    return "; ".join(parts[:limit]) + (f" (and {more} more)" if more > 0 else "")


def is_command_id(value: Any) -> bool:
    """True for a string protocol v1 accepts as a command id (also a valid topic level)."""
    return isinstance(value, str) and re.fullmatch(COMMAND_ID_PATTERN, value) is not None


def json_nesting_exceeds(payload: bytes, limit: int) -> bool:
    """Whether UTF-8 JSON nests arrays and objects more than `limit` levels deep, decided without parsing.

    Python's json parser recurses once per level: a payload of 50,000 `[` takes it to the
    interpreter's recursion limit, and a garbage-collector finalizer that runs down there fails
    with an error nobody can catch. Brackets inside strings do not count; a payload with few
    brackets is answered by counting alone (otherwise ~1 ms for a 300 KB tensor of 3,000 rows).
    """
    if payload.count(b"[") + payload.count(b"{") <= limit:
        return False
    depth = 0
    for bracket in _JSON_STRING.sub(b"", payload).translate(None, _NOT_BRACKETS):
        depth += 1 if bracket in _OPENERS else -1
        if depth > limit:
            return True
    return False


def decode_json_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Size-check, decode and parse a payload that must be one JSON object."""
    if len(payload) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(payload)} bytes; this device accepts at most {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson(f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    if json_nesting_exceeds(payload, MAX_JSON_DEPTH):
        raise BadJson(f"payload JSON nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")
    try:
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise BadJson(f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise BadJson(f"payload JSON has a value that cannot be read: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadJson(f"payload must be a JSON object, got {type(obj).__name__}")
    if _SUSPECT_ESCAPE.search(payload) and (problem := _text_problem(obj)):
        raise InvalidCommand(f"payload text {problem}", obj["id"] if is_command_id(obj.get("id")) else None)
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members; a name given twice is refused (readers disagree on which value wins,
    so a signature over one reading would vouch for another)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(name for name, _ in pairs if name in seen or seen.add(name))
        raise ValueError(f"the member name {twice!r} appears twice in one object")
    return obj


# `json.loads(text, **hooks)` builds a decoder per call; the bridge decodes every device message with this one
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_unique_members)


def _text_problem(value: Any) -> str | None:
    """What makes a decoded string unstorable: a NUL (PostgreSQL text refuses it) or a lone UTF-16
    surrogate (not Unicode text: it cannot be encoded as UTF-8). None when every string is fine."""
    if isinstance(value, str):
        if "\x00" in value:
            return "holds a NUL character (\\u0000); send text without it"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"holds a lone UTF-16 surrogate (\\u{ord(value[exc.start]):04x}); it is not Unicode text"
        return None
    if isinstance(value, dict):
        items = [*value, *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    return next((problem for item in items if (problem := _text_problem(item))), None)


def parse_command(payload: bytes, max_bytes: int, kinds: frozenset[str] | None = None) -> ParsedCommand:
    """Validate a raw command payload.

    `kinds` is the set of kinds this device serves (default: all of protocol v1). Raises
    PayloadTooLarge, BadJson, InvalidCommand or UnknownKind, carrying the command id when one could
    be read.
    """
    obj = decode_json_object(payload, max_bytes)
    command_id = obj["id"] if is_command_id(obj.get("id")) else None
    try:
        command = Command.model_validate(obj)
    except ValidationError as exc:
        raise InvalidCommand(f"invalid command envelope: {describe_validation_error(exc)}", command_id) from exc
    served = frozenset(PARAMS_BY_KIND) if kinds is None else kinds & frozenset(PARAMS_BY_KIND)
    if command.kind not in served:
        raise UnknownKind(
            f"kind {command.kind!r} is not served by this device; it serves {sorted(served)}", command_id
        )
    try:
        params = PARAMS_BY_KIND[command.kind].model_validate(command.params)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise InvalidCommand(f"invalid params for {command.kind!r}: {problems}", command_id) from exc
    return ParsedCommand(command=command, params=params)


# --- Device -> cloud -----------------------------------------------------------------------------


class ErrorInfo(_Tolerant):
    code: ErrorCode
    message: str


class Reply(_Tolerant):
    v: Literal[1] = 1
    command_id: str | None
    device_id: DeviceId
    status: ReplyStatus
    seq: int = Field(ge=1, le=INT64_MAX)
    ts: str
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return is_terminal(self.status)


class StreamChunk(_Tolerant):
    v: Literal[1] = 1
    command_id: str
    index: Count
    delta: str
    done: bool = False


class ModelInfo(_Tolerant):
    name: str
    sha256: str
    arch: str
    quant: str
    n_gpu_layers: Int64
    gpu_reason: str | None = None


class ModelRef(_Tolerant):
    """A model by name and sha256 (the previous slot in Status; `model` commands' output)."""

    name: str
    sha256: str


class Status(_Tolerant):
    v: Literal[1] = 1
    device_id: DeviceId
    state: Literal["online", "offline"]
    ts: str | None = None
    agent_version: str | None = None
    model: ModelInfo | None = None
    kinds: list[str] | None = None
    groups: list[str] | None = None
    previous_model: ModelRef | None = None  # issue #14: absent (older agents) reads as None
    rollout: str | None = None


class Telemetry(_Tolerant):
    v: Literal[1] = 1
    device_id: DeviceId
    ts: str
    queue_depth: Count
    outbox_depth: Count
    outbox_bytes: Count
    tokens_per_s_ewma: float | None
    rss_mb: float
    gpu_layers: Int64
    uptime_s: float
    dropped: dict[str, Count] = Field(default_factory=dict)
    redelivery: dict[str, Count] = Field(default_factory=dict)
    # additive (docs/protocol.md): absent from older agents, hence the defaults
    reconnects: Count = 0
    store_bytes: Count = 0
    model_load_s: float | None = None
    commands: dict[str, dict[str, Count]] = Field(default_factory=dict)
    max_tokens_limit: Count | None = None  # the device's `limits.max_tokens`


class Event(_Tolerant):
    v: Literal[1] = 1
    device_id: DeviceId
    ts: str
    level: Literal["info", "warning", "error"]
    code: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


def to_bytes(model: BaseModel) -> bytes:
    """Serialize a payload model as compact UTF-8 JSON (aliases, nulls kept)."""
    return model.model_dump_json(by_alias=True).encode("utf-8")
