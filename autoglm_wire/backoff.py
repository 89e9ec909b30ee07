"""Reconnect schedule: exponential backoff with full jitter, as a tenacity wait strategy. Pure."""

from __future__ import annotations

from tenacity import wait_random_exponential
from tenacity.wait import wait_base


def reconnect_wait(initial_s: float, multiplier: float, max_s: float) -> wait_base:
    """Attempt n waits uniform(0, min(max_s, initial_s * multiplier ** (n - 1))) seconds."""
    if initial_s <= 0 or multiplier < 1 or max_s <= 0:
        raise ValueError("backoff needs initial_s > 0, multiplier >= 1 and max_s > 0")
    return wait_random_exponential(multiplier=initial_s, exp_base=multiplier, max=max_s)

