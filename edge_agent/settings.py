"""Config plumbing shared by the agent (`edge_agent.config`) and the bridge (`cloud_bridge.config`).

A config is one TOML file whose every key an environment variable can override (the environment
wins; nested keys use a double underscore, list and table values are JSON). Unknown keys are
errors. Loading does no I/O beyond reading the file; `read_password` reads the password file when
the link is built. Every failure is a `ConfigError` whose message names the file or key and why.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from edge_agent.errors import ConfigError
from edge_agent.topics import check_prefix


class Section(BaseModel):
    """A `[table]` of the config file: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class BrokerConfig(Section):
    """The `[mqtt]` keys every MQTT client of the project has; each program subclasses it."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: Annotated[str, AfterValidator(check_prefix)] = "autoglm"
    username: str | None = None
    password_file: Path | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=60)

    def resolved_against(self, base: Path) -> Self:
        """A copy whose relative `password_file` is made absolute against `base`."""
        if self.password_file is None:
            return self
        return self.model_copy(update={"password_file": resolve_relative(self.password_file, base)})


class ReconnectConfig(Section):
    """`[reconnect]`: the backoff schedule between connection attempts (see edge_agent.backoff)."""

    initial_s: float = Field(default=1.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1.0)
    max_s: float = Field(default=30.0, gt=0)


class TomlSettings(BaseSettings):
    """Base of a whole config: subclasses set `env_prefix`; the environment wins over the file."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first, then the file's values (passed as init kwargs); no dotenv, no secrets dir."""
        return (env_settings, init_settings)


S = TypeVar("S", bound=TomlSettings)


def load_toml_settings(cls: type[S], path: Path, env_prefix: str, hint: str, env_example: str | None = None) -> S:
    """Read the TOML file at `path`, apply `<env_prefix>*` overrides, validate. Raises ConfigError.

    `hint` completes the message of a missing file (where to find an example); `env_example` is the
    JSON override shown when an environment variable cannot be parsed.
    """
    data = _read_toml(path, hint)
    try:
        return cls(**data)
    except SettingsError as exc:
        example = env_example or f"{env_prefix}MQTT='{{\"host\": \"broker.lan\"}}'"
        raise ConfigError(
            f"a {env_prefix}* environment variable is invalid: {exc}. List and table values must be JSON, "
            f"e.g. {example}"
        ) from exc
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"config file {path} is invalid:\n" + "\n".join(lines)) from exc


def _read_toml(path: Path, hint: str) -> dict[str, Any]:
    """The parsed file; every way it can be unreadable is a ConfigError naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist; {hint}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {exc}") from exc


def resolve_relative(path: Path, base: Path) -> Path:
    """`path` if absolute, else `base / path` made absolute: a config travels with its data."""
    return path if path.is_absolute() else (base / path).resolve()


def read_password(broker_config: BrokerConfig) -> str | None:
    """The broker password: the first line of `password_file`, or None when no file is set."""
    if broker_config.password_file is None:
        return None
    try:
        text = broker_config.password_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read mqtt.password_file {broker_config.password_file}: {exc.strerror}") from exc
    lines = text.splitlines()
    return lines[0] if lines else ""
