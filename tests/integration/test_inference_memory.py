"""llama-cpp-python 0.3.36 builds a sampler chain per completion and never frees the previous one
(~1.75 MB of RSS per command with GLM-4's vocabulary); the engine frees it after every generation,
also one that ended in an error. On the real tiny GGUF."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoglm_wire.protocol import CompleteParams
from edge_agent.engine.llama import LlamaEngine
from edge_agent.engine.settings import ModelConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[LlamaEngine]:
    loaded = LlamaEngine(ModelConfig(path=tiny_model, n_ctx=512, n_threads=1))
    yield loaded
    loaded.close()


def complete(engine: LlamaEngine, on_delta: object = None) -> str:
    params = CompleteParams(prompt="Pump 3 reads", max_tokens=8, seed=4, temperature=0.7)
    return engine.complete(params, on_delta, threading.Event()).text  # type: ignore[arg-type]


def test_no_sampler_outlives_a_generation_and_outputs_stay_reproducible(engine: LlamaEngine) -> None:
    first = complete(engine)
    assert engine._llm._sampler is None
    assert complete(engine) == first, "same seed, same text, with the sampler freed in between"
    assert engine._llm._sampler is None


def test_the_sampler_is_freed_when_the_generation_fails(engine: LlamaEngine) -> None:
    def broken(delta: str) -> None:
        raise RuntimeError("stream consumer failed")

    with pytest.raises(Exception, match="stream consumer failed"):
        complete(engine, broken)
    assert engine._llm._sampler is None
    assert complete(engine), "the engine still generates afterwards"
