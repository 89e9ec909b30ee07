"""The command lifecycle table and the pure decisions the executor takes from it."""

from __future__ import annotations

import pytest

from edge_agent.lifecycle import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    State,
    check,
    recovery_decision,
    sources,
    start_decision,
)
from edge_agent.protocol import TERMINAL_STATUSES

TERMINAL_STATES = [State.SUCCEEDED, State.FAILED, State.REJECTED, State.EXPIRED, State.CANCELLED]
ALLOWED = {(old, new) for old, nxt in TRANSITIONS.items() for new in nxt}


def test_the_terminal_states_are_exactly_the_terminal_reply_statuses() -> None:
    assert set(TERMINAL) == set(TERMINAL_STATES)
    assert {str(s) for s in TERMINAL} == set(TERMINAL_STATUSES)


def test_every_state_has_a_row_in_the_table() -> None:
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize("terminal", TERMINAL_STATES)
def test_a_terminal_state_has_no_exit(terminal: State) -> None:
    assert TRANSITIONS[terminal] == frozenset()
    for new in State:
        with pytest.raises(IllegalTransition):
            check(terminal, new)


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


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
def test_check_allows_exactly_the_transitions_in_the_table(old: State, new: State) -> None:
    if (old, new) in ALLOWED:
        check(old, new)
    else:
        with pytest.raises(IllegalTransition):
            check(old, new)


def test_a_running_command_may_succeed_but_a_succeeded_one_never_runs_again() -> None:
    check(State.RUNNING, State.SUCCEEDED)
    with pytest.raises(IllegalTransition, match="cannot become running"):
        check(State.SUCCEEDED, State.RUNNING)


def test_a_command_that_never_ran_cannot_succeed() -> None:
    with pytest.raises(IllegalTransition):
        check(State.ACCEPTED, State.SUCCEEDED)


def test_sources_name_the_states_a_command_may_come_from() -> None:
    assert sources(State.RUNNING) == {State.ACCEPTED}
    assert sources(State.SUCCEEDED) == {State.RUNNING}
    assert sources(State.CANCELLED) == {State.ACCEPTED, State.RUNNING}
    assert sources(State.FAILED) == {State.ACCEPTED, State.RUNNING}
    assert sources(State.EXPIRED) == {State.ACCEPTED}
    assert sources(State.ACCEPTED) == frozenset()
    assert sources(State.REJECTED) == frozenset()


def test_sources_match_the_stored_state_strings() -> None:
    assert "accepted" in sources(State.RUNNING)


def test_a_command_without_expiry_always_starts() -> None:
    assert start_decision(None, 1e12) is State.RUNNING


def test_a_command_reached_before_its_expiry_starts() -> None:
    assert start_decision(expires_at=100.0, now=99.999) is State.RUNNING


def test_a_command_reached_exactly_at_its_expiry_has_expired() -> None:
    assert start_decision(expires_at=100.0, now=100.0) is State.EXPIRED


def test_a_command_reached_after_its_expiry_has_expired() -> None:
    assert start_decision(expires_at=100.0, now=100.001) is State.EXPIRED


def test_a_command_found_running_at_start_was_interrupted_and_fails() -> None:
    assert recovery_decision(State.RUNNING) is State.FAILED


@pytest.mark.parametrize("state", [s for s in State if s is not State.RUNNING])
def test_every_other_command_found_at_start_is_left_as_it_is(state: State) -> None:
    assert recovery_decision(state) is None
