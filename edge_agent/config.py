"""Agent configuration: one TOML file, every key overridable by an `EDGE_AGENT_` variable.

Environment names: top-level keys as `EDGE_AGENT_DEVICE_ID`, section keys with a double
underscore, e.g. `EDGE_AGENT_MQTT__HOST`, `EDGE_AGENT_MODEL__N_GPU_LAYERS`; list values as JSON
(`EDGE_AGENT_MQTT__GROUPS='["lab","floor-2"]'`). The environment wins over the file. Loading does
no I/O beyond reading the file; unknown keys are errors. The loading rules and the `[mqtt]` broker
keys shared with the bridge live in `autoglm_wire.settings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, Field, model_validator

from autoglm_wire.settings import (
    BrokerConfig,
    ReconnectConfig,
    Section,
    TomlSettings,
    load_toml_settings,
    resolve_relative,
)
from autoglm_wire.signing import is_raw_key
from autoglm_wire.topics import check_device_id, check_group
from edge_agent.engine.profile import apply_onnx_profile, apply_profile
from edge_agent.engine.settings import ModelConfig, OnnxModelConfig
from edge_agent.engine.templates import PromptTemplate

ENV_PREFIX = "EDGE_AGENT_"


class MqttConfig(BrokerConfig):
    """The broker keys plus the agent's own: groups, last-will delay, payload cap, in-flight window,
    stream chunk interval."""

    groups: list[Annotated[str, AfterValidator(check_group)]] = Field(default_factory=list)
    will_delay_s: int = Field(default=5, ge=0)
    max_payload_bytes: int = Field(default=256 * 1024, ge=1024)
    inflight_window: int = Field(default=20, ge=1, le=1000)
    stream_interval_ms: float = Field(default=50.0, ge=0.0, le=10_000.0)

    @model_validator(mode="after")
    def _will_within_session(self) -> MqttConfig:
        if self.will_delay_s > self.session_expiry_s:
            raise ValueError("will_delay_s must not exceed session_expiry_s (the broker sends the will at expiry)")
        return self


class StoreConfig(Section):
    path: Path = Path("edge-agent.db")
    synchronous: Literal["full", "normal"] = "full"
    max_outbox_rows: int = Field(default=100_000, ge=10)
    max_outbox_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    ledger_days: float = Field(default=7.0, ge=0)


class ModelsConfig(Section):
    """`[models]`: the folder of downloaded GGUFs (`edge-agent model pull`, edge_agent/model_pull.py)."""

    dir: Path | None = Field(default=None, description="default: a `models` folder beside the store file")
    ca_file: Path | None = Field(default=None, description="CA for HTTPS downloads; default: the system's CAs")
    download_attempts: int = Field(default=8, ge=1, le=1000)
    slots: int = Field(default=2, ge=1, le=100, description="models kept: the active one and the previous ones")


class OnnxConfig(Section):
    models: dict[str, OnnxModelConfig] = Field(default_factory=dict)


class SecurityConfig(Section):
    """`[security]`: signed commands (autoglm_wire.signing) and where replies may go (docs/security.md)."""

    require_signed_commands: bool = False
    trusted_keys: dict[str, str] = Field(default_factory=dict, description="key_id -> base64 raw key or PEM path")
    max_clock_skew_s: float = Field(default=300.0, ge=0.0)
    replay_window_s: float = Field(default=86400.0, gt=0.0)
    response_topic_prefixes: list[str] = Field(default_factory=list)
    legacy_signatures_until: AwareDatetime | None = Field(
        default=None, description="until then, signatures over the pre-JCS canonical form are accepted too")

    @model_validator(mode="after")
    def _keys_when_required(self) -> SecurityConfig:
        if self.require_signed_commands and not self.trusted_keys:
            raise ValueError("require_signed_commands needs at least one entry in trusted_keys "
                             '(key_id = "base64 public key" or "path/to/key.pem")')
        return self

    def resolved_against(self, base: Path) -> SecurityConfig:
        """Key files (values that are not inline base64 keys) made absolute against `base`."""
        keys = {k: v if is_raw_key(v) else str(resolve_relative(Path(v), base)) for k, v in self.trusted_keys.items()}
        return self.model_copy(update={"trusted_keys": keys})


class LimitsConfig(Section):
    """`[limits]`: what one command may ask for; more is rejected with `invalid_command`."""

    max_prompt_chars: int = Field(default=65536, ge=1)
    max_tokens: int = Field(default=4096, ge=1)
    max_generation_s: float | None = Field(default=None, gt=0)


class HttpConfig(Section):
    """`[http]`: the local OpenAI-compatible API (edge_agent/local_api.py); off unless `enabled`."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8089, ge=1, le=65535)
    token_file: Path | None = None  # the bearer token's first line; a path or `credential:NAME`
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _token_when_enabled(self) -> HttpConfig:
        if self.enabled and self.token_file is None:
            raise ValueError("http.enabled needs http.token_file (a file holding the bearer token, or "
                             "credential:NAME); generate one with `openssl rand -hex 32`")
        return self


class AgentConfig(TomlSettings):
    """The whole agent configuration (see docs/architecture.md for every key)."""

    env_prefix = ENV_PREFIX
    service_user = "edge-agent"

    device_id: Annotated[str, AfterValidator(check_device_id)]
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    model: ModelConfig
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    templates: dict[str, PromptTemplate] = Field(default_factory=dict)
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    telemetry_interval_s: float = Field(default=60.0, ge=1.0)
    shutdown_timeout_s: float = Field(default=30.0, ge=0.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _ledger_outlives_the_replay_window(self) -> AgentConfig:
        """A signed command is accepted for up to `replay_window_s` + 2 x `max_clock_skew_s` after
        the first time; its id must still be in the ledger then, or a replay would run it again."""
        security, days = self.security, self.store.ledger_days
        window_s = security.replay_window_s + 2 * security.max_clock_skew_s
        if security.trusted_keys and days and days * 86400 < window_s:
            raise ValueError(f"store.ledger_days = {days:g} forgets commands before a signed command's replay "
                             f"window closes (security.replay_window_s + 2 x max_clock_skew_s = "
                             f"{window_s / 86400:.3g} days): raise ledger_days or lower replay_window_s")
        return self


def load_config(path: Path) -> AgentConfig:
    """Read a TOML file, apply `EDGE_AGENT_*` overrides, validate. Raises ConfigError."""
    config = load_toml_settings(
        AgentConfig, path, hint="see systemd/edge-agent.toml for an example",
        env_example=f"{ENV_PREFIX}MQTT__GROUPS='[\"lab\"]'",
    )
    return _resolve_relative_paths(config, path.parent)


def _resolve_onnx(model: OnnxModelConfig, base: Path) -> OnnxModelConfig:
    model = model.model_copy(update={"path": resolve_relative(model.path, base)})
    if model.profile is None:
        return model
    return apply_onnx_profile(model.model_copy(update={"profile": resolve_relative(model.profile, base)}))


def _resolve_relative_paths(config: AgentConfig, base: Path) -> AgentConfig:
    """Paths in the file are relative to the file's folder, so a config can travel with its data."""
    store = config.store.model_copy(update={"path": resolve_relative(config.store.path, base)})
    model = config.model.model_copy(update={"path": resolve_relative(config.model.path, base)})
    if model.profile is not None:
        model = apply_profile(model.model_copy(update={"profile": resolve_relative(model.profile, base)}))
    onnx = OnnxConfig(models={name: _resolve_onnx(m, base) for name, m in config.onnx.models.items()})
    http = config.http
    if http.token_file is not None:
        http = http.model_copy(update={"token_file": resolve_relative(http.token_file, base)})
    models = config.models.model_copy(update={
        "dir": resolve_relative(config.models.dir, base) if config.models.dir else store.path.parent / "models",
        "ca_file": resolve_relative(config.models.ca_file, base) if config.models.ca_file else None})
    return config.model_copy(update={"store": store, "model": model, "onnx": onnx, "http": http, "models": models,
                                     "mqtt": config.mqtt.resolved_against(base),
                                     "security": config.security.resolved_against(base)})
