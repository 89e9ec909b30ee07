"""The prefix cache on the real tiny GGUF: a prefix restored from the cache gives exactly the text a
full prompt evaluation gives."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from autoglm_wire.protocol import ChatParams
from edge_agent.engine.llama import LlamaEngine
from edge_agent.engine.settings import ModelConfig

pytestmark = pytest.mark.integration


def ask(engine: LlamaEngine, system: str, question: str) -> str:
    params = ChatParams(messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                        max_tokens=12, seed=9, temperature=0.7)
    return engine.chat(params, None, threading.Event()).text


def test_a_prefix_loaded_from_the_cache_gives_the_same_text_as_evaluating_it(tiny_model: Path) -> None:
    north, south = "North gateway rules: " + "report every pump. " * 40, "South gateway rules: " + "watch valves. " * 40
    plain = LlamaEngine(ModelConfig(path=tiny_model, n_ctx=2048, n_threads=1))
    try:
        expected = ask(plain, north, "Pump 3?")
    finally:
        plain.close()
    cached = LlamaEngine(ModelConfig(path=tiny_model, n_ctx=2048, n_threads=1, prefix_cache_mb=64))
    try:
        ask(cached, north, "Valve 1?")
        ask(cached, south, "Pump 3?")  # the context now holds the other prefix
        assert ask(cached, north, "Pump 3?") == expected
        assert cached._prefixes is not None and cached._prefixes.hits == 1
    finally:
        cached.close()
