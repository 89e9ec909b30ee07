"""Bridge configuration: one TOML file, every key overridable by a `CLOUD_BRIDGE_` variable.

Environment names: top-level keys as `CLOUD_BRIDGE_LOG_LEVEL`, section keys with a double
underscore, e.g. `CLOUD_BRIDGE_MQTT__HOST`, `CLOUD_BRIDGE_DISPATCH__QOS`. The environment wins over
the file. Loading does no I/O beyond reading the file; unknown keys are errors. Relative paths in
the file are resolved against the file's folder, so a config can travel with its data.

Example (every key optional)::

    [mqtt]
    host = "127.0.0.1"
    port = 1883
    topic_prefix = "autoglm"
    client_id = "cloud-bridge"

    [store]
    path = "cloud-bridge.db"

    [dispatch]
    resend_interval_s = 5
    default_expiry_s = 3600
    qos = 1
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cloud_bridge.errors import ConfigError
from edge_agent.topics import check_prefix

ENV_PREFIX = "CLOUD_BRIDGE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: Annotated[str, AfterValidator(check_prefix)] = "autoglm"
    username: str | None = None
    password_file: Path | None = None
    client_id: str = Field(default="cloud-bridge", min_length=1, max_length=128)
    keepalive: int = Field(default=30, ge=5, le=3600)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=60)


class ReconnectConfig(_Section):
    initial_s: float = Field(default=1.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1.0)
    max_s: float = Field(default=30.0, gt=0)


class StoreConfig(_Section):
    path: Path = Path("cloud-bridge.db")


class DispatchConfig(_Section):
    resend_interval_s: float = Field(default=5.0, gt=0)
    default_expiry_s: float = Field(default=3600.0, gt=0)
    qos: int = Field(default=1, ge=1, le=2, description="QoS of command publishes: 1 or 2")


class BridgeConfig(BaseSettings):
    """The whole bridge configuration."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
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


def load_config(path: Path) -> BridgeConfig:
    """Read a TOML file, apply `CLOUD_BRIDGE_*` overrides, validate. Raises ConfigError."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config file {path} does not exist; create it (every key is optional; an example is in the docstring of "
            "cloud_bridge/config.py)"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    try:
        config = BridgeConfig(**data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"config file {path} is invalid:\n" + "\n".join(lines)) from exc
    return _resolve_relative_paths(config, path.parent)


def _resolve_relative_paths(config: BridgeConfig, base: Path) -> BridgeConfig:
    """Make `store.path` and `mqtt.password_file` absolute, relative to the config file's folder."""

    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    store = config.store.model_copy(update={"path": resolve(config.store.path)})
    mqtt = config.mqtt
    if mqtt.password_file is not None:
        mqtt = mqtt.model_copy(update={"password_file": resolve(mqtt.password_file)})
    return config.model_copy(update={"store": store, "mqtt": mqtt})


def read_password(config: MqttConfig) -> str | None:
    """The broker password from `password_file` (its first line), or None when no file is set."""
    if config.password_file is None:
        return None
    try:
        text = config.password_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read mqtt.password_file {config.password_file}: {exc.strerror}") from exc
    lines = text.splitlines()
    return lines[0] if lines else ""
