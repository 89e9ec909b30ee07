"""`load_llama` sets llama.cpp's `use_extra_bufts` (weight repacking), which `llama_cpp.Llama` has no
argument for; the engine's `auto` choice generates on this machine's build (on a build with the AMX
kernels, repacking on segfaults on the tiny GGUF: llama.cpp issue #20824). On the real tiny GGUF."""

from __future__ import annotations

import threading
from pathlib import Path

import llama_cpp
import pytest

from autoglm_wire.protocol import CompleteParams
from edge_agent.engine.llama import LlamaEngine, load_llama
from edge_agent.engine.settings import ModelConfig

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("repack", [True, False])
def test_load_llama_sets_the_repacking_switch_and_leaves_llama_cpps_defaults_alone(
        tiny_model: Path, repack: bool) -> None:
    llm = load_llama({"model_path": str(tiny_model), "n_ctx": 256, "n_threads": 1, "verbose": False}, repack)
    try:
        assert llm.model_params.use_extra_bufts is repack
    finally:
        llm.close()
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True, "the patch is undone"


def test_the_engine_generates_with_the_auto_choice_on_this_build(tiny_model: Path) -> None:
    engine = LlamaEngine(ModelConfig(path=tiny_model, n_ctx=512, n_threads=1))
    try:
        amx = "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()
        assert engine._llm.model_params.use_extra_bufts is not amx
        text = engine.complete(CompleteParams(prompt="Pump 3 reads", max_tokens=8, seed=4), None, threading.Event())
        assert text.completion_tokens == 8
    finally:
        engine.close()
