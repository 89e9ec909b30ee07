"""The bridge's MQTT link: the only module of cloud_bridge that touches paho.

- MQTT 5, persistent session (`clean_start=False`, SessionExpiryInterval): replies published while
  the bridge is down wait for it on the broker.
- `manual_ack`: every delivery goes to the `deliveries` queue; the ingest loop stores it, then
  calls `ack()`. A delivery from an earlier connection is not acknowledged (its packet id belongs
  to a dead connection); the broker redelivers it and the registry deduplicates.
- Client construction and reconnects (tenacity: exponential backoff, full jitter; paho's own
  reconnect is off) are `autoglm_wire.mqtt_session`'s, shared with the agent's link.
- Callbacks only put items on queues and set events: no lock of ours is taken in a paho callback,
  nothing blocks there.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from autoglm_wire.mqtt_session import BrokerOptions, SessionRunner, corked, make_client
from cloud_bridge.ingest import Inbound

log = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 0x10


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


class BridgeLink:
    """Owns the paho client and the network thread."""

    def __init__(self, options: BrokerOptions, subscriptions: list[str]) -> None:
        self._options = options
        self._subscriptions = subscriptions
        self.deliveries: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[PublishResult] = queue.SimpleQueue()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._client = self._make_client()
        self._runner = SessionRunner(self._client, options, self._connected, logger=log)

    # --- public ----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._runner.run, args=(self._stopping,), name="bridge-network",
                                        daemon=True)
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

    def ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge stored deliveries, but those whose connection is gone (the broker redelivers
        them); the PUBACKs leave corked together (`corked`), as few TCP segments as they fill."""
        with corked(self._client.socket()):
            for delivery in deliveries:
                if delivery.qos and delivery.generation == self._generation and self._connected.is_set():
                    self._client.ack(delivery.mid, delivery.qos)

    # --- paho client and callbacks (paho thread: never block, never take our locks) -------------

    def _make_client(self) -> mqtt.Client:
        return make_client(self._options, on_connect=self._on_connect, on_disconnect=self._on_disconnect,
                           on_message=self._on_message, on_publish=self._on_publish)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s (check mqtt.username, mqtt.password_file and ACLs)",
                      reason)
            return
        self._runner.accepted()
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
