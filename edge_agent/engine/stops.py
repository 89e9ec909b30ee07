"""Stop strings over streamed text (pure). Text that could still be the start of a stop string is
held back until the next piece decides; a stop string ends the text just before it."""

from __future__ import annotations


class StopScan:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that may be shown now, whether a stop string was found: then nothing follows)."""
        held = self._held + text
        found = [at for at in (held.find(stop) for stop in self._stops) if at >= 0]
        if found:
            self._held = ""
            return held[:min(found)], True
        keep = max((n for stop in self._stops for n in range(1, len(stop)) if held.endswith(stop[:n])), default=0)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep], False

    def flush(self) -> str:
        """What was held back, when the text ends without a stop string."""
        held, self._held = self._held, ""
        return held
