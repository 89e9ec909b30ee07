"""The command lifecycle of protocol v1: one vocabulary for the device, the wire and the bridge.

    pending -> sent -> accepted -> running -> succeeded | failed | cancelled
                       accepted -> expired | cancelled | failed      (never ran)
    (any reply before `accepted`) -> rejected

`pending` and `sent` exist only on the bridge (queued, published); a device's replies carry the
other states (`REPLY_STATES`). States only move forward: `rank` orders them, and every terminal
state shares the last rank, so the first terminal state is final. The device enforces its own
table (`TRANSITIONS`) in its store with `sources(new_state)`. No I/O here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, cast, get_args


class State(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


# The `status` of a Reply on the wire (protocol v1): every state but the bridge's own two.
ReplyStatus = Literal["accepted", "running", "succeeded", "failed", "rejected", "expired", "cancelled"]

TERMINAL: frozenset[State] = frozenset(
    {State.SUCCEEDED, State.FAILED, State.REJECTED, State.EXPIRED, State.CANCELLED})
# As plain strings, for SQL parameters (a driver may adapt an Enum by its name).
BRIDGE_STATES: tuple[str, ...] = (State.PENDING.value, State.SENT.value)
REPLY_STATES: tuple[str, ...] = get_args(ReplyStatus)
TERMINAL_STATES: tuple[str, ...] = tuple(sorted(s.value for s in TERMINAL))

# The device's table: which state a stored command may move to from each state.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.ACCEPTED: frozenset({State.RUNNING, State.EXPIRED, State.CANCELLED, State.FAILED}),
    State.RUNNING: frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED}),
    **{state: frozenset() for state in TERMINAL},
}

_RANKS: dict[State, int] = {State.PENDING: 0, State.SENT: 1, State.ACCEPTED: 2, State.RUNNING: 3}
_TERMINAL_RANK = 4


def rank(state: str) -> int:
    """Position of a state in the lifecycle; every terminal state shares the last rank."""
    if state in TERMINAL:
        return _TERMINAL_RANK
    try:
        return _RANKS[State(state)]
    except ValueError:
        raise ValueError(f"unknown command state {state!r}; expected one of {[s.value for s in State]}") from None


def is_terminal(state: str) -> bool:
    return state in TERMINAL


def is_illegal_after(old: str, new: str) -> bool:
    """Whether a reply `new` contradicts a command already in `old`: `rejected` after the device
    accepted it (or after any terminal state), or a terminal state other than the one recorded. A
    late non-terminal reply (`running` after `succeeded`) is only out of order, not illegal."""
    if new == State.REJECTED and old != State.REJECTED:
        return rank(old) >= rank(State.ACCEPTED)
    return is_terminal(old) and is_terminal(new) and old != new


def rejectable(state: str) -> bool:
    """Whether the bridge may record `rejected` for a command in `state`: only before the device accepted it."""
    return rank(state) < rank(State.ACCEPTED)


def reply_status(state: State) -> ReplyStatus:
    """The wire status announcing `state`; `pending`/`sent` are the bridge's and never on the wire."""
    if state.value not in REPLY_STATES:
        raise ValueError(f"{state.value!r} is the bridge's own state and never a reply status")
    return cast(ReplyStatus, state.value)


def sources(new: State) -> frozenset[State]:
    """The states from which a command stored on the device may move to `new`."""
    return frozenset(old for old, nxt in TRANSITIONS.items() if new in nxt)


def start_decision(expires_at: float | None, now: float) -> State:
    """What a queued command becomes when the worker reaches it: RUNNING, or EXPIRED if too late."""
    if expires_at is not None and now >= expires_at:
        return State.EXPIRED
    return State.RUNNING
