"""Reconnect backoff: exponential with full jitter (protocol v1, delivery guarantee 5)."""

from __future__ import annotations

import pytest
from tenacity import RetryCallState, Retrying

from autoglm_wire.backoff import ceiling, reconnect_wait

SAMPLES = 400


def state(attempt: int) -> RetryCallState:
    retry_state = RetryCallState(Retrying(), None, (), {})
    retry_state.attempt_number = attempt
    return retry_state


@pytest.mark.parametrize("initial,multiplier,max_s", [(1.0, 2.0, 30.0), (0.25, 3.0, 5.0), (2.0, 1.0, 10.0)])
@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 40])
def test_every_wait_lies_between_zero_and_the_ceiling_and_is_spread_over_it(
    initial: float, multiplier: float, max_s: float, attempt: int
) -> None:
    wait = reconnect_wait(initial, multiplier, max_s)
    top = ceiling(initial, multiplier, max_s, attempt)
    waits = [wait(state(attempt)) for _ in range(SAMPLES)]
    assert all(0 <= w <= top for w in waits)
    assert any(w < 0.25 * top for w in waits), "full jitter: short waits must occur"
    assert any(w > 0.75 * top for w in waits), "full jitter: waits near the ceiling must occur"


def test_a_huge_attempt_number_waits_at_most_the_cap() -> None:
    wait = reconnect_wait(1.0, 2.0, 30.0)
    assert all(0 <= wait(state(10_000)) <= 30.0 for _ in range(50))


@pytest.mark.parametrize(
    "initial,multiplier,max_s",
    [(0.0, 2.0, 30.0), (-1.0, 2.0, 30.0), (1.0, 0.5, 30.0), (1.0, 2.0, 0.0), (1.0, 2.0, -5.0)],
)
def test_invalid_backoff_parameters_are_refused(initial: float, multiplier: float, max_s: float) -> None:
    with pytest.raises(ValueError):
        reconnect_wait(initial, multiplier, max_s)
