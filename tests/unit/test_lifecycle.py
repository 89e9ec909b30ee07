"""The one command lifecycle (autoglm_wire.lifecycle): the device's table, ranks, the start decision."""

from __future__ import annotations

from typing import get_args

import pytest

from autoglm_wire.lifecycle import (
    BRIDGE_STATES,
    REPLY_STATES,
    TERMINAL,
    TRANSITIONS,
    ReplyStatus,
    State,
    is_terminal,
    rank,
    sources,
    start_decision,
)
from autoglm_wire.lifecycle import (
    reply_status as lifecycle_reply_status,
)
from autoglm_wire.protocol import Reply

TERMINAL_STATES = [State.SUCCEEDED, State.FAILED, State.REJECTED, State.EXPIRED, State.CANCELLED]
ALLOWED = {(old, new) for old, nxt in TRANSITIONS.items() for new in nxt}


def test_the_wire_statuses_are_every_state_but_the_bridges_own() -> None:
    assert set(REPLY_STATES) | set(BRIDGE_STATES) == {s.value for s in State}
    assert not set(REPLY_STATES) & set(BRIDGE_STATES)
    assert Reply.model_fields["status"].annotation is ReplyStatus
    assert get_args(ReplyStatus) == REPLY_STATES


def test_the_terminal_states_are_the_ones_without_exit() -> None:
    assert set(TERMINAL) == set(TERMINAL_STATES)
    assert {s for s, nxt in TRANSITIONS.items() if not nxt} == TERMINAL


def test_every_state_a_device_stores_has_a_row_in_the_table() -> None:
    assert set(TRANSITIONS) == set(REPLY_STATES)


def test_the_table_is_exactly_the_documented_lifecycle() -> None:
    assert ALLOWED == {
        (State.ACCEPTED, State.RUNNING),
        (State.ACCEPTED, State.EXPIRED),
        (State.ACCEPTED, State.CANCELLED),
        (State.ACCEPTED, State.FAILED),
        (State.RUNNING, State.SUCCEEDED),
        (State.RUNNING, State.FAILED),
        (State.RUNNING, State.CANCELLED),
    }


def test_sources_name_the_states_a_command_may_come_from() -> None:
    assert sources(State.RUNNING) == {State.ACCEPTED}
    assert sources(State.SUCCEEDED) == {State.RUNNING}
    assert sources(State.CANCELLED) == {State.ACCEPTED, State.RUNNING}
    assert sources(State.FAILED) == {State.ACCEPTED, State.RUNNING}
    assert sources(State.EXPIRED) == {State.ACCEPTED}
    assert sources(State.ACCEPTED) == frozenset()
    assert sources(State.REJECTED) == frozenset()
    assert "accepted" in sources(State.RUNNING)  # StrEnum: matches the stored strings


def test_every_allowed_transition_moves_forward_in_rank() -> None:
    assert all(rank(new) > rank(old) for old, new in ALLOWED)


def test_states_only_move_forward() -> None:
    assert rank("sent") > rank("pending")
    assert rank("accepted") > rank("sent")
    assert rank("running") > rank("accepted")
    assert rank("rejected") > rank("pending")
    assert rank("succeeded") == rank("expired")  # the first terminal state is final
    assert [is_terminal(s) for s in ("running", "cancelled")] == [False, True]


def test_an_unknown_state_is_an_error_that_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        rank("lost")


def test_a_command_without_expiry_always_starts() -> None:
    assert start_decision(None, 1e12) is State.RUNNING


def test_a_command_reached_before_its_expiry_starts() -> None:
    assert start_decision(expires_at=100.0, now=99.999) is State.RUNNING


def test_a_command_reached_exactly_at_its_expiry_has_expired() -> None:
    assert start_decision(expires_at=100.0, now=100.0) is State.EXPIRED


def test_a_command_reached_after_its_expiry_has_expired() -> None:
    assert start_decision(expires_at=100.0, now=100.001) is State.EXPIRED


def test_a_reply_status_is_the_states_value_and_the_bridges_own_states_have_none() -> None:
    assert lifecycle_reply_status(State.SUCCEEDED) == "succeeded"
    for state in (State.PENDING, State.SENT):
        with pytest.raises(ValueError, match="bridge's own state"):
            lifecycle_reply_status(state)
