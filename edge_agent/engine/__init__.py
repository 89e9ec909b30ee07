"""Inference engines behind one small interface. The executor picks one by command kind."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from autoglm_wire.protocol import ChatParams, CompleteParams, ModelInfo

OnDelta = Callable[[str], None]
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Generation:
    """The outcome of one text generation."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    total_ms: float
    seed: int

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time after the first token."""
        decode_ms = self.total_ms - self.ttft_ms
        if self.completion_tokens <= 1 or decode_ms <= 0:
            return 0.0
        return (self.completion_tokens - 1) * 1000.0 / decode_ms


class TextSink:
    """The text of one generation as its tokens arrive: the time of the first token, the pieces,
    and `on_delta` for each piece with text. `tick` hears every token (the stall watchdog)."""

    def __init__(self, on_delta: OnDelta | None, tick: Callable[[], None]) -> None:
        self._on_delta, self._tick = on_delta, tick
        self.first_token_at: float | None = None
        self._pieces: list[str] = []

    def token(self, delta: str) -> None:
        self._tick()
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if delta:
            self._pieces.append(delta)
            if self._on_delta is not None:
                self._on_delta(delta)

    @property
    def text(self) -> str:
        return "".join(self._pieces)


class TextEngine(Protocol):
    """A loaded text model. Not thread-safe: one worker thread owns it."""

    info: ModelInfo
    gpu_reason: str

    def chat(self, params: ChatParams, on_delta: OnDelta | None, cancel: threading.Event) -> Generation: ...

    def complete(self, params: CompleteParams, on_delta: OnDelta | None, cancel: threading.Event) -> Generation: ...

    def close(self) -> None: ...


class EngineSwap(Protocol):
    """A change of the text engine, run by the executor on a worker thread between commands."""

    def swap(self, old: TextEngine) -> TextEngine: ...


@dataclass(frozen=True)
class EngineReload:
    """A model reload: load the new engine after closing the old one (two models may not fit in
    memory); if the new one fails, load the old config again. `done` hears the outcome."""

    load_new: Callable[[], TextEngine]
    load_old: Callable[[], TextEngine]
    done: Callable[[TextEngine, Exception | None], None]

    def swap(self, old: TextEngine) -> TextEngine:
        old.close()
        try:
            engine, error = self.load_new(), None
        except Exception as exc:  # any load failure: keep serving with the old model
            engine, error = self.load_old(), exc
        self.done(engine, error)
        return engine
