"""Agent configuration: one TOML file, every key overridable by an `EDGE_AGENT_` variable.

Environment names: top-level keys as `EDGE_AGENT_DEVICE_ID`, section keys with a double
underscore, e.g. `EDGE_AGENT_MQTT__HOST`, `EDGE_AGENT_MODEL__N_GPU_LAYERS`; list values as JSON
(`EDGE_AGENT_MQTT__GROUPS='["lab","floor-2"]'`). The environment wins over the file. Loading does
no I/O beyond reading the file; unknown keys are errors.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from edge_agent.errors import ConfigError
from edge_agent.topics import check_device_id, check_group, check_prefix

ENV_PREFIX = "EDGE_AGENT_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: Annotated[str, AfterValidator(check_prefix)] = "autoglm"
    groups: list[Annotated[str, AfterValidator(check_group)]] = Field(default_factory=list)
    username: str | None = None
    password_file: Path | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=60)
    will_delay_s: int = Field(default=5, ge=0)
    max_payload_bytes: int = Field(default=256 * 1024, ge=1024)
    inflight_window: int = Field(default=20, ge=1, le=1000)

    @model_validator(mode="after")
    def _will_within_session(self) -> MqttConfig:
        if self.will_delay_s > self.session_expiry_s:
            raise ValueError("will_delay_s must not exceed session_expiry_s (the broker sends the will at expiry)")
        return self


class ReconnectConfig(_Section):
    initial_s: float = Field(default=1.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1.0)
    max_s: float = Field(default=30.0, gt=0)


class StoreConfig(_Section):
    path: Path = Path("edge-agent.db")
    synchronous: Literal["full", "normal"] = "full"


class ModelConfig(_Section):
    path: Path
    n_gpu_layers: Literal["auto"] | int = "auto"
    n_ctx: int = Field(default=4096, ge=64)
    n_threads: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)
    name: str | None = None


class AgentConfig(BaseSettings):
    """The whole agent configuration (see docs/architecture.md for every key)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    device_id: Annotated[str, AfterValidator(check_device_id)]
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    model: ModelConfig
    telemetry_interval_s: float = Field(default=60.0, ge=1.0)
    shutdown_timeout_s: float = Field(default=30.0, ge=0.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)


def load_config(path: Path) -> AgentConfig:
    """Read a TOML file, apply `EDGE_AGENT_*` overrides, validate. Raises ConfigError."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist; see systemd/edge-agent.toml for an example") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {exc}") from exc
    try:
        config = AgentConfig(**data)
    except SettingsError as exc:
        raise ConfigError(
            f"an {ENV_PREFIX}* environment variable is invalid: {exc}. List and table values must be JSON, "
            f"e.g. {ENV_PREFIX}MQTT__GROUPS='[\"lab\"]'"
        ) from exc
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"config file {path} is invalid:\n" + "\n".join(lines)) from exc
    return _resolve_relative_paths(config, path.parent)


def _resolve_relative_paths(config: AgentConfig, base: Path) -> AgentConfig:
    """Paths in the file are relative to the file's folder, so a config can travel with its data."""
    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    store = config.store.model_copy(update={"path": resolve(config.store.path)})
    model = config.model.model_copy(update={"path": resolve(config.model.path)})
    mqtt = config.mqtt
    if mqtt.password_file is not None:
        mqtt = mqtt.model_copy(update={"password_file": resolve(mqtt.password_file)})
    return config.model_copy(update={"store": store, "model": model, "mqtt": mqtt})
