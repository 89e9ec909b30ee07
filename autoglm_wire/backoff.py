"""Reconnect schedule: exponential backoff with full jitter, as a tenacity wait strategy. Pure."""

from __future__ import annotations

import random

from tenacity import wait_random_exponential
from tenacity.wait import wait_base


def reconnect_wait(initial_s: float, multiplier: float, max_s: float) -> wait_base:
    """Attempt n waits uniform(0, min(max_s, initial_s * multiplier ** (n - 1))) seconds."""
    if initial_s <= 0 or multiplier < 1 or max_s <= 0:
        raise ValueError("backoff needs initial_s > 0, multiplier >= 1 and max_s > 0")
    return wait_random_exponential(multiplier=initial_s, exp_base=multiplier, max=max_s)


def ceiling(initial_s: float, multiplier: float, max_s: float, attempt: int) -> float:
    """The upper bound of the jittered wait before attempt `attempt` (1-based)."""
    return min(max_s, initial_s * multiplier ** (attempt - 1))


def full_jitter(initial_s: float, multiplier: float, max_s: float, attempt: int) -> float:
    """One wait of `reconnect_wait`'s schedule, for a loop that is not a tenacity call: uniform(0,
    ceiling) before attempt `attempt` (1-based)."""
    return random.uniform(0.0, ceiling(initial_s, multiplier, max_s, attempt))
