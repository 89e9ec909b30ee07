"""The stall watchdog: no token for the timeout -> cancel and remember it was a stall."""

from __future__ import annotations

import threading

from edge_agent.engine.watchdog import StallWatchdog


def test_no_token_for_longer_than_the_timeout_is_a_stall_that_cancels() -> None:
    cancel = threading.Event()
    watchdog = StallWatchdog(5.0, clock=lambda: 0.0)
    with watchdog.watching(cancel):
        assert not watchdog.check(now=4.9)
        assert watchdog.check(now=5.1)
    assert cancel.is_set() and watchdog.stalled


def test_each_token_restarts_the_timeout() -> None:
    now = [0.0]
    cancel = threading.Event()
    watchdog = StallWatchdog(5.0, clock=lambda: now[0])
    with watchdog.watching(cancel):
        for step in range(1, 10):
            now[0] = step * 4.0
            watchdog.tick()
            assert not watchdog.check(now=now[0] + 4.9)
    assert not cancel.is_set()


def test_between_generations_nothing_is_a_stall_and_the_next_generation_starts_afresh() -> None:
    now = [0.0]
    watchdog = StallWatchdog(5.0, clock=lambda: now[0])
    with watchdog.watching(threading.Event()):
        assert watchdog.check(now=6.0)
    now[0] = 100.0
    assert watchdog.check(now=200.0) is True, "stays reported until the next generation"
    second = threading.Event()
    with watchdog.watching(second):
        assert not watchdog.stalled
        assert not watchdog.check(now=104.0)
    assert not second.is_set()


def test_the_watchdog_thread_stops_on_close() -> None:
    watchdog = StallWatchdog(60.0).start()
    watchdog.close()
    assert watchdog._thread is not None and not watchdog._thread.is_alive()


def test_a_generation_running_past_its_deadline_is_stopped_even_while_tokens_flow() -> None:
    now = [0.0]
    cancel = threading.Event()
    watchdog = StallWatchdog(5.0, clock=lambda: now[0])
    with watchdog.watching(cancel, deadline_s=10.0):
        for step in range(1, 10):
            now[0] = step * 1.0
            watchdog.tick()
            assert not watchdog.check(now=now[0])
        now[0] = 10.5
        watchdog.tick()
        assert watchdog.check(now=now[0])
    assert cancel.is_set() and watchdog.overran and not watchdog.stalled
