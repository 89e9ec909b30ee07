"""What `edge-agent run` opens before it loads (and hashes) the model, and `check-config` reports.

Every file the config names is opened as the running agent opens it (the same user, the same
`credential:NAME` lookup): broker password and TLS files (and the TLS context built from them),
trusted public keys, the model and ONNX files, and the store's folder. Errors are ConfigErrors
that name the key and the file (autoglm_wire.preflight).
"""

from __future__ import annotations

from autoglm_wire.errors import ConfigError
from autoglm_wire.preflight import check_broker, check_writable, open_file, unreadable
from autoglm_wire.signing import is_raw_key, load_trusted_keys
from edge_agent.config import AgentConfig, HttpConfig

GGUF_MAGIC = b"GGUF"


def check_agent(config: AgentConfig) -> list[str]:
    """Open everything `config` names; one report line per check. Raises ConfigError on the first failure."""
    lines = check_broker(config.mqtt)
    if config.security.trusted_keys:
        load_trusted_keys(config.security.trusted_keys)
        files = [v for v in config.security.trusted_keys.values() if not is_raw_key(v)]
        lines.append(f"security.trusted_keys: {len(config.security.trusted_keys)} key(s) loaded"
                     + (f" ({', '.join(files)})" if files else ""))
    lines.append(_check_model(config))
    for name, onnx in config.onnx.models.items():
        try:
            onnx.path.open("rb").close()
        except OSError as exc:
            raise unreadable(f"onnx.models.{name}.path", onnx.path, exc) from exc
        lines.append(f"onnx.models.{name}.path {onnx.path}: readable")
    lines.append(check_writable(config.store.path, "store.path"))
    if config.http.enabled:
        read_token(config.http)
        lines.append(f"http: local API on {config.http.host}:{config.http.port}, token from {config.http.token_file}")
    return lines


def read_token(http: HttpConfig) -> str:
    """The local API's bearer token: the first line of `http.token_file`. Raises ConfigError."""
    assert http.token_file is not None
    lines = open_file(http.token_file, "http.token_file").decode("utf-8", errors="replace").splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ConfigError(f"http.token_file = {http.token_file}: the token (its first line) must be at least 16 "
                          "characters; generate one with `openssl rand -hex 32`")
    return token


def _check_model(config: AgentConfig) -> str:
    path = config.model.path
    try:
        with path.open("rb") as model:
            magic = model.read(4)
    except OSError as exc:
        raise unreadable("model.path", path, exc) from exc
    if magic != GGUF_MAGIC:
        raise ConfigError(f"model.path = {path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return f"model.path {path}: a readable GGUF file"
