"""Fleet operations on top of the console: who a command goes to (one device, a group, a filter) and
cancelling. No MQTT here: everything is queued in the registry for the dispatch loop.

A command to several devices gets one registry row per device, `<batch>.<device>`, each with its
own lifecycle, attempts, replies and terminal state, so every target is tracked separately; the
batch id ties them together (`cloud-bridge commands --batch B`, `GET /api/commands?batch=B`).

- `group/G`: ONE command, id `<batch>`, `target: "group/G"`, published on `P/group/G/cmd`; every
  known member's row waits for that member's replies (matched by the id on the wire and the
  device), and is resent on the group topic until that member accepted it (members that already
  have it answer a duplicate with their stored reply and do not run it again).
- a filter: one command per matching device on its own `P/D/cmd`, id `<batch>.<device>`.

Group membership is what each device announced in its last Status.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from autoglm_wire.protocol import is_command_id
from autoglm_wire.topics import check_group
from cloud_bridge.console import SendRequest, build_command, device_warnings, queue_command
from cloud_bridge.errors import InvalidRequest
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow, DeviceRow

GROUP_PREFIX = "group/"


@dataclass(frozen=True)
class DeviceFilter:
    """A set of devices: every field given must match (an empty filter matches the whole fleet)."""

    device_ids: tuple[str, ...] = ()
    group: str | None = None
    state: str | None = None
    model_sha256: str | None = None
    agent_version: str | None = None

    def matches(self, device: DeviceRow) -> bool:
        checks = [
            not self.device_ids or device.device_id in self.device_ids,
            self.group is None or self.group in device.groups,
            self.state is None or device.state == self.state,
            self.model_sha256 is None or (device.model_sha256 or "").startswith(self.model_sha256),
            self.agent_version is None or device.agent_version == self.agent_version,
        ]
        return all(checks)

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v not in (None, ())]
        return ",".join(parts) or "all"


def parse_target(target: str) -> DeviceFilter | str:
    """`D` -> that device id; `group/G` -> a filter on group G."""
    if target.startswith(GROUP_PREFIX):
        try:
            return DeviceFilter(group=check_group(target[len(GROUP_PREFIX):]))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
    return target


def select(registry: Registry, device_filter: DeviceFilter) -> list[DeviceRow]:
    """The known devices the filter matches, by id."""
    return [d for d in registry.devices.all() if device_filter.matches(d)]


@dataclass
class Fanout:
    """What `send_to_many` queued: one row per device, plus warnings worth showing."""

    batch: str
    rows: list[CommandRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def send_to_many(registry: Registry, request: SendRequest, device_filter: DeviceFilter,
                 now: datetime | None = None, resend_interval_s: float = 5.0) -> Fanout:
    """Queue `request` for every device the filter matches, in one transaction (see the module doc)."""
    devices = select(registry, device_filter)
    if not devices:
        raise InvalidRequest(f"no known device matches {device_filter.label()}; list the fleet with "
                             "`cloud-bridge devices` (group membership comes from each device's status)")
    batch = request.command_id or uuid.uuid4().hex
    if device_filter == DeviceFilter(group=device_filter.group) and device_filter.group is not None:
        return _send_to_group(registry, request, device_filter.group, devices, batch, now, resend_interval_s)
    fanout = Fanout(batch)
    with registry.transaction():
        for device in devices:
            one = dataclasses.replace(request, device_id=device.device_id, command_id=member_id(batch, device))
            row, warnings = queue_command(registry, one, now, resend_interval_s, batch=batch)
            fanout.rows.append(row)
            fanout.warnings.extend(warnings)
    return fanout


def member_id(batch: str, device: DeviceRow) -> str:
    """The registry id of one device's part of a batch: `<batch>.<device>`."""
    row_id = f"{batch}.{device.device_id}"
    if not is_command_id(row_id):
        raise InvalidRequest(f"batch id {batch!r} is too long for device {device.device_id!r}: "
                             "command ids are at most 128 characters")
    return row_id


def _send_to_group(registry: Registry, request: SendRequest, group: str, members: list[DeviceRow], batch: str,
                   now: datetime | None, resend_interval_s: float) -> Fanout:
    """One `target: group/G` command on the group topic, one tracked row per known member."""
    command = build_command(dataclasses.replace(request, device_id=members[0].device_id, command_id=batch), now)
    command = command.model_copy(update={"target": f"{GROUP_PREFIX}{group}"})
    fanout = Fanout(batch)
    with registry.transaction():
        for device in members:
            row = registry.commands.add(command, device.device_id, now, batch=batch, row_id=member_id(batch, device))
            fanout.rows.append(row)
            fanout.warnings.extend(device_warnings(device, row, resend_interval_s))
    return fanout


def cancel(registry: Registry, command_id: str, now: datetime | None = None,
           resend_interval_s: float = 5.0) -> tuple[CommandRow, list[str]]:
    """Send a `cancel` for a command to its device (and stop resending it if it was not accepted yet)."""
    target = registry.commands.get(command_id)
    if target.terminal:
        raise InvalidRequest(f"command {command_id} already ended {target.state}; there is nothing to cancel")
    wire_id = target.wire_id or target.id
    request = SendRequest(device_id=target.device_id, kind="cancel", prompt=wire_id, priority=1000)
    row, notes = queue_command(registry, request, now, resend_interval_s)
    if wire_id != target.id and registry.commands.close_locally(
            target.id, "cancelled", f"cancelled by command {row.id} before the device accepted it", now):
        notes.append(f"{target.id} was not accepted by {target.device_id} yet: it is marked cancelled and no "
                     "longer resent")
    return row, notes
