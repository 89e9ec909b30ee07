"""Local API calls waiting on their commands: the text deltas the engine produces and the terminal
reply the outbox stores, handed to the HTTP thread that waits for them (edge_agent/local_api.py).

A local request is an ordinary command: intake checks and stores it, the executor runs it, its
replies go through the outbox to the cloud. This registry only lets the waiting HTTP thread see,
in the same process, what the engine streams and which reply ends the command.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from autoglm_wire.lifecycle import TERMINAL_STATES
from autoglm_wire.protocol import Reply

Delta = tuple[str, str]  # ("delta", text)
Done = tuple[str, Reply]  # ("done", the terminal reply)


class LocalCalls:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, queue.SimpleQueue[Delta | Done]] = {}

    def open(self, command_id: str) -> queue.SimpleQueue[Delta | Done]:
        """Register a call before its command is handed to intake; read its events from the queue."""
        events: queue.SimpleQueue[Delta | Done] = queue.SimpleQueue()
        with self._lock:
            self._calls[command_id] = events
        return events

    def close(self, command_id: str) -> None:
        with self._lock:
            self._calls.pop(command_id, None)

    def on_delta(self, command_id: str) -> Callable[[str], None] | None:
        """Where the engine's text deltas of `command_id` go; None when no local call waits for it."""
        with self._lock:
            events = self._calls.get(command_id)
        if events is None:
            return None
        return lambda text: events.put(("delta", text))

    def on_reply(self, payload: bytes) -> None:
        """The outbox stored a reply (SqliteOutbox.on_reply): a terminal one ends its command's call.
        Called inside the storing transaction; the executor retries a reply until it is written."""
        with self._lock:
            if not self._calls:
                return
        reply = Reply.model_validate_json(payload)
        with self._lock:
            events = self._calls.get(reply.command_id) if reply.command_id else None
        if events is not None and reply.status in TERMINAL_STATES:
            events.put(("done", reply))
