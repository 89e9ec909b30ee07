"""Bridge configuration: one TOML file, every key overridable by a `CLOUD_BRIDGE_` variable.

Environment names: top-level keys as `CLOUD_BRIDGE_LOG_LEVEL`, section keys with a double
underscore, e.g. `CLOUD_BRIDGE_MQTT__HOST`, `CLOUD_BRIDGE_DISPATCH__QOS`. The environment wins over
the file. Loading does no I/O beyond reading the file; unknown keys are errors. Relative paths in
the file are resolved against the file's folder, so a config can travel with its data. The loading
rules and the `[mqtt]` broker keys shared with the agent live in `autoglm_wire.settings`.

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

    [http]                      # the HTTP API, OpenAI-compatible endpoint and web console
    enabled = true
    host = "127.0.0.1"
    port = 8080
    token_file = "api-token"    # one line: the bearer token every API call must carry
    max_body_bytes = 1048576    # larger /api and /v1 bodies get 413 (checked after the token)

    [alerts]                    # thresholds of the abnormal-device checks (cloud_bridge/alerts.py)
    offline_after_s = 300

    [retention]                 # what the registry forgets, and when (0 keeps it forever)
    days = 30                   # finished commands, their replies, events, cleared alerts, state history
    chunk_days = 1              # stream chunks (the terminal reply holds the whole text)
    dead_letter_days = 30       # messages the bridge could not store (`cloud-bridge dead-letters`)
    audit_days = 365            # the audit log (`cloud-bridge audit`)

    [models]                    # GGUF artifacts (`cloud-bridge model add`), served at /artifacts/<sha256>
    dir = "models"
    public_url = "http://bridge.example:8080"   # how devices reach the HTTP server
    secret_file = "artifact-secret"             # HMAC key of the download tokens (made on first use)
    token_ttl_s = 172800

    [rollouts]                  # staged model rollouts (`cloud-bridge rollout create`)
    device_timeout_s = 86400
    finish_timeout_s = 3600
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator

from autoglm_wire import settings
from autoglm_wire.signing import CommandSigner

ENV_PREFIX = "CLOUD_BRIDGE_"


class MqttConfig(settings.BrokerConfig):
    """The broker keys plus the bridge's client id (one bridge per id: its persistent session)."""

    client_id: str = Field(default="cloud-bridge", min_length=1, max_length=128)
    shared_group: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="share replies/events/telemetry/streams among the bridges of this group ($share/<group>/...); "
                    "each replica needs its own client_id and [store] url on one PostgreSQL")


class StoreConfig(settings.Section):
    """`[store]`: the SQLite file `path`, or with `url` a PostgreSQL database shared by bridge replicas."""

    path: Path = Path("cloud-bridge.db")
    url: str | None = Field(default=None, pattern=r"^postgres(ql)?://",
                            description='e.g. "postgresql://bridge@db.example/autoglm"; overrides path')


class DispatchConfig(settings.Section):
    resend_interval_s: float = Field(default=5.0, gt=0)
    default_expiry_s: float = Field(default=3600.0, gt=0)
    qos: int = Field(default=1, ge=1, le=2, description="QoS of command publishes: 1 or 2")


class HttpConfig(settings.Section):
    """`[http]`: the API and console server inside `cloud-bridge serve` (off unless enabled)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token_file: Path | None = Field(default=None, description="file whose first line is the API bearer token")
    chat_timeout_s: float = Field(default=300.0, gt=0, description="how long /v1/chat/completions waits")
    max_body_bytes: int = Field(default=1 << 20, ge=1024,
                                description="largest /api or /v1 request body; past it: 413, the rest unread")

    @model_validator(mode="after")
    def _token_required(self) -> HttpConfig:
        if self.enabled and self.token_file is None:
            raise ValueError("[http] enabled needs token_file: create one with "
                             "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > api-token` "
                             "and set token_file = \"api-token\"")
        return self


class WebhookConfig(settings.Section):
    """One `[[alerts.webhooks]]`: where alert raised/cleared notifications are POSTed."""

    url: str = Field(pattern=r"^https?://", description="http(s) URL receiving a POST per alert change")
    format: Literal["alertmanager", "json"] = Field(
        default="json", description="alertmanager: Alertmanager's webhook payload (version 4); json: "
        "{event, alert}")
    timeout_s: float = Field(default=10.0, gt=0)


class AlertConfig(settings.Section):
    """`[alerts]`: thresholds of the abnormal-device checks, and the webhooks they are sent to."""

    offline_after_s: float = Field(default=300.0, gt=0)
    error_rate: float = Field(default=0.5, gt=0, le=1)
    error_window: int = Field(default=10, ge=1)
    outbox_depth_max: int = Field(default=100, ge=1)
    tokens_per_s_drop: float = Field(default=0.5, gt=0, lt=1)
    speed_window: int = Field(default=10, ge=2)
    speed_recent: int = Field(default=3, ge=1, description="the speed-drop alert compares the median of the "
                              "last speed_recent generations with the median of the speed_window before them")
    speed_min_samples: int = Field(default=5, ge=1, description="generations needed before them (baseline) "
                                   "before the speed-drop alert may fire")
    dead_letter_window_s: float = Field(default=3600.0, gt=0, description="the fleet's `dead_letters` alert "
                                        "holds while a message was dead-lettered in this many seconds")
    check_interval_s: float = Field(default=5.0, gt=0)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    webhook_attempts: int = Field(default=5, ge=1, description="POSTs per round, with exponential backoff")
    webhook_backoff_s: float = Field(default=1.0, gt=0, description="first wait between POSTs of a round; doubles")
    webhook_backoff_max_s: float = Field(default=30.0, gt=0)
    webhook_retry_after_s: float = Field(default=60.0, gt=0, description="after a failed round, the next "
                                         "round starts this much later")
    webhook_give_up_after_s: float = Field(default=86400.0, gt=0, description="a notification still not "
                                           "delivered this long after the alert change is marked failed")


class RetentionConfig(settings.Section):
    """`[retention]`: how long the registry keeps what is finished; 0 keeps it forever."""

    days: float = Field(default=30.0, ge=0, description="finished commands (and their replies), events, "
                        "cleared alerts, device state history and finished rollouts older than this are deleted")
    chunk_days: float = Field(default=1.0, ge=0, description="stream chunks older than this are deleted")
    dead_letter_days: float = Field(default=30.0, ge=0, description="dead letters (messages the bridge could "
                                    "not store) older than this are deleted")
    audit_days: float = Field(default=365.0, ge=0, description="audit log entries older than this are deleted")
    check_interval_s: float = Field(default=3600.0, gt=0, description="how often the bridge deletes them")

    def cutoffs(self, now: datetime) -> tuple[datetime | None, datetime | None, datetime | None, datetime | None]:
        """(finished rows, stream chunks, dead letters, audit log): what is older is deleted; None keeps that kind
        forever."""
        return (_before(now, self.days), _before(now, self.chunk_days), _before(now, self.dead_letter_days),
                _before(now, self.audit_days))


def _before(now: datetime, days: float) -> datetime | None:
    return now - timedelta(days=days) if days else None


class ModelsConfig(settings.Section):
    """`[models]`: GGUF artifacts the bridge registers and serves to devices (cloud_bridge.artifacts)."""

    dir: Path = Field(default=Path("models"), description="content-addressed folder of registered GGUFs "
                      "(<sha256>.gguf); shared by every replica that serves them")
    public_url: str | None = Field(default=None, pattern=r"^https?://",
                                   description="the bridge's HTTP address as devices reach it, e.g. "
                                   "\"https://bridge.example:8080\"; default http://[http] host:port")
    secret_file: Path = Field(default=Path("artifact-secret"), description="HMAC key of download tokens (made on "
                              "first use, 0600); the same file on every replica")
    token_ttl_s: float = Field(default=172800.0, gt=0, description="how long a deploy command's download url "
                               "stays valid; longer than [rollouts] device_timeout_s, so that a device which "
                               "returns within that time can still download and resume")


class RolloutConfig(settings.Section):
    """`[rollouts]`: how staged model rollouts wait for devices (cloud_bridge.rollouts)."""

    device_timeout_s: float = Field(default=86400.0, gt=0, description="a device that has not accepted its "
                                    "deploy command this long after its wave started is timed out (the command "
                                    "expires; an offline device returning later does not deploy)")
    finish_timeout_s: float = Field(default=3600.0, gt=0, description="a device that accepted its deploy gets "
                                    "this long past device_timeout_s to report its end, then it is timed out")
    check_interval_s: float = Field(default=1.0, gt=0, description="how often the service loop drives rollouts")


class SigningConfig(settings.Section):
    """`[security]`: sign every dispatched command (autoglm_wire.signing) with this key."""

    signing_key_file: Path | None = None
    key_id: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _key_and_id(self) -> Self:
        if (self.signing_key_file is None) != (self.key_id is None):
            raise ValueError("signing_key_file and key_id go together: set both to sign commands, or neither")
        path = self.signing_key_file
        if path is not None and not (path.is_absolute() or str(path).startswith(settings.CREDENTIAL_PREFIX)):
            raise ValueError(f"signing_key_file {str(path)!r} must be an absolute path or credential:NAME")
        return self

    def signer(self) -> CommandSigner | None:
        """The signer for dispatched commands; None when no key is configured."""
        if self.signing_key_file is None or self.key_id is None:
            return None
        return CommandSigner.from_file(settings.secret_path(self.signing_key_file, "security.signing_key_file"),
                                       self.key_id)


class MetricsConfig(settings.Section):
    """`[metrics]`: the Prometheus endpoint `/metrics` of the HTTP server."""

    device_labels: bool = Field(default=True, description="label histograms and telemetry gauges by device; "
                                "false for fleets too large for one series per device")
    open: bool | None = Field(default=None, description="serve /metrics without the API token; by default "
                              "only when [http] host is a loopback address")

    def is_open(self, host: str) -> bool:
        """Whether /metrics needs no token when the HTTP server listens on `host`."""
        if self.open is not None:
            return self.open
        return host == "localhost" or host.startswith("127.") or host == "::1"


class BridgeConfig(settings.TomlSettings):
    """The whole bridge configuration."""

    env_prefix = ENV_PREFIX
    service_user = "cloud-bridge"

    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    reconnect: settings.ReconnectConfig = Field(default_factory=settings.ReconnectConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    alerts: AlertConfig = Field(default_factory=AlertConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    security: SigningConfig = Field(default_factory=SigningConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    rollouts: RolloutConfig = Field(default_factory=RolloutConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


def load_config(path: Path) -> BridgeConfig:
    """Read a TOML file, apply `CLOUD_BRIDGE_*` overrides, validate. Raises ConfigError."""
    hint = "create it (every key is optional; an example is in the docstring of cloud_bridge/config.py)"
    config = settings.load_toml_settings(BridgeConfig, path, hint=hint)
    return _resolve_relative_paths(config, path.parent)


def _resolve_relative_paths(config: BridgeConfig, base: Path) -> BridgeConfig:
    """Make `store.path`, `http.token_file`, `mqtt.password_file`, `models.dir` and `models.secret_file`
    absolute, relative to the config's folder."""
    store = config.store.model_copy(update={"path": settings.resolve_relative(config.store.path, base)})
    models = config.models.model_copy(update={"dir": settings.resolve_relative(config.models.dir, base),
                                              "secret_file": settings.resolve_relative(config.models.secret_file,
                                                                                       base)})
    http = config.http
    if http.token_file is not None:
        http = http.model_copy(update={"token_file": settings.resolve_relative(http.token_file, base)})
    return config.model_copy(update={"store": store, "http": http, "mqtt": config.mqtt.resolved_against(base),
                                     "models": models})
