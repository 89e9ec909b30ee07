"""The device policy that `config` commands change: sampling defaults and the telemetry period.

Pure: the policy is a frozen pydantic model; `merge` applies a partial `config` command to it and
`apply_defaults` fills the sampling fields a command left out. Every policy `initial` and `merge`
return is clamped by `[limits]`, so a stored policy never outlives a lowered limit. The store persists it (so it
survives restarts) and the agent wires the `config` handler.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from autoglm_wire.protocol import ConfigParams, Sampling

SAMPLING_DEFAULTS = ("max_tokens", "temperature", "top_p")
S = TypeVar("S", bound=Sampling)


class Policy(BaseModel):
    """The policy in force. Defaults are the protocol's sampling defaults and the config file's
    telemetry interval."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    telemetry_interval_s: float = Field(default=60.0, ge=1.0, le=86400.0)


def initial(stored: dict[str, Any], telemetry_interval_s: float, max_tokens_cap: int) -> Policy:
    """The policy at start: what `config` commands stored, over the defaults of this config file,
    clamped by `[limits]` (a limit lowered since a `config` stored more wins)."""
    return clamped(Policy(**{"telemetry_interval_s": telemetry_interval_s, **stored}), max_tokens_cap)


def merge(policy: Policy, change: ConfigParams, max_tokens_cap: int) -> Policy:
    """`policy` with every field the command set replaced; fields left out keep their value;
    clamped by `[limits]`."""
    return clamped(policy.model_copy(update=change.model_dump(exclude_none=True)), max_tokens_cap)


def clamped(policy: Policy, max_tokens_cap: int) -> Policy:
    """`policy` with its default `max_tokens` no higher than `limits.max_tokens`."""
    if policy.max_tokens <= max_tokens_cap:
        return policy
    return policy.model_copy(update={"max_tokens": max_tokens_cap})


def apply_defaults(params: S, policy: Policy) -> S:
    """Sampling fields the command did not set take the policy's value."""
    missing = {name: getattr(policy, name) for name in SAMPLING_DEFAULTS if name not in params.model_fields_set}
    return params.model_copy(update=missing) if missing else params
