"""Tuned profiles: the `[model]` keys `edge-agent tune` found best, in a TOML file the agent loads
through `[model] profile = "FILE"`. Keys set in the agent's own `[model]` section (or its
environment) win over the profile; the profile fills in the rest.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoglm_wire.errors import ConfigError
from edge_agent.engine.settings import KvCacheType, ModelConfig, OnnxModelConfig, OnnxOptimization


class TunedSettings(BaseModel):
    """The llama.cpp settings a profile may set."""

    model_config = ConfigDict(extra="forbid")

    n_threads: int | None = Field(default=None, ge=1)
    n_batch: int | None = Field(default=None, ge=1)
    n_ubatch: int | None = Field(default=None, ge=1)
    flash_attn: bool | None = None
    type_k: KvCacheType | None = None
    type_v: KvCacheType | None = None
    n_gpu_layers: int | None = Field(default=None, ge=-1)


class TunedOnnxSettings(BaseModel):
    """The ONNX Runtime session options a profile may set."""

    model_config = ConfigDict(extra="forbid")

    intra_op_threads: int | None = Field(default=None, ge=1)
    graph_optimization: OnnxOptimization | None = None
    parallel_execution: bool | None = None


class Profile(BaseModel):
    """A profile file: `[model]` (GGUF) or `[onnx]` settings plus `[tuned]`, a free-form record of
    how they were found."""

    model_config = ConfigDict(extra="forbid")

    model: TunedSettings | None = None
    onnx: TunedOnnxSettings | None = None
    tuned: dict[str, Any] = Field(default_factory=dict)


def read_profile(path: Path) -> Profile:
    try:
        return Profile.model_validate(tomllib.loads(path.read_text()))
    except OSError as exc:
        raise ConfigError(f"cannot read model.profile {path}: {exc.strerror}; run `edge-agent tune` to make one "
                          "or remove the key") from exc
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"model.profile {path} is not a valid profile: {exc}") from exc


def apply_profile(model: ModelConfig) -> ModelConfig:
    """`model` with the profile's `[model]` settings for every key the config did not set itself."""
    assert model.profile is not None
    return _merge(model, read_profile(model.profile).model, "[model]", model.profile)


def apply_onnx_profile(model: OnnxModelConfig) -> OnnxModelConfig:
    """An `[onnx.models.NAME]` section with the profile's `[onnx]` settings under its own keys."""
    assert model.profile is not None
    return _merge(model, read_profile(model.profile).onnx, "[onnx]", model.profile)


def _merge(section: Any, tuned: BaseModel | None, table: str, path: Path) -> Any:
    if tuned is None:
        raise ConfigError(f"profile {path} has no {table} table: it was tuned for another kind of model")
    values = tuned.model_dump(exclude_none=True)
    return section.model_copy(update={k: v for k, v in values.items() if k not in section.model_fields_set})
