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

from edge_agent.protocol import TERMINAL_STATUSES

BRIDGE_STATES: tuple[str, ...] = ("pending", "sent")
DEVICE_STATES: tuple[str, ...] = ("accepted", "running")
TERMINAL_STATES: tuple[str, ...] = tuple(sorted(TERMINAL_STATUSES))
ALL_STATES: tuple[str, ...] = BRIDGE_STATES + DEVICE_STATES + TERMINAL_STATES

STATE_RANKS: dict[str, int] = {"pending": 0, "sent": 1, "accepted": 2, "running": 3}
TERMINAL_RANK = 4


def rank(state: str) -> int:
    """Position of a state in the lifecycle; every terminal state shares the last rank."""
    if state in TERMINAL_STATUSES:
        return TERMINAL_RANK
    try:
        return STATE_RANKS[state]
    except KeyError:
        raise ValueError(f"unknown command state {state!r}; expected one of {ALL_STATES}") from None


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATUSES


def advances(current: str, new: str) -> bool:
    """True when a reply with status `new` moves a command in state `current` forward.

    A late `accepted` after `running` or after a terminal status does not; the first terminal
    status is final.
    """
    return rank(new) > rank(current)


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
