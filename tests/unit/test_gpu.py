"""How many layers go to the GPU (model.n_gpu_layers)."""

from __future__ import annotations

import pytest

from edge_agent.engine.gpu import ALL_LAYERS, choose_gpu_layers


def test_auto_offloads_every_layer_when_the_build_can() -> None:
    choice = choose_gpu_layers("auto", supports_offload=True)
    assert choice.n_gpu_layers == ALL_LAYERS == -1
    assert "auto" in choice.reason


def test_auto_runs_on_cpu_and_says_how_to_rebuild_when_the_build_cannot() -> None:
    choice = choose_gpu_layers("auto", supports_offload=False)
    assert choice.n_gpu_layers == 0
    assert "CPU" in choice.reason
    assert "GGML_CUDA" in choice.reason


@pytest.mark.parametrize("layers", [0, 1, 20, -1])
def test_an_explicit_layer_count_is_honoured_when_the_build_can_offload(layers: int) -> None:
    choice = choose_gpu_layers(layers, supports_offload=True)
    assert choice.n_gpu_layers == layers
    assert str(layers) in choice.reason


@pytest.mark.parametrize("layers", [1, 20, -1])
def test_an_explicit_layer_count_becomes_cpu_only_when_the_build_cannot_offload(layers: int) -> None:
    choice = choose_gpu_layers(layers, supports_offload=False)
    assert choice.n_gpu_layers == 0
    assert "no GPU backend" in choice.reason


def test_zero_layers_is_cpu_as_configured_on_any_build() -> None:
    assert choose_gpu_layers(0, supports_offload=False).n_gpu_layers == 0
    assert "as configured" in choose_gpu_layers(0, supports_offload=False).reason
