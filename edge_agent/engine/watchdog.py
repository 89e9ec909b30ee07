"""The stall watchdog: no token for `timeout_s` seconds -> set the cancel event and remember why.

One long-lived thread per engine (starting a thread per generation cost up to a millisecond of
time to first token). `watching(cancel)` arms it for one generation, the engine calls `tick()` for
every token, and the thread calls `check()` a few times per timeout. `check(now)` is the whole
decision, so tests drive it with their own clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StallWatchdog:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.stalled = False
        self.overran = False
        self._deadline: float | None = None
        self._clock = clock
        self._last = clock()
        self._cancel: threading.Event | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StallWatchdog:
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    @contextmanager
    def watching(self, cancel: threading.Event, deadline_s: float | None = None) -> Iterator[StallWatchdog]:
        """Arm for one generation: a stall sets `cancel` and `stalled`; running past `deadline_s`
        seconds in all sets `cancel` and `overran`."""
        self.stalled = self.overran = False
        self._last = self._clock()
        self._deadline = self._last + deadline_s if deadline_s is not None else None
        self._cancel = cancel
        try:
            yield self
        finally:
            self._cancel = None

    def tick(self) -> None:
        """A token arrived."""
        self._last = self._clock()

    def check(self, now: float | None = None) -> bool:
        """While armed, stall if the last token is older than the timeout: cancel the generation."""
        cancel = self._cancel
        if cancel is None or self.stalled or self.overran:
            return self.stalled or self.overran
        now = self._clock() if now is None else now
        if now - self._last > self.timeout_s:
            self.stalled = True
            cancel.set()
        elif self._deadline is not None and now > self._deadline:
            self.overran = True
            cancel.set()
        return self.stalled or self.overran

    def _watch(self) -> None:
        interval = min(0.1, self.timeout_s / 4)
        while not self._closed.wait(interval):
            self.check()
