"""Stream chunks for one command, coalesced: the first visible text goes out at once (what a user
sees as time to first token; a token that shows nothing yet, such as part of a UTF-8 sequence or a
special token, gives an empty delta, which is skipped and does not start the interval), later ones
are gathered and sent at most every `interval_s` (`mqtt.stream_interval_ms`),
checked as tokens arrive, so a fast model publishes a few chunks per second, not one per token;
0 sends every token as its own chunk. Chunks are serialized by hand (the StreamChunk layout, same
key order) because this runs on the token path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable


class ChunkStreamer:
    def __init__(self, topic: str, command_id: str, publish: Callable[[str, bytes], None],
                 interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._topic = topic
        self._prefix = '{"v":1,"command_id":' + json.dumps(command_id) + ',"index":'
        self._publish = publish
        self._interval_s = interval_s
        self._clock = clock
        self._index = 0
        self._pending: list[str] = []
        self._next_flush = 0.0  # the first delta is due at once

    def delta(self, text: str) -> None:
        if not text:
            return
        self._pending.append(text)
        now = self._clock()
        if now >= self._next_flush:
            self._flush(done=False)
            self._next_flush = now + self._interval_s

    def done(self) -> None:
        """Send what is pending, then the final chunk (`done: true`, empty delta)."""
        if self._pending:
            self._flush(done=False)
        self._flush(done=True)

    def _flush(self, done: bool) -> None:
        text = "".join(self._pending)
        self._pending.clear()
        payload = (f'{self._prefix}{self._index},"delta":{json.dumps(text, ensure_ascii=False)},'
                   f'"done":{"true" if done else "false"}}}')
        self._publish(self._topic, payload.encode("utf-8"))
        self._index += 1
