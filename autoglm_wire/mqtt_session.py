"""The MQTT 5 session machinery both links share (`edge_agent.link`, `cloud_bridge.link`).

- `BrokerOptions`: where and how to connect, built from the `[mqtt]` and `[reconnect]` config;
  `TlsOptions`: TLS 1.2+ with the broker's certificate (and host name) verified, mTLS when a client
  certificate is set. The password never appears in a repr or a log line.
- `make_client`: a paho client for a persistent session (MQTT 5, `clean_start=False`,
  SessionExpiryInterval on every CONNECT, `manual_ack`), with paho's own reconnect off.
- `SessionRunner`: the network thread's loop. It runs one session at a time (`reconnect()`, then
  `loop_forever()`); a connection attempt that fails, a CONNACK that refuses, or a session that
  ends within `MIN_SESSION_S` is backed off with tenacity (`autoglm_wire.backoff.reconnect_wait`:
  exponential, full jitter); after a longer session it reconnects at once with a fresh schedule.

The links keep their own paho callbacks; the only call they make into this module from a paho
callback is `SessionRunner.accepted()`, which sets a flag: no lock is taken, nothing blocks.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception_type

from autoglm_wire.backoff import reconnect_wait
from autoglm_wire.errors import ConfigError
from autoglm_wire.settings import BrokerConfig, ReconnectConfig, read_password, secret_path

log = logging.getLogger(__name__)

MIN_SESSION_S = 1.0

PahoCallback = Callable[..., None]


@dataclass(frozen=True)
class TlsOptions:
    """TLS to the broker: CA file (None: the system's CAs), optional client certificate and key (mTLS)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    @classmethod
    def from_config(cls, broker: BrokerConfig) -> TlsOptions:
        """Options from the `[mqtt]` tls_* keys; `credential:NAME` paths are looked up here."""
        def path(value: Path | None, key: str) -> Path | None:
            return None if value is None else secret_path(value, f"mqtt.{key}")

        return cls(ca_file=path(broker.tls_ca_file, "tls_ca_file"),
                   cert_file=path(broker.tls_cert_file, "tls_cert_file"),
                   key_file=path(broker.tls_key_file, "tls_key_file"),
                   check_hostname=not broker.tls_insecure_skip_hostname_check)

    def context(self) -> ssl.SSLContext:
        """A client context: TLS 1.2 or later, the broker's certificate verified (and its host name,
        unless switched off), our certificate presented when one is set. Raises ConfigError."""
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = self.check_hostname
            if self.cert_file is not None:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot set up TLS from mqtt.tls_ca_file={self.ca_file}, tls_cert_file="
                              f"{self.cert_file}, tls_key_file={self.key_file}: {exc}; check the files exist, "
                              "are PEM and readable by this user, and that the key matches the certificate") from exc
        return ctx


def describe_connect_error(exc: BaseException, tls: bool) -> str:
    """`exc` plus what to check next, for the log line of a failed connection attempt."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        if "hostname" in text.lower() or "ip address mismatch" in text.lower():
            return f"{text} (mqtt.host must match a name in the broker's certificate)"
        return f"{text} (is mqtt.tls_ca_file the CA that signed the broker's certificate?)"
    if isinstance(exc, ssl.SSLError):
        return f"{text} (TLS handshake failed: check the broker's TLS listener, our client certificate and its CA)"
    if tls and isinstance(exc, ConnectionResetError | BrokenPipeError):
        return f"{text} (with TLS: the broker may require a client certificate: set mqtt.tls_cert_file/tls_key_file)"
    return text


@dataclass(frozen=True)
class BrokerOptions:
    """Broker address, credentials, session parameters and the reconnect schedule of one client."""

    host: str
    port: int
    client_id: str
    keepalive: int
    session_expiry_s: int
    backoff_initial_s: float
    backoff_multiplier: float
    backoff_max_s: float
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions | None = None

    @classmethod
    def from_config(cls, broker: BrokerConfig, reconnect: ReconnectConfig, client_id: str) -> BrokerOptions:
        """Options from the config sections; reads `broker.password_file` (ConfigError if unreadable)."""
        return cls(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            keepalive=broker.keepalive,
            session_expiry_s=broker.session_expiry_s,
            backoff_initial_s=reconnect.initial_s,
            backoff_multiplier=reconnect.multiplier,
            backoff_max_s=reconnect.max_s,
            username=broker.username,
            password=read_password(broker),
            tls=TlsOptions.from_config(broker) if broker.uses_tls else None,
        )


def disable_nagle(client: mqtt.Client, userdata: object, sock: object) -> None:
    """paho leaves Nagle's algorithm on: a small publish right after another then waits for the
    broker's delayed ACK (40 ms on Linux). Every reply and stream chunk is small, so turn it off."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextmanager
def corked(sock: object) -> Iterator[None]:
    """Hold the connection's small writes back while the block runs (Linux `TCP_CORK`), then send
    them in as few segments as they fill: the PUBACKs of a batch are still one `send` each, but no
    longer one TCP segment and one wake-up of the broker each. A no-op without a TCP socket or off
    Linux."""
    cork = getattr(socket, "TCP_CORK", None)
    tcp = isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6)
    held = cork is not None and tcp and _set_option(sock, cork, 1)
    try:
        yield
    finally:
        if held:
            _set_option(sock, cork, 0)  # sends what was held, at once (TCP_NODELAY is on)


def _set_option(sock: object, option: int, value: int) -> bool:
    """A TCP socket option; False when the socket cannot take it now (closed under us)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)  # type: ignore[attr-defined]
    except OSError:
        return False
    return True


def serialize_socket_writes(client: mqtt.Client) -> None:
    """One lock around paho's `loop_write`. Driven by `loop_forever` on a thread of ours, paho lets
    every thread that publishes (the outbox pump, the executor's stream chunks) write the socket
    itself, and its packet queue has no lock around pop-and-send: two writers could swap packets,
    and a reply then overtook an earlier one. With the lock, packets leave in the order queued.
    Deadlock-free: paho takes no lock of ours elsewhere, and our callbacks never write."""
    write = client.loop_write
    lock = threading.Lock()

    def loop_write() -> MQTTErrorCode:
        with lock:
            return write()

    client.loop_write = loop_write  # type: ignore[method-assign]


def make_client(
    options: BrokerOptions,
    manual_ack: bool = True,
    *,
    max_inflight: int | None = None,
    on_connect: PahoCallback | None = None,
    on_disconnect: PahoCallback | None = None,
    on_message: PahoCallback | None = None,
    on_publish: PahoCallback | None = None,
) -> mqtt.Client:
    """A paho client (callback API VERSION2) for a persistent MQTT 5 session, ready to be connected
    by `SessionRunner.run`.

    `max_inflight` (paho's default when None) is set here because paho refuses to change it once
    `connect_async` has run. The callbacks run on paho's network thread: they must not block.
    A will may still be set on the returned client.
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=options.client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
        reconnect_on_failure=False,
    )
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)
    if options.username is not None:
        client.username_pw_set(options.username, options.password)
    if options.tls is not None:
        client.tls_set_context(options.tls.context())
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.on_publish = on_publish
    client.on_socket_open = disable_nagle
    serialize_socket_writes(client)
    connect_props = Properties(PacketTypes.CONNECT)
    connect_props.SessionExpiryInterval = options.session_expiry_s
    client.connect_async(options.host, options.port, keepalive=options.keepalive, clean_start=False,
                         properties=connect_props)
    return client


class _SessionEnded(Exception):
    """A connection attempt failed or a session ended too soon: back off before the next."""


class SessionRunner:
    """Runs a client's sessions back to back on the calling thread until `stopping` is set.

    `connected` is the link's event (set by its on_connect); the runner clears it when a session
    ends. `on_failure` is called (on the network thread) for every failed attempt or short session.
    """

    def __init__(
        self,
        client: mqtt.Client,
        options: BrokerOptions,
        connected: threading.Event,
        on_failure: Callable[[], None] | None = None,
        logger: logging.Logger = log,
    ) -> None:
        self._client = client
        self._options = options
        self._connected = connected
        self._on_failure = on_failure
        self._log = logger
        self._session_ok = False

    def accepted(self) -> None:
        """The broker accepted the current connection (call from on_connect; only sets a flag)."""
        self._session_ok = True

    def run(self, stopping: threading.Event) -> None:
        """Connect, serve, reconnect with backoff; return once `stopping` is set."""
        opts = self._options
        while not stopping.is_set():
            retrying = Retrying(
                wait=reconnect_wait(opts.backoff_initial_s, opts.backoff_multiplier, opts.backoff_max_s),
                retry=retry_if_exception_type(_SessionEnded),
                stop=lambda _state: stopping.is_set(),
                sleep=stopping.wait,
                before_sleep=self._log_backoff,
            )
            try:
                retrying(self._one_session, stopping)
            except RetryError:
                return

    def _one_session(self, stopping: threading.Event) -> None:
        """One connection, served until it ends; raises _SessionEnded when it should be backed off."""
        self._session_ok = False
        try:
            self._client.reconnect()
        except Exception as exc:  # OSError mostly; anything else must not kill the thread
            reason = describe_connect_error(exc, self._options.tls is not None)
            raise self._failed(f"cannot connect to {self._options.host}:{self._options.port}: {reason}") from exc
        started = time.monotonic()
        self._client.loop_forever()
        self._connected.clear()
        if stopping.is_set():
            return
        lasted = time.monotonic() - started
        if not self._session_ok:
            hint = (" (with TLS: was our client certificate refused? check mqtt.tls_cert_file/tls_key_file and "
                    "the broker's log)") if self._options.tls is not None else ""
            raise self._failed(f"the broker closed the connection before accepting it{hint}")
        if lasted < MIN_SESSION_S:
            raise self._failed(f"the connection ended after {lasted:.1f} s")

    def _failed(self, reason: str) -> _SessionEnded:
        if self._on_failure is not None:
            self._on_failure()
        return _SessionEnded(reason)

    def _log_backoff(self, state: RetryCallState) -> None:
        sleep = state.next_action.sleep if state.next_action else 0.0
        outcome = state.outcome.exception() if state.outcome else None
        self._log.warning("%s; retrying in %.1f s (attempt %d)", outcome, sleep, state.attempt_number)
