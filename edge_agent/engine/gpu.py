"""Choosing how many layers to offload to the GPU. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ALL_LAYERS = -1  # llama.cpp: offload every layer


@dataclass(frozen=True)
class GpuChoice:
    n_gpu_layers: int
    reason: str


def choose_gpu_layers(setting: Literal["auto"] | int, supports_offload: bool) -> GpuChoice:
    """`auto`: all layers when the llama.cpp build can offload, else CPU with the reason why.
    An explicit int is honoured as given (llama.cpp ignores it on a CPU-only build)."""
    if setting == "auto":
        if supports_offload:
            return GpuChoice(ALL_LAYERS, "auto: this llama.cpp build supports GPU offload; offloading all layers")
        return GpuChoice(
            0,
            "auto: this llama.cpp build has no GPU backend (llama_supports_gpu_offload() is false); "
            "running on CPU. Rebuild llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on (or Vulkan/Metal) to offload",
        )
    if setting != 0 and not supports_offload:
        return GpuChoice(0, f"n_gpu_layers={setting} requested but this llama.cpp build has no GPU backend; CPU only")
    return GpuChoice(setting, f"n_gpu_layers={setting} as configured")
