"""Weight repacking (llama.cpp's CPU extra buffer types) from `model.repack` and the build's features."""

from __future__ import annotations

import pytest

from edge_agent.engine.repack import choose_repack
from edge_agent.engine.settings import ModelConfig

AMX_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1 | "
AVX2_BUILD = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | REPACK = 1 | "


def test_auto_keeps_llama_cpps_repacking_on_a_build_without_amx() -> None:
    choice = choose_repack("auto", AVX2_BUILD)
    assert choice.enabled and "default" in choice.reason


def test_auto_turns_repacking_off_on_a_build_with_the_amx_kernels_and_says_how_to_force_it() -> None:
    choice = choose_repack("auto", AMX_BUILD)
    assert not choice.enabled
    assert "#20824" in choice.reason and "model.repack = true" in choice.reason


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_setting_is_honoured_whatever_the_build(setting: bool) -> None:
    assert choose_repack(setting, AMX_BUILD).enabled is setting
    assert choose_repack(setting, AVX2_BUILD).enabled is setting


@pytest.mark.parametrize(("given", "parsed"), [("auto", "auto"), (True, True), (False, False), ("false", False)])
def test_the_config_key_takes_auto_or_a_bool(tmp_path, given: object, parsed: object) -> None:
    assert ModelConfig(path=tmp_path / "m.gguf", repack=given).repack == parsed  # type: ignore[arg-type]


def test_the_config_key_rejects_anything_else(tmp_path) -> None:
    with pytest.raises(ValueError, match="repack"):
        ModelConfig(path=tmp_path / "m.gguf", repack="sometimes")  # type: ignore[arg-type]
