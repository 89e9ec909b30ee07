"""What `cloud-bridge serve` opens before it starts, and `cloud-bridge check-config` reports.

Every file the config names is opened as the running bridge opens it (the same user, the same
`credential:NAME` lookup): broker password and TLS files (and the TLS context), the command-signing
key, the API token file, a SQLite registry's folder (writable) and `[models] secret_file` when it
exists (made on first use otherwise). `check-config` also connects to a
PostgreSQL registry (`check_database`); `serve` does not, so that a database failover restarts the
bridge (exit 1) instead of stopping it as a broken config (exit 3). Errors are ConfigErrors naming
the key and the file.
"""

from __future__ import annotations

import ipaddress
import os

from autoglm_wire import settings
from autoglm_wire.errors import ConfigError
from autoglm_wire.preflight import check_broker, check_writable
from cloud_bridge.config import BridgeConfig, StoreConfig
from cloud_bridge.errors import BridgeError, RegistryPermission


def check_bridge(config: BridgeConfig) -> list[str]:
    """Open everything `config` names; one report line per check. Raises ConfigError on the first failure."""
    lines = check_broker(config.mqtt)
    if config.security.signer() is not None:
        lines.append(f"security.signing_key_file {config.security.signing_key_file}: an Ed25519 key, "
                     f"key_id {config.security.key_id}")
    else:
        lines.append("security: commands are not signed (no signing_key_file)")
    http = config.http
    if http.enabled and http.token_file is not None:
        from cloud_bridge.http.deps import read_token

        read_token(http.token_file)
        lines.append(f"http: API on {http.host}:{http.port}, token_file {http.token_file}: a usable token")
    else:
        lines.append("http: off")
    if config.store.url is None:
        lines.append(check_writable(config.store.path, "store.path"))
    lines.append(check_models(config))
    return lines


def check_models(config: BridgeConfig) -> str:
    """`[models] secret_file`, when it exists, holds a usable key; where devices will download from."""
    from cloud_bridge import artifacts, rollouts

    secret = settings.secret_path(config.models.secret_file, "models.secret_file")
    if secret.exists():
        try:
            artifacts.load_secret(secret)
        except BridgeError as exc:
            raise ConfigError(str(exc)) from exc
    url = rollouts.base_url(config)
    line = f"models: dir {config.models.dir}; devices download from {url}/artifacts/<sha256>"
    if config.models.public_url is None and _loopback(config.http.host):
        line += " (a loopback address: set [models] public_url to an address the devices reach)"
    return line


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_database(store: StoreConfig) -> str:
    """A PostgreSQL registry (`[store] url`) accepts a connection. Raises ConfigError."""
    import psycopg

    try:
        psycopg.connect(store.url, connect_timeout=10).close()
    except psycopg.Error as exc:
        raise ConfigError(f"store.url: cannot connect to PostgreSQL ({exc}); check the server, the database "
                          "and the credentials (~/.pgpass or PGPASSWORD of the service user)") from exc
    return "store.url: PostgreSQL accepts the connection"


def check_registry_access(store: StoreConfig) -> None:
    """A console subcommand's registry must be readable and writable by this user (RegistryPermission)."""
    if store.url is not None:
        return
    folder = store.path.parent
    if not os.access(folder, os.X_OK) or (store.path.exists() and not os.access(store.path, os.R_OK | os.W_OK)):
        raise RegistryPermission(store.path)
