"""Bridge configuration: one TOML file, every key overridable by a `CLOUD_BRIDGE_` variable.

Environment names: top-level keys as `CLOUD_BRIDGE_LOG_LEVEL`, section keys with a double
underscore, e.g. `CLOUD_BRIDGE_MQTT__HOST`, `CLOUD_BRIDGE_DISPATCH__QOS`. The environment wins over
the file. Loading does no I/O beyond reading the file; unknown keys are errors. Relative paths in
the file are resolved against the file's folder, so a config can travel with its data. The loading
rules and the `[mqtt]` broker keys shared with the agent live in `edge_agent.settings`.

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

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from edge_agent import settings

ENV_PREFIX = "CLOUD_BRIDGE_"


class MqttConfig(settings.BrokerConfig):
    """The broker keys plus the bridge's client id (one bridge per id: its persistent session)."""

    client_id: str = Field(default="cloud-bridge", min_length=1, max_length=128)


class StoreConfig(settings.Section):
    path: Path = Path("cloud-bridge.db")


class DispatchConfig(settings.Section):
    resend_interval_s: float = Field(default=5.0, gt=0)
    default_expiry_s: float = Field(default=3600.0, gt=0)
    qos: int = Field(default=1, ge=1, le=2, description="QoS of command publishes: 1 or 2")


class BridgeConfig(settings.TomlSettings):
    """The whole bridge configuration."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    reconnect: settings.ReconnectConfig = Field(default_factory=settings.ReconnectConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


def load_config(path: Path) -> BridgeConfig:
    """Read a TOML file, apply `CLOUD_BRIDGE_*` overrides, validate. Raises ConfigError."""
    hint = "create it (every key is optional; an example is in the docstring of cloud_bridge/config.py)"
    config = settings.load_toml_settings(BridgeConfig, path, ENV_PREFIX, hint=hint)
    return _resolve_relative_paths(config, path.parent)


def _resolve_relative_paths(config: BridgeConfig, base: Path) -> BridgeConfig:
    """Make `store.path` and `mqtt.password_file` absolute, relative to the config file's folder."""
    store = config.store.model_copy(update={"path": settings.resolve_relative(config.store.path, base)})
    return config.model_copy(update={"store": store, "mqtt": config.mqtt.resolved_against(base)})
