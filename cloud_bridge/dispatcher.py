"""The command lifecycle on the cloud side, as pure functions of (command, device, now). No I/O.

A command moves `pending -> sent -> accepted -> running -> <terminal>` and never backward. The
bridge owns the first two steps: it publishes a `pending` command, and re-publishes a `sent` one
(with the SAME id, so the device runs it at most once) every `resend_interval_s` until a reply
shows `accepted` or a later state. From `accepted` on, the device owns the command (it honours
`expires_at` itself). A command still `pending`/`sent` when `expires_at` passes is expired by the
bridge with error code `expired`.

While a device is known `offline`, a `sent` command is not re-published: the device's persistent
session on the broker already holds a copy, and every resend would queue one more (mosquitto drops
messages beyond `max_queued_messages`). A device that never reported status may have no session
yet (the broker drops what nobody subscribed to), so it gets the normal resend schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from autoglm_wire.lifecycle import BRIDGE_STATES


class Action(StrEnum):
    SEND = "send"  # publish the command now (first send or resend), same id
    WAIT = "wait"  # nothing to do before `Decision.wake_at`
    EXPIRE = "expire"  # mark it `expired` locally
    NONE = "none"  # the device owns it, or it is finished


@dataclass(frozen=True)
class CommandView:
    """The fields of a command row that the dispatcher reads."""

    state: str
    attempts: int
    last_sent_at: datetime | None
    expires_at: datetime | None


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    wake_at: datetime | None = None


def decide(
    command: CommandView, device_state: str | None, now: datetime, resend_interval_s: float
) -> Decision:
    """What the dispatcher should do with one command at `now`.

    `device_state` is the device's last reported state (`online`/`offline`) or None if it never
    reported status.
    """
    if command.state not in BRIDGE_STATES:
        return Decision(Action.NONE, f"the device reported {command.state!r}")
    if command.expires_at is not None and now >= command.expires_at:
        reason = f"no `accepted` from the device before expires_at (sent {command.attempts} time(s))"
        return Decision(Action.EXPIRE, reason)
    if command.state == "pending" or command.last_sent_at is None:
        return Decision(Action.SEND, "first send")
    if device_state == "offline":
        return Decision(Action.WAIT, "device offline; its broker session holds the last copy", command.expires_at)
    due = command.last_sent_at + timedelta(seconds=resend_interval_s)
    if now >= due:
        return Decision(Action.SEND, f"no `accepted` {resend_interval_s:g} s after send {command.attempts}")
    wake = due if command.expires_at is None else min(due, command.expires_at)
    return Decision(Action.WAIT, "waiting for `accepted`", wake)


def message_expiry_s(expires_at: datetime | None, now: datetime) -> int | None:
    """MQTT 5 MessageExpiryInterval for a publish at `now`: whole seconds left, at least 1."""
    if expires_at is None:
        return None
    return max(1, math.ceil((expires_at - now).total_seconds()))
