"""The engine's own settings: the `[model]` section (llama.cpp) and one `[onnx.models.NAME]` section
(ONNX Runtime). The agent's config (edge_agent.config) embeds them; the engine, the profiles and the
tuner read them without knowing the rest of the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from autoglm_wire.settings import Section

KvCacheType = Literal["f32", "f16", "q8_0", "q4_0"]
OnnxOptimization = Literal["disabled", "basic", "extended", "all"]


class ModelConfig(Section):
    path: Path
    n_gpu_layers: Literal["auto"] | int = "auto"
    n_ctx: int = Field(default=4096, ge=64)
    n_threads: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)
    n_ubatch: int | None = Field(default=None, ge=1)
    flash_attn: bool = False
    repack: Literal["auto"] | bool = "auto"
    type_k: KvCacheType | None = None
    type_v: KvCacheType | None = None
    prefix_cache_mb: int = Field(default=0, ge=0)
    # Commands decoded together in one llama.cpp context (engine/batch.py). 1: one at a time, today's
    # path and memory. N > 1 costs N times the KV cache of `n_ctx` (each sequence gets its own window).
    # "auto": N from the available memory and the KV size per sequence (engine/parallel.py), resolved
    # before the model loads (edge_agent.engine.llama.resolve_parallel).
    parallel: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = 1
    stall_timeout_s: float = Field(default=120.0, gt=0.0)
    profile: Path | None = None
    name: str | None = None


class OnnxModelConfig(Section):
    path: Path
    providers: list[str] | None = None
    intra_op_threads: int | None = Field(default=None, ge=1)
    graph_optimization: OnnxOptimization = "all"
    parallel_execution: bool = False
    profile: Path | None = None
