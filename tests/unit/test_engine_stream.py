"""Stream chunks: first delta at once, later deltas coalesced, valid StreamChunk JSON."""

from __future__ import annotations

import json

from autoglm_wire.protocol import StreamChunk
from edge_agent.engine.stream import ChunkStreamer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(interval_s: float = 0.05) -> tuple[ChunkStreamer, list[dict], Clock]:
    sent: list[dict] = []
    clock = Clock()
    streamer = ChunkStreamer("p/d/stream/c1", "c1", lambda topic, data: sent.append(json.loads(data)),
                             interval_s=interval_s, clock=clock)
    return streamer, sent, clock


def test_the_first_delta_is_sent_at_once_and_later_ones_are_coalesced() -> None:
    streamer, sent, clock = make()
    streamer.delta("He")
    assert [c["delta"] for c in sent] == ["He"]
    for piece in ("l", "l", "o"):
        clock.now += 0.01
        streamer.delta(piece)
    assert len(sent) == 1
    clock.now += 0.05
    streamer.delta(" w")
    assert [c["delta"] for c in sent] == ["He", "llo w"]


def test_the_first_visible_text_goes_out_at_once_after_tokens_that_show_nothing() -> None:
    streamer, sent, clock = make()
    streamer.delta("")  # e.g. the first bytes of a multi-byte character
    clock.now += 0.001
    streamer.delta("")
    assert sent == []
    clock.now += 0.001
    streamer.delta("\u00e9t\u00e9")
    assert [c["delta"] for c in sent] == ["\u00e9t\u00e9"] and sent[0]["index"] == 0


def test_an_interval_of_zero_sends_every_delta_as_its_own_chunk() -> None:
    streamer, sent, _ = make(interval_s=0.0)
    for piece in ("He", "l", "l", "o"):
        streamer.delta(piece)  # the clock does not move: same instant, still one chunk each
    streamer.done()
    assert [(c["index"], c["delta"], c["done"]) for c in sent] == [
        (0, "He", False), (1, "l", False), (2, "l", False), (3, "o", False), (4, "", True)]


def test_done_flushes_the_rest_then_sends_an_empty_final_chunk() -> None:
    streamer, sent, clock = make()
    streamer.delta("a")
    streamer.delta("b")
    streamer.done()
    assert [(c["index"], c["delta"], c["done"]) for c in sent] == [(0, "a", False), (1, "b", False), (2, "", True)]


def test_chunks_are_valid_stream_chunks_even_with_quotes_and_unicode() -> None:
    streamer, sent, _ = make()
    streamer.delta('say "hé"\n\u2603')
    streamer.done()
    chunk = StreamChunk.model_validate(sent[0])
    assert chunk.delta == 'say "hé"\n\u2603' and chunk.command_id == "c1" and chunk.v == 1
