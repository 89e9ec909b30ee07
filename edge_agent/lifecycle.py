"""The command lifecycle of protocol v1 as a table, plus the pure decisions the executor makes.

accepted -> running -> succeeded | failed | cancelled
accepted -> expired | cancelled | failed   (never ran)
No I/O here: the store enforces the table with `sources(new_state)`.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.ACCEPTED: frozenset({State.RUNNING, State.EXPIRED, State.CANCELLED, State.FAILED}),
    State.RUNNING: frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED}),
    State.SUCCEEDED: frozenset(),
    State.FAILED: frozenset(),
    State.REJECTED: frozenset(),
    State.EXPIRED: frozenset(),
    State.CANCELLED: frozenset(),
}

TERMINAL: frozenset[State] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


class IllegalTransition(ValueError):
    pass


def check(old: State, new: State) -> None:
    """Raise IllegalTransition unless `old -> new` is in the table."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"a command in state {old} cannot become {new}")


def sources(new: State) -> frozenset[State]:
    """The states from which a command may move to `new`."""
    return frozenset(old for old, nxt in TRANSITIONS.items() if new in nxt)


def start_decision(expires_at: float | None, now: float) -> State:
    """What a queued command becomes when the worker reaches it: RUNNING, or EXPIRED if too late."""
    if expires_at is not None and now >= expires_at:
        return State.EXPIRED
    return State.RUNNING


def recovery_decision(state: State) -> State | None:
    """What a command found at agent start becomes: a `running` one was interrupted by a crash and
    gets FAILED (it is never silently run twice); a queued one stays; terminal ones stay."""
    return State.FAILED if state is State.RUNNING else None
