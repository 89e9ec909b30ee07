"""Choosing how many layers to offload to the GPU.

`choose_gpu_layers` is pure: it takes what the build supports, the model's footprint and the free
device memory (probed elsewhere) and returns the layer count with a reason an operator can act
on. `probe_free_device_memory` is the only I/O here (NVML, then `nvidia-smi`, then Jetson's
unified memory); it returns None when no driver answers.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ALL_LAYERS = -1  # llama.cpp: offload every layer
MIB = 1024 * 1024
SAFETY_FRACTION = 0.10  # keep this share of the free memory unused
RESERVE_BYTES = 384 * MIB  # compute buffers, CUDA context, the output layer's scratch


@dataclass(frozen=True)
class GpuChoice:
    n_gpu_layers: int
    reason: str


@dataclass(frozen=True)
class ModelFootprint:
    """What one transformer block costs on the device: its weights plus its share of the KV cache."""

    n_layers: int
    file_bytes: int
    kv_bytes_per_layer: int = 0

    @property
    def bytes_per_layer(self) -> int:
        # Weights: the file spread over the blocks plus one for embeddings/output (close enough for GLM).
        return self.file_bytes // (self.n_layers + 1) + self.kv_bytes_per_layer


@dataclass(frozen=True)
class FreeMemory:
    bytes: int
    source: str


CPU_REASON = ("auto: this llama.cpp build has no GPU backend (llama_supports_gpu_offload() is false); "
              "running on CPU. Rebuild llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on (or Vulkan/Metal) to offload")


def choose_gpu_layers(setting: Literal["auto"] | int, supports_offload: bool,
                      footprint: ModelFootprint | None = None, free: FreeMemory | None = None) -> GpuChoice:
    """`auto`: as many layers as fit in the free device memory (minus a safety margin), all of them
    when the free memory cannot be read, none on a CPU build. An explicit int is honoured."""
    if setting != "auto":
        if setting != 0 and not supports_offload:
            return GpuChoice(0, f"n_gpu_layers={setting} requested but this llama.cpp build has no GPU backend; "
                                "CPU only")
        return GpuChoice(setting, f"n_gpu_layers={setting} as configured")
    if not supports_offload:
        return GpuChoice(0, CPU_REASON)
    if footprint is None or free is None:
        return GpuChoice(ALL_LAYERS, "auto: this llama.cpp build supports GPU offload and free device memory is "
                                     "unknown; offloading all layers (set model.n_gpu_layers to limit)")
    return _fit_layers(footprint, free)


def _fit_layers(footprint: ModelFootprint, free: FreeMemory) -> GpuChoice:
    budget = int(free.bytes * (1 - SAFETY_FRACTION)) - RESERVE_BYTES
    per_layer = max(1, footprint.bytes_per_layer)
    fits = max(0, budget // per_layer)
    facts = (f"{free.bytes // MIB} MiB free ({free.source}), {per_layer // MIB} MiB per layer, "
             f"{int(SAFETY_FRACTION * 100)}% + {RESERVE_BYTES // MIB} MiB kept free")
    if fits >= footprint.n_layers + 1:
        return GpuChoice(ALL_LAYERS, f"auto: all {footprint.n_layers} layers fit: {facts}")
    if fits == 0:
        return GpuChoice(0, f"auto: not one layer fits: {facts}; running on CPU")
    layers = min(fits, footprint.n_layers)
    return GpuChoice(layers, f"auto: {layers} of {footprint.n_layers} layers fit: {facts}; the rest run on CPU")


def footprint_from_metadata(meta: dict[str, str], file_bytes: int, n_ctx: int) -> ModelFootprint | None:
    """The footprint from GGUF metadata (block count, KV heads and widths); None if they are missing."""
    arch = meta.get("general.architecture", "")
    try:
        n_layers = int(meta[f"{arch}.block_count"])
        n_embd = int(meta[f"{arch}.embedding_length"])
        n_head = int(meta[f"{arch}.attention.head_count"])
        n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    except (KeyError, ValueError):
        return None
    head_dim = int(meta.get(f"{arch}.attention.key_length", n_embd // max(1, n_head)))
    kv_per_layer = 2 * n_ctx * n_head_kv * head_dim * 2  # K and V, f16
    return ModelFootprint(n_layers=n_layers, file_bytes=file_bytes, kv_bytes_per_layer=kv_per_layer)


# --- I/O: reading the free device memory -----------------------------------------------------------


def probe_free_device_memory() -> FreeMemory | None:
    """Free memory of the GPU(s): NVML, else `nvidia-smi`, else Jetson's MemAvailable; None if unknown."""
    return _probe_nvml() or _probe_nvidia_smi() or _probe_jetson()


def _probe_nvml() -> FreeMemory | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            free = sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free for i in range(count))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # not installed, no driver, no device: all mean "unknown"
        return None
    return FreeMemory(int(free), "NVML") if count else None


def _probe_nvidia_smi() -> FreeMemory | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        mib = sum(int(line) for line in out.split() if line.strip().isdigit())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return FreeMemory(mib * MIB, "nvidia-smi") if mib else None


def _probe_jetson() -> FreeMemory | None:
    """Jetson shares RAM with its GPU and has no nvidia-smi: MemAvailable is what the GPU can get."""
    if not Path("/etc/nv_tegra_release").exists():
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return FreeMemory(int(line.split()[1]) * 1024, "Jetson MemAvailable")
    except (OSError, ValueError):
        return None
    return None
