"""The bridge's MQTT link: the only module of cloud_bridge that touches paho.

- MQTT 5, persistent session (`clean_start=False`, SessionExpiryInterval): replies published while
  the bridge is down wait for it on the broker.
- `manual_ack`: every delivery goes to the `deliveries` queue; the ingest loop stores it, then
  calls `ack()`. A delivery from an earlier connection is not acknowledged (its packet id belongs
  to a dead connection); the broker redelivers it and the registry deduplicates.
- Reconnect is driven here with tenacity (exponential backoff, full jitter); paho's own reconnect
  is off.
- Callbacks only put items on queues and set events: no lock of ours is taken in a paho callback,
  nothing blocks there.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception_type, wait_random_exponential

from cloud_bridge.ingest import Inbound

log = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 0x10


@dataclass(frozen=True)
class LinkOptions:
    host: str
    port: int
    client_id: str
    keepalive: int
    session_expiry_s: int
    backoff_initial_s: float
    backoff_multiplier: float
    backoff_max_s: float
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class Delivery:
    """A message from the broker plus what `ack()` needs."""

    message: Inbound
    mid: int
    qos: int
    generation: int


@dataclass(frozen=True)
class PublishResult:
    """The broker's answer to one of our publishes (PUBACK/PUBCOMP reason code)."""

    mid: int
    reason: int

    @property
    def ok(self) -> bool:
        return self.reason < 0x80

    @property
    def no_subscribers(self) -> bool:
        return self.reason == NO_MATCHING_SUBSCRIBERS


class _SessionEnded(Exception):
    """A connection attempt failed or a session ended too soon: back off before the next."""


def reconnect_wait(initial_s: float, multiplier: float, max_s: float) -> wait_random_exponential:
    """Attempt n waits uniform(0, min(max_s, initial_s * multiplier ** (n - 1))) seconds."""
    return wait_random_exponential(multiplier=initial_s, exp_base=multiplier, max=max_s)


class BridgeLink:
    """Owns the paho client and the network thread."""

    def __init__(self, options: LinkOptions, subscriptions: list[str]) -> None:
        self._options = options
        self._subscriptions = subscriptions
        self.deliveries: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[PublishResult] = queue.SimpleQueue()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._generation = 0
        self._session_ok = False
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    # --- public ----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_network, name="bridge-network", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Disconnect and end the network thread (unacknowledged deliveries are redelivered later)."""
        self._stopping.set()
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def publish(self, topic: str, payload: bytes, qos: int, expiry_s: int | None = None) -> int | None:
        """Publish while connected; returns the message id, or None when offline or refused by paho.

        While offline nothing is handed to paho (it would keep the message in memory and flush
        every copy at reconnect); the caller retries on its own schedule.
        """
        if not self._connected.is_set():
            return None
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry_s
        info = self._client.publish(topic, payload, qos=qos, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed (%s); it will be retried", topic, mqtt.error_string(info.rc))
            return None
        return info.mid

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a stored delivery, unless its connection is gone (then the broker redelivers)."""
        if delivery.qos == 0 or delivery.generation != self._generation or not self._connected.is_set():
            return
        self._client.ack(delivery.mid, delivery.qos)

    # --- paho client and callbacks (paho thread: never block, never take our locks) -------------

    def _make_client(self) -> mqtt.Client:
        opts = self._options
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=opts.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        if opts.username is not None:
            client.username_pw_set(opts.username, opts.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = opts.session_expiry_s
        client.connect_async(opts.host, opts.port, keepalive=opts.keepalive, clean_start=False,
                             properties=connect_props)
        return client

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s (check mqtt.username, mqtt.password_file and ACLs)",
                      reason)
            return
        self._session_ok = True
        self._generation += 1
        log.info("connected to %s:%s as %s (session present: %s)", self._options.host, self._options.port,
                 self._options.client_id, flags.session_present)
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in self._subscriptions])
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        if self._connected.is_set() and not self._stopping.is_set():
            log.warning("disconnected from the broker: %s", reason)
        self._connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        inbound = Inbound(topic=message.topic, payload=message.payload, retained=bool(message.retain))
        self.deliveries.put(Delivery(inbound, message.mid, message.qos, self._generation))

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.results.put(PublishResult(mid, reason.value))

    # --- network thread --------------------------------------------------------------------------

    def _run_network(self) -> None:
        opts = self._options
        while not self._stopping.is_set():
            retrying = Retrying(
                wait=reconnect_wait(opts.backoff_initial_s, opts.backoff_multiplier, opts.backoff_max_s),
                retry=retry_if_exception_type(_SessionEnded),
                stop=lambda _state: self._stopping.is_set(),
                sleep=self._stopping.wait,
                before_sleep=self._log_backoff,
            )
            try:
                retrying(self._one_session)
            except RetryError:
                return

    def _one_session(self) -> None:
        self._session_ok = False
        try:
            self._client.reconnect()
        except Exception as exc:  # OSError mostly; anything else must not kill the thread
            raise _SessionEnded(f"cannot connect to {self._options.host}:{self._options.port}: {exc}") from exc
        started = time.monotonic()
        self._client.loop_forever()
        self._connected.clear()
        if self._stopping.is_set():
            return
        lasted = time.monotonic() - started
        if not self._session_ok:
            raise _SessionEnded("the broker closed the connection before accepting it")
        if lasted < 1.0:
            raise _SessionEnded(f"the connection ended after {lasted:.1f} s")

    def _log_backoff(self, state: RetryCallState) -> None:
        sleep = state.next_action.sleep if state.next_action else 0.0
        outcome = state.outcome.exception() if state.outcome else None
        log.warning("%s; retrying in %.1f s (attempt %d)", outcome, sleep, state.attempt_number)
