"""GPU offload from the build's support, the model's per-layer size and the free device memory."""

from __future__ import annotations

from edge_agent.engine.gpu import (
    ALL_LAYERS,
    MIB,
    FreeMemory,
    ModelFootprint,
    choose_gpu_layers,
    footprint_from_metadata,
)

# 40 layers of ~100 MiB each (4100 MiB over 41 slices), no KV cache
FOOTPRINT = ModelFootprint(n_layers=40, file_bytes=4100 * MIB)


def test_auto_offloads_all_layers_when_they_fit_with_the_margin() -> None:
    choice = choose_gpu_layers("auto", True, FOOTPRINT, FreeMemory(16_000 * MIB, "nvidia-smi"))
    assert choice.n_gpu_layers == ALL_LAYERS
    assert "all 40 layers fit" in choice.reason and "nvidia-smi" in choice.reason


def test_auto_offloads_only_the_layers_that_fit_in_the_free_memory() -> None:
    choice = choose_gpu_layers("auto", True, FOOTPRINT, FreeMemory(2_000 * MIB, "NVML"))
    # 2000 MiB * 0.9 - 384 MiB reserve = 1416 MiB -> 14 layers of 100 MiB
    assert choice.n_gpu_layers == 14
    assert "14 of 40 layers fit" in choice.reason and "the rest run on CPU" in choice.reason


def test_auto_keeps_everything_on_cpu_when_not_one_layer_fits() -> None:
    choice = choose_gpu_layers("auto", True, FOOTPRINT, FreeMemory(300 * MIB, "NVML"))
    assert choice.n_gpu_layers == 0
    assert "not one layer fits" in choice.reason


def test_auto_offloads_all_layers_when_the_free_memory_cannot_be_read() -> None:
    choice = choose_gpu_layers("auto", True, FOOTPRINT, None)
    assert choice.n_gpu_layers == ALL_LAYERS
    assert "unknown" in choice.reason


def test_an_explicit_count_ignores_the_free_memory() -> None:
    assert choose_gpu_layers(30, True, FOOTPRINT, FreeMemory(1 * MIB, "NVML")).n_gpu_layers == 30


def test_the_kv_cache_counts_towards_each_layer() -> None:
    meta = {"general.architecture": "glm4", "glm4.block_count": "40", "glm4.embedding_length": "4096",
            "glm4.attention.head_count": "32", "glm4.attention.head_count_kv": "2"}
    footprint = footprint_from_metadata(meta, file_bytes=4100 * MIB, n_ctx=8192)
    assert footprint is not None
    # K and V, f16, 8192 positions, 2 KV heads of 128 dims: 8 MiB per layer
    assert footprint.kv_bytes_per_layer == 8 * MIB
    assert footprint.bytes_per_layer == 108 * MIB


def test_metadata_without_the_block_count_gives_no_footprint() -> None:
    assert footprint_from_metadata({"general.architecture": "x"}, 1, 512) is None
