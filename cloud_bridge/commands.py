"""Sending commands: the one request shape, its validation into a protocol v1 Command, queueing it
for a device, a group or a filter, cancelling, and following a command until it ends.

The CLI, the HTTP API, the OpenAI-compatible endpoint and the console page all go through here.
No MQTT: everything is queued in the registry, and the dispatch loop of `cloud-bridge serve`
publishes it within ~100 ms.

A command to several devices gets one registry row per device, `<batch>.<device>`, each with its
own lifecycle, attempts, replies and terminal state, so every target is tracked separately; the
batch id ties them together (`cloud-bridge commands --batch B`, `GET /api/commands?batch=B`).

- `group/G`: ONE command, id `<batch>`, `target: "group/G"`, published on `P/group/G/cmd`; every
  known member's row waits for that member's replies (matched by the id on the wire and the
  device), and is resent on the group topic until that member accepted it (members that already
  have it answer a duplicate with their stored reply and do not run it again).
- a filter: one command per matching device on its own `P/D/cmd`, id `<batch>.<device>`.

Group membership is the registry's (`cloud-bridge group add|remove`, `/api/groups`), never what a
device announces: a device is a member of G for routing when the registry assigns it G and it
announces G (it subscribes to G's topic), and of no group while it announces one it is not
assigned (`DeviceRow.routable_groups`; the `group_mismatch` alert names it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from autoglm_wire.protocol import (
    DEVICE_ID_PATTERN,
    PARAMS_BY_KIND,
    Command,
    describe_validation_error,
    is_command_id,
    utc_now,
)
from autoglm_wire.topics import GROUP_PATTERN, check_device_id, check_group
from cloud_bridge.config import DispatchConfig
from cloud_bridge.console import short_ts
from cloud_bridge.errors import BadTarget, InvalidRequest
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow, DeviceRow

GROUP_PREFIX = "group/"
PROMPT_KINDS = ("chat", "complete", "cancel")
CANCEL_EXPIRES_IN_S = 3600.0
POLL_S = 0.1
DISPATCH_DEFAULTS = DispatchConfig()


_PRINTABLE = r"^[^\x00-\x1f\x7f]{1,256}$"  # what a Status may name: no NUL or control characters


class DeviceFilter(BaseModel):
    """A set of devices: every field given must match (an empty filter matches the whole fleet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_ids: tuple[Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)], ...] = ()
    group: str | None = Field(default=None, pattern=GROUP_PATTERN)
    state: Literal["online", "offline"] | None = None
    model_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{1,64}$",
                                     description="prefix of the model file's sha256")
    model_name: str | None = Field(default=None, pattern=_PRINTABLE, description="the active model's name")
    agent_version: str | None = Field(default=None, pattern=_PRINTABLE)

    def matches(self, device: DeviceRow) -> bool:
        checks = [
            not self.device_ids or device.device_id in self.device_ids,
            self.group is None or self.group in device.routable_groups,
            self.state is None or device.state == self.state,
            self.model_sha256 is None or (device.model_sha256 or "").startswith(self.model_sha256),
            self.model_name is None or device.model_name == self.model_name,
            self.agent_version is None or device.agent_version == self.agent_version,
        ]
        return all(checks)

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.model_dump().items() if v not in (None, ())]
        return ",".join(parts) or "all"


# The body of `POST /api/commands`, also built by `cloud-bridge send|policy`, `cancel` and `/v1`. Its
# field constraints answer an HTTP body with 422; `cloud-bridge send`, whose values argparse already
# typed, builds it with `model_construct` and `build_command` checks the ranges with its own messages.
class CommandRequest(BaseModel):
    """A command for one device (`target: "D"`), a group (`target: "group/G"`) or a `filter`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str | None = Field(default=None, description='a device id or "group/G"')
    filter: DeviceFilter | None = Field(default=None, description="instead of target: every matching known device")
    kind: str = Field(description="ping, chat, complete, cancel, config, onnx")
    prompt: str | None = Field(default=None, description="chat: the user message; complete: the prompt")
    params: dict[str, Any] = Field(default_factory=dict, description="more params, merged last")
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher runs first")
    expires_in_s: float | None = Field(default=None, gt=0,
                                       description="the command expires this long after it is queued "
                                                   "(default: [dispatch] default_expiry_s)")
    id: str | None = Field(default=None, description="command id (or batch id for several devices)")


@dataclass
class Queued:
    """What was queued for one request: one row per device, the batch id when several, warnings worth showing."""

    batch: str | None
    rows: list[CommandRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --- build and validate --------------------------------------------------------------------------


def build_params(request: CommandRequest) -> dict[str, Any]:
    """The `params` object of the command, validated against the kind's protocol model."""
    if request.kind not in PARAMS_BY_KIND:
        raise InvalidRequest(f"unknown kind {request.kind!r}; protocol v1 kinds are {sorted(PARAMS_BY_KIND)}")
    params = _prompt_params(request)
    sampling = {"max_tokens": request.max_tokens, "temperature": request.temperature, "seed": request.seed}
    params.update({k: v for k, v in sampling.items() if v is not None})
    if request.stream:
        params["stream"] = True
    params.update(request.params)
    try:
        PARAMS_BY_KIND[request.kind].model_validate(params)
    except ValidationError as exc:
        problems = describe_validation_error(exc, root="params")
        raise InvalidRequest(f"invalid params for {request.kind!r}: {problems}") from exc
    return params


def _prompt_params(request: CommandRequest) -> dict[str, Any]:
    if request.kind not in PROMPT_KINDS:
        if request.prompt is not None:
            raise InvalidRequest(f"kind {request.kind!r} takes no PROMPT; pass its params with --params JSON")
        return {}
    if request.prompt is None:
        if {"messages", "prompt", "target"} & request.params.keys():
            return {}  # given whole in --params (the API's and /v1's way)
        what = "the target command id" if request.kind == "cancel" else "a PROMPT"
        raise InvalidRequest(f"kind {request.kind!r} needs {what}")
    if request.kind == "chat":
        return {"messages": [{"role": "user", "content": request.prompt}]}
    if request.kind == "complete":
        return {"prompt": request.prompt}
    return {"target": request.prompt}


def build_command(request: CommandRequest, now: datetime | None = None,
                  default_expiry_s: float = DISPATCH_DEFAULTS.default_expiry_s) -> Command:
    """The Command envelope to queue for the device `request.target`: fresh uuid4 hex id (or `id`), expiry."""
    device_id = request.target or ""
    try:
        check_device_id(device_id)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    command_id = request.id or uuid.uuid4().hex
    if not is_command_id(command_id):
        raise InvalidRequest(f"command id {command_id!r} must be 1-128 characters of [A-Za-z0-9_.:-]")
    expires_in_s = request.expires_in_s if request.expires_in_s is not None else default_expiry_s
    if expires_in_s <= 0:
        raise InvalidRequest("--expires-in must be more than 0 seconds")
    if not -1000 <= request.priority <= 1000:
        raise InvalidRequest(f"priority {request.priority} must be between -1000 and 1000 (higher runs first)")
    moment = now or utc_now()
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    return Command(v=1, id=command_id, kind=request.kind, params=build_params(request), created_at=moment,
                   expires_at=moment + timedelta(seconds=expires_in_s), target=device_id,
                   priority=request.priority)


# --- queue ---------------------------------------------------------------------------------------


def queue_command(registry: Registry, request: CommandRequest, now: datetime | None = None,
                  dispatch: DispatchConfig = DISPATCH_DEFAULTS,
                  batch: str | None = None) -> tuple[CommandRow, list[str]]:
    """Validate and queue a command for the device `request.target`; returns its row and warnings."""
    command = build_command(request, now, dispatch.default_expiry_s)
    with registry.transaction():
        row = registry.commands.add(command, command.target, now, batch=batch)
        notes = _cancel_undelivered(registry, row, now) if row.kind == "cancel" else []
    return row, notes + device_warnings(registry.devices.get(command.target), row, dispatch.resend_interval_s)


def _cancel_undelivered(registry: Registry, cancel: CommandRow, now: datetime | None) -> list[str]:
    """A cancel for a command the device has not accepted yet also stops the bridge resending it.

    The cancel itself still goes to the device, after any copy of the target its session holds,
    so the device cancels that copy if it arrives.
    """
    target = cancel.payload["params"]["target"]
    message = f"cancelled by command {cancel.id} before the device accepted it"
    if registry.commands.close_locally(target, "cancelled", message, now):
        return [f"{target} was not accepted by the device yet: it is marked cancelled and no longer resent"]
    return []


def device_warnings(device: DeviceRow | None, row: CommandRow, resend_interval_s: float) -> list[str]:
    """Why a queued command might not run soon (never an error: the command stays queued)."""
    expiry = short_ts(row.expires_at)
    if device is None or device.state is None:
        return [f"device {row.device_id} has never reported status to this bridge; the command is queued and "
                f"sent every {resend_interval_s:g} s until it is accepted or expires at {expiry} UTC "
                "(a device with no broker session yet misses the copies sent before it connects)"]
    warnings = []
    if device.state == "offline":
        warnings.append(f"device {row.device_id} is offline since {short_ts(device.since)} UTC; its broker session "
                        f"keeps the command until it returns or the command expires at {expiry} UTC")
    if device.kinds and row.kind not in device.kinds:
        warnings.append(f"device {row.device_id} does not list kind {row.kind!r} (it serves {', '.join(device.kinds)});"
                        " it will most likely reject the command")
    return warnings


# --- fan-out by target ---------------------------------------------------------------------------


def parse_target(target: str) -> DeviceFilter | str:
    """`D` -> that device id; `group/G` -> a filter on group G."""
    if target.startswith(GROUP_PREFIX):
        try:
            return DeviceFilter(group=check_group(target[len(GROUP_PREFIX):]))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
    return target


def select(registry: Registry, device_filter: DeviceFilter) -> list[DeviceRow]:
    """The known devices the filter matches, by id (when it names devices, only those rows are read)."""
    rows = registry.devices.many(list(device_filter.device_ids)) if device_filter.device_ids else registry.devices.all()
    return [d for d in rows if device_filter.matches(d)]


def send(registry: Registry, request: CommandRequest, now: datetime | None = None,
         dispatch: DispatchConfig = DISPATCH_DEFAULTS) -> Queued:
    """Queue `request` for its target: one device, every known member of `group/G`, or its filter."""
    if (request.target is None) == (request.filter is None):
        raise BadTarget('give exactly one of "target" (a device id or "group/G") and "filter"')
    target = parse_target(request.target) if request.target is not None else request.filter
    if isinstance(target, str):
        row, warnings = queue_command(registry, request, now, dispatch)
        return Queued(None, [row], warnings)
    return send_to_many(registry, request, target, now, dispatch)


def send_to_many(registry: Registry, request: CommandRequest, device_filter: DeviceFilter,
                 now: datetime | None = None, dispatch: DispatchConfig = DISPATCH_DEFAULTS) -> Queued:
    """Queue `request` for every device the filter matches, in one transaction (see the module doc)."""
    devices = select(registry, device_filter)
    if not devices:
        raise InvalidRequest(f"no known device matches {device_filter.label()}; list the fleet with "
                             "`cloud-bridge devices`; group membership is the registry's: `cloud-bridge group list` "
                             "(a member that announces other groups than it is assigned is left out)")
    batch = request.id or uuid.uuid4().hex
    if device_filter == DeviceFilter(group=device_filter.group) and device_filter.group is not None:
        return _send_to_group(registry, request, device_filter.group, devices, batch, now, dispatch)
    commands = [build_command(request.model_copy(update={"target": device.device_id, "filter": None,
                                                          "id": member_id(batch, device)}),
                              now, dispatch.default_expiry_s) for device in devices]
    members = [(command, device, None) for command, device in zip(commands, devices, strict=True)]
    return _queue_fan_out(registry, members, batch, now, dispatch)


def member_id(batch: str, device: DeviceRow) -> str:
    """The registry id of one device's part of a batch: `<batch>.<device>`."""
    row_id = f"{batch}.{device.device_id}"
    if not is_command_id(row_id):
        raise InvalidRequest(f"batch id {batch!r} is too long for device {device.device_id!r}: "
                             "command ids are at most 128 characters")
    return row_id


def _send_to_group(registry: Registry, request: CommandRequest, group: str, members: list[DeviceRow], batch: str,
                   now: datetime | None, dispatch: DispatchConfig) -> Queued:
    """One `target: group/G` command on the group topic, one tracked row per known member."""
    first = request.model_copy(update={"target": members[0].device_id, "filter": None, "id": batch})
    command = build_command(first, now, dispatch.default_expiry_s)
    command = command.model_copy(update={"target": f"{GROUP_PREFIX}{group}"})
    return _queue_fan_out(registry, [(command, device, member_id(batch, device)) for device in members],
                          batch, now, dispatch)


def _queue_fan_out(registry: Registry, members: list[tuple[Command, DeviceRow, str | None]], batch: str,
                   now: datetime | None, dispatch: DispatchConfig) -> Queued:
    """Queue one row per (command, device, row id) in one transaction; a `cancel` also stops the
    resending of its target (as `queue_command` does)."""
    queued = Queued(batch)
    with registry.transaction():
        queued.rows = registry.commands.add_many(
            [(command, device.device_id, row_id) for command, device, row_id in members], now, batch)
        for row, (_, device, _) in zip(queued.rows, members, strict=True):
            if row.kind == "cancel":
                queued.warnings.extend(_cancel_undelivered(registry, row, now))
            queued.warnings.extend(device_warnings(device, row, dispatch.resend_interval_s))
    return queued


# --- cancel --------------------------------------------------------------------------------------


def cancel(registry: Registry, command_id: str, now: datetime | None = None,
           dispatch: DispatchConfig = DISPATCH_DEFAULTS) -> tuple[CommandRow, list[str]]:
    """Send a `cancel` for a command to its device (and stop resending it if it was not accepted yet)."""
    target = registry.commands.get(command_id)
    if target.terminal:
        raise InvalidRequest(f"command {command_id} already ended {target.state}; there is nothing to cancel")
    wire_id = target.wire_id or target.id
    request = CommandRequest(target=target.device_id, kind="cancel", prompt=wire_id, priority=1000,
                             expires_in_s=CANCEL_EXPIRES_IN_S)
    row, notes = queue_command(registry, request, now, dispatch)
    message = f"cancelled by command {row.id} before the device accepted it"
    if wire_id != target.id and registry.commands.close_locally(target.id, "cancelled", message, now):
        notes.append(f"{target.id} was not accepted by {target.device_id} yet: it is marked cancelled and no "
                     "longer resent")
    return row, notes


# --- follow --------------------------------------------------------------------------------------


class Follower:
    """Follows one command until it ends: its stream chunks in index order as they are stored.

    `row` is the command's latest row (read when the follower is made: an unknown id raises
    UnknownCommand at once), `text` the streamed text so far and `gaps` how many chunks were lost
    on the way (QoS 0) and skipped once the command ended; its final row has the full text.
    """

    def __init__(self, registry: Registry, command_id: str, poll_s: float = POLL_S) -> None:
        self._registry = registry
        self._command_id = command_id
        self._poll_s = poll_s
        self._next_idx = 0
        self.row = registry.commands.get(command_id)
        self.text = ""
        self.gaps = 0

    def read(self, final: bool = False) -> list[str]:
        """The new deltas that continue the text; with `final`, also those after a gap (lost chunks)."""
        deltas = []
        for chunk in self._registry.chunks.of_command(self._command_id, self._next_idx):
            if chunk.idx != self._next_idx and not final:
                break
            self.gaps += chunk.idx - self._next_idx
            self._next_idx = chunk.idx + 1
            if chunk.delta:
                self.text += chunk.delta
                deltas.append(chunk.delta)
        return deltas

    def follow(self, timeout_s: float) -> Iterator[str]:
        """Each new delta as it is stored, until the command ended or `timeout_s` passed (see `row`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.row = self._registry.commands.get(self._command_id)
            yield from self.read(final=self.row.terminal)
            if self.row.terminal or time.monotonic() >= deadline:
                return
            time.sleep(self._poll_s)

    def wait(self, timeout_s: float) -> CommandRow:
        """The command's row once it ended, or its latest row after `timeout_s`."""
        for _ in self.follow(timeout_s):
            pass
        return self.row
