"""Config plumbing shared by the agent (`edge_agent.config`) and the bridge (`cloud_bridge.config`).

A config is one TOML file whose every key an environment variable can override (the environment
wins; nested keys use a double underscore, list and table values are JSON). Unknown keys are
errors. Loading does no I/O beyond reading the file; `read_password` reads the password file when
the link is built. Every failure is a `ConfigError` whose message names the file or key and why.

The environment overlay (`env_overlay`, pure): `<PREFIX><KEY>` sets a top-level key and
`<PREFIX><TABLE>__<KEY>` a key of a table, at any depth; names match in any case. Whether a value
is JSON or a plain string comes from the field's type: models, dicts, lists, tuples and sets
(also when optional) are JSON, everything else is the raw string, which pydantic converts as it
converts TOML values. Tables merge key by key into the file's, also a whole table given as JSON;
a deeper variable wins over a shallower one. A variable whose first segment is not a key of the
config is not config (test and bench knobs share the prefix) and is ignored; an unknown key below
it is an error like an unknown key in the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from autoglm_wire.errors import ConfigError
from autoglm_wire.protocol import validation_problems
from autoglm_wire.topics import check_prefix


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
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_insecure_skip_hostname_check: bool = False

    @model_validator(mode="after")
    def _tls_pairs(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both for mTLS, or neither")
        return self

    @property
    def uses_tls(self) -> bool:
        """TLS is on when `tls = true` (system CA store) or a `tls_ca_file` or client certificate is set."""
        return self.tls or self.tls_ca_file is not None or self.tls_cert_file is not None

    def resolved_against(self, base: Path) -> Self:
        """A copy whose relative file paths (password, TLS) are made absolute against `base`."""
        keys = ("password_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
        update = {k: resolve_relative(getattr(self, k), base) for k in keys if getattr(self, k) is not None}
        return self.model_copy(update=update) if update else self


class ReconnectConfig(Section):
    """`[reconnect]`: the backoff schedule between connection attempts (see autoglm_wire.backoff)."""

    initial_s: float = Field(default=1.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1.0)
    max_s: float = Field(default=30.0, gt=0)


class TomlSettings(BaseModel):
    """Base of a whole config: subclasses set `env_prefix`; the environment wins over the file."""

    model_config = ConfigDict(extra="forbid")
    env_prefix: ClassVar[str] = ""
    service_user: ClassVar[str] = ""  # the system user the program runs as (named in permission errors)


S = TypeVar("S", bound=TomlSettings)


def load_toml_settings(cls: type[S], path: Path, hint: str, env_example: str | None = None,
                       environ: Mapping[str, str] | None = None) -> S:
    """Read the TOML file at `path`, apply `<cls.env_prefix>*` overrides from `environ` (default: the
    process environment), validate. Raises ConfigError.

    `hint` completes the message of a missing file (where to find an example); `env_example` is the
    JSON override shown when an environment variable cannot be parsed.
    """
    data = _read_toml(path, hint, cls.service_user)
    example = env_example or f"{cls.env_prefix}MQTT='{{\"host\": \"broker.lan\"}}'"
    overlay = env_overlay(cls, cls.env_prefix, os.environ if environ is None else environ, example)
    try:
        return cls.model_validate(deep_merge(data, overlay))
    except ValidationError as exc:
        lines = [f"  {problem}" for problem in validation_problems(exc)]
        where = f" (with {cls.env_prefix}* environment overrides)" if overlay else ""
        raise ConfigError(f"config file {path} is invalid{where}:\n" + "\n".join(lines)) from exc


def env_overlay(model: type[BaseModel], prefix: str, environ: Mapping[str, str], example: str) -> dict[str, Any]:
    """The values `<prefix>*` variables of `environ` give `model`, as nested dicts to merge over the file.

    Raises ConfigError naming the variable when a value that must be JSON is not; `example` shows
    a good one.
    """
    overlay: dict[str, Any] = {}
    fields = {name.lower(): name for name in model.model_fields}
    prefix = prefix.lower()
    names = [name for name in environ if name.lower().startswith(prefix)]
    for name in sorted(names, key=lambda n: (n.count(NESTED), n)):  # deeper variables win
        first, *rest = name.lower().removeprefix(prefix).split(NESTED)
        if first not in fields:
            continue
        keys = [fields[first]]
        annotation: Any = model.model_fields[fields[first]].annotation
        for key in rest:
            child, annotation = _child(annotation, key)
            keys.append(child)
        value = _decode(name, environ[name], annotation, example)
        overlay = deep_merge(overlay, _nest(keys, value))
    return overlay


NESTED = "__"


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `update`; where both hold a dict for a key, those merge the same way."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        merged[key] = deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    """`{k1: {k2: ... {kn: value}}}`."""
    for key in reversed(keys[1:]):
        value = {key: value}
    return {keys[0]: value}


def _child(annotation: Any, key: str) -> tuple[str, Any]:
    """The key as the config spells it and its annotation, inside a value of type `annotation`: a
    model's field (matched in any case) or a dict's value type; `(key, None)` when there is none."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _child(get_args(annotation)[0], key)
    if origin in (Union, types.UnionType):
        found = [_child(arg, key) for arg in get_args(annotation)]
        return next((f for f in found if f[1] is not None), (key, None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            if name.lower() == key:
                return name, field.annotation
        return key, None
    kind = origin if origin is not None else annotation
    if isinstance(kind, type) and issubclass(kind, Mapping):
        args = get_args(annotation)
        return key, args[1] if len(args) == 2 else Any
    return key, None


def _wants_json(annotation: Any) -> bool:
    """True for a model, dataclass, dict, list, tuple or set, also inside Optional/Union/Annotated."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _wants_json(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return any(_wants_json(arg) for arg in get_args(annotation))
    if origin is Literal:
        return False
    kind = origin if origin is not None else annotation
    if not isinstance(kind, type) or issubclass(kind, (str, bytes)):
        return False
    return issubclass(kind, (BaseModel, Mapping, Sequence, Set)) or dataclasses.is_dataclass(kind)


def _decode(name: str, value: str, annotation: Any, example: str) -> Any:
    """The raw string, or the parsed JSON when the field is a list, table or model."""
    if not _wants_json(annotation):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name} is not valid JSON ({exc}). List and table values "
                          f"must be JSON, e.g. {example}") from exc


def _read_toml(path: Path, hint: str, service_user: str) -> dict[str, Any]:
    """The parsed file; every way it can be unreadable is a ConfigError naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist; {hint}") from exc
    except PermissionError as exc:
        raise ConfigError(f"config file {path}: permission denied for this user (uid {os.geteuid()}); run the "
                          f"command as the service user, e.g. `sudo -u {service_user} {service_user} ...`") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {exc}") from exc


def resolve_relative(path: Path, base: Path) -> Path:
    """`path` if absolute (or a `credential:NAME`), else `base / path` made absolute: a config travels
    with its data."""
    if path.is_absolute() or str(path).startswith(CREDENTIAL_PREFIX):
        return path
    return (base / path).resolve()


CREDENTIAL_PREFIX = "credential:"


def secret_path(path: Path, key: str) -> Path:
    """Where a secret file really is: `credential:NAME` is the file systemd's `LoadCredential=NAME:...`
    put in `$CREDENTIALS_DIRECTORY`; any other value is a path. `key` names the config key in errors."""
    text = str(path)
    if not text.startswith(CREDENTIAL_PREFIX):
        return path
    name = text[len(CREDENTIAL_PREFIX):]
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not name or "/" in name:
        raise ConfigError(f"{key} = {text!r}: write credential:NAME with the name given to LoadCredential=")
    if not directory:
        raise ConfigError(f"{key} = {text!r} needs systemd's LoadCredential={name}:/path/to/file in the unit "
                          "($CREDENTIALS_DIRECTORY is not set); outside systemd give a file path instead")
    return Path(directory) / name


def read_password(broker_config: BrokerConfig) -> str | None:
    """The broker password: the first line of `password_file` (a path or `credential:NAME`), or None."""
    if broker_config.password_file is None:
        return None
    path = secret_path(broker_config.password_file, "mqtt.password_file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read mqtt.password_file {path}: {exc.strerror}") from exc
    lines = text.splitlines()
    return lines[0] if lines else ""
