"""Opening what a config names before anything heavy starts, as the service itself will open it.

`edge-agent run`/`check-config` and `cloud-bridge serve`/`check-config` call these before they
load a model or open a registry: a file the service user cannot read is a ConfigError naming the
config key, the file and what to do, at once, instead of after minutes of loading (and, under
systemd, `RestartPreventExitStatus=` stops the unit instead of restarting it every 2 s).

Each check returns one line for the report `check-config` prints; secrets are never in it.
"""

from __future__ import annotations

import os
from pathlib import Path

from autoglm_wire.errors import ConfigError
from autoglm_wire.mqtt_session import TlsOptions
from autoglm_wire.settings import BrokerConfig, read_password, secret_path


def unreadable(key: str, path: Path, exc: OSError) -> ConfigError:
    """The error for a file `key` names that cannot be opened, with what to do about it."""
    if isinstance(exc, PermissionError):
        hint = (f"this user (uid {os.geteuid()}) may not read it: give the service's group read access "
                "(root:<service group>, mode 0640, its folder 0750) or hand it over with systemd's "
                "LoadCredential= and write credential:NAME")
    elif isinstance(exc, FileNotFoundError):
        hint = "it does not exist: put it there or fix the path"
    else:
        hint = exc.strerror or str(exc)
    return ConfigError(f"{key} = {path}: cannot open it: {hint}")


def open_file(path: Path, key: str) -> bytes:
    """The bytes of the file `key` names (a path or `credential:NAME`). Raises ConfigError."""
    real = secret_path(path, key)
    try:
        return real.read_bytes()
    except OSError as exc:
        raise unreadable(key, real, exc) from exc


def check_broker(broker: BrokerConfig) -> list[str]:
    """Open the password file and the TLS files, and build the TLS context the link will use."""
    lines = []
    if broker.password_file is not None:
        read_password(broker)
        lines.append(f"mqtt.password_file {broker.password_file}: readable")
    if not broker.uses_tls:
        lines.append(f"mqtt: plain TCP to {broker.host}:{broker.port} (no TLS)")
        return lines
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        value = getattr(broker, key)
        if value is not None:
            open_file(value, f"mqtt.{key}")
    TlsOptions.from_config(broker).context()
    ca = broker.tls_ca_file or "the system's CA store"
    client = f", client certificate {broker.tls_cert_file}" if broker.tls_cert_file else ""
    lines.append(f"mqtt: TLS to {broker.host}:{broker.port}, broker verified against {ca}{client}")
    return lines


def check_writable(path: Path, key: str) -> str:
    """A file the service creates or rewrites (a SQLite database): it, or its folder, must be writable."""
    target, mode = (path, os.R_OK | os.W_OK) if path.exists() else (path.parent, os.W_OK | os.X_OK)
    if not target.is_dir() and target == path.parent:
        raise ConfigError(f"{key} = {path}: its folder {target} does not exist; create it (owned by the service user)")
    if not os.access(target, mode):
        raise ConfigError(f"{key} = {path}: this user (uid {os.geteuid()}) may not write {target}; it must be "
                          "owned by the service user (systemd's StateDirectory= does that for /var/lib/<service>)")
    return f"{key} {path}: writable"
