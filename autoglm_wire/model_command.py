"""The `model` command kind (issue #14, an additive v1 extension; docs/protocol.md "Model
deployment"): deploy a verified GGUF, roll back to the previous slot, or list the slots.

Pure: the pydantic models of the params, shared by the device (which validates what it receives)
and the bridge (which builds what it sends). No I/O.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MODEL_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"  # 1..64 chars, not starting with "."
SHA256_PATTERN = r"^[0-9a-f]{64}$"
URL_PATTERN = r"^https?://\S+$"

ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
RolloutId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CanaryMessage(_Strict):
    role: Literal["system", "user", "assistant", "observation"]
    content: str


class CanaryPrompt(_Strict):
    """One golden prompt: it must finish within `timeout_s`, produce tokens, and match what is given."""

    prompt: str | None = Field(default=None, min_length=1)
    messages: list[CanaryMessage] | None = Field(default=None, min_length=1)
    max_tokens: int = Field(default=16, ge=1, le=512)
    timeout_s: float = Field(default=60.0, gt=0, le=600)
    regex: str | None = None
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> CanaryPrompt:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a canary prompt needs exactly one of `prompt` and `messages`")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from exc
        return self


class Canary(_Strict):
    prompts: list[CanaryPrompt] = Field(default_factory=list, max_length=16)
    min_speed_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    max_rss_mb: int | None = Field(default=None, ge=1, le=2**24)  # up to 16 TiB


class ModelParams(_Strict):
    """`model` params: `action` deploy (name, url, sha256, size), rollback, or list."""

    action: Literal["deploy", "rollback", "list"]
    name: ModelName | None = None
    url: Annotated[str, StringConstraints(pattern=URL_PATTERN, max_length=4096)] | None = None
    sha256: Sha256 | None = None
    size: int | None = Field(default=None, ge=1, le=2**63 - 1)
    canary: Canary | None = None
    rollout: RolloutId | None = None

    @model_validator(mode="after")
    def _fields_of_the_action(self) -> ModelParams:
        download = {"name": self.name, "url": self.url, "sha256": self.sha256, "size": self.size}
        if self.action == "deploy":
            missing = [k for k, v in download.items() if v is None]
            if missing:
                raise ValueError(f"deploy needs {', '.join(missing)}")
            return self
        given = [k for k, v in download.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} belong to deploy, not {self.action}")
        if self.action == "list" and (self.canary is not None or self.rollout is not None):
            raise ValueError("list takes no other params")
        return self
