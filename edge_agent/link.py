"""The MQTT link: the only module that touches paho.

- MQTT 5, persistent session (`clean_start=False`, SessionExpiryInterval), retained status on
  every connect and a retained `offline` last will with a will delay.
- Commands are delivered with `manual_ack`: the handler (intake) stores the command, then we
  make it durable (`sync_to_disk`, the SQLite file's fsync barrier) and PUBACK. A handler or sync
  that raises leaves the message unacknowledged, so the broker redelivers it.
- Client construction and reconnects (tenacity: exponential backoff, full jitter; paho's own
  reconnect is off) are `autoglm_wire.mqtt_session`'s, shared with the bridge; this module adds the
  will, the in-flight window, the callbacks and the pump.
- The outbox pump (its own thread) publishes stored rows in id order with a bounded in-flight
  window (after `sync_to_disk`) and deletes acked rows from the outbox in batches
  (`DELETE_BATCH_ROWS`). paho's
  `on_publish` only appends to a queue: no lock of ours is ever taken inside a paho callback.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from autoglm_wire.mqtt_session import BrokerOptions, SessionRunner, make_client
from edge_agent import checkpoints
from edge_agent.outbox import Outbox, OutboxRow
from edge_agent.sqlite_file import StoreFull

log = logging.getLogger(__name__)

# A command whose storing failed (disk full) stays unacknowledged; MQTT 5 brokers redeliver only on a
# new connection, so the pump reconnects this long after the failure (and again while it persists).
REDELIVERY_RETRY_S = 5.0

# Acked rows are deleted in one transaction per this many (or as soon as nothing is in flight), not
# one fsync'd delete per PUBACK: a replay would otherwise run at the disk's fsync rate. A row acked
# but not yet deleted when the agent dies is published again: the cloud dedupes by (device, seq).
DELETE_BATCH_ROWS = 256


@dataclass(frozen=True)
class InboundMessage:
    """A command delivery, stripped of paho types."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    message_expiry_s: int | None
    duplicate_delivery: bool


@dataclass(frozen=True)
class LinkOptions:
    """The shared broker options plus the agent's will delay and in-flight window."""

    broker: BrokerOptions
    will_delay_s: int
    inflight_window: int


@dataclass
class LinkStats:
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    published: int = 0
    acked: int = 0
    refused: int = 0
    last_connect_ts: float | None = field(default=None)


class Link:
    """Owns the paho client, the network thread and the outbox pump thread."""

    def __init__(
        self,
        options: LinkOptions,
        subscriptions: list[str],
        outbox: Outbox,
        sync_to_disk: Callable[[], None],
        on_command: Callable[[InboundMessage], None],
        status_topic: str,
        status_payload: Callable[[], bytes],
        offline_payload: bytes,
    ) -> None:
        self._options = options
        self._subscriptions = subscriptions
        self._outbox, self._sync_to_disk = outbox, sync_to_disk  # rows to publish; the file's fsync barrier
        self._on_command = on_command
        # the retained status: its topic, the payload while online, the one the will and a clean stop leave
        self._status_topic, self._status_payload, self._offline_payload = status_topic, status_payload, offline_payload
        self.stats = LinkStats()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id; pump thread only
        self._last_sent_id = 0
        self._unsettled: list[int] = []  # acked rows whose delete failed (disk full); retried
        self._redeliver_at: float | None = None  # set on the paho thread, read by the pump
        self._client = self._make_client()
        self._runner = SessionRunner(self._client, options.broker, self._connected, self._count_failure, log)
        self._threads: list[threading.Thread] = []

    # --- public ----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        for name, target in (("link-network", self._run_network), ("link-pump", self._run_pump)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def alive(self) -> bool:
        """Both link threads are running."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def kick(self) -> None:
        """Tell the pump the outbox has new rows."""
        self._wake.set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish_volatile(self, topic: str, payload: bytes) -> None:
        """QoS 0, not stored: stream chunks and telemetry. Dropped while offline, by design."""
        if self._connected.is_set():
            self._client.publish(topic, payload, qos=0)

    def inflight_count(self) -> int:
        return len(self._inflight)

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Publish what the outbox holds (up to the timeout), say `offline`, disconnect."""
        deadline = time.monotonic() + drain_timeout_s
        while self._connected.is_set() and time.monotonic() < deadline:
            if not self._inflight and not self._outbox.pending(self._last_sent_id, 1):
                break
            self._wake.set()
            time.sleep(0.02)
        if self._connected.is_set():
            info = self._client.publish(self._status_topic, self._offline_payload, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                log.warning("could not publish the offline status before stopping")
        self._stopping.set()
        self._wake.set()
        self._client.disconnect()
        for thread in self._threads:
            thread.join(timeout=5.0)

    # --- paho client and callbacks (paho thread: never block, never take our locks) -------------

    def _make_client(self) -> mqtt.Client:
        opts = self._options
        client = make_client(opts.broker, max_inflight=opts.inflight_window, on_connect=self._on_connect,
                             on_disconnect=self._on_disconnect, on_message=self._on_message,
                             on_publish=self._on_publish)
        will_props = Properties(PacketTypes.WILLMESSAGE)
        will_props.WillDelayInterval = opts.will_delay_s
        client.will_set(self._status_topic, self._offline_payload, qos=1, retain=True, properties=will_props)
        return client

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s (check credentials and ACLs)", reason)
            return
        self._runner.accepted()
        self.stats.connects += 1
        self.stats.last_connect_ts = time.time()
        log.info("connected to %s:%s (session present: %s)", self._options.broker.host, self._options.broker.port,
                 flags.session_present)
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in self._subscriptions])
        client.publish(self._status_topic, self._status_payload(), qos=1, retain=True)
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        if self._connected.is_set():
            self.stats.disconnects += 1
            log.warning("disconnected from broker: %s", reason)
        self._connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        props = message.properties
        inbound = InboundMessage(
            topic=message.topic,
            payload=message.payload,
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            message_expiry_s=getattr(props, "MessageExpiryInterval", None),
            duplicate_delivery=bool(message.dup),
        )
        try:
            self._on_command(inbound)
            self._sync_to_disk()  # intake commits skip their fsync (sqlite_file): durable before the PUBACK
        except Exception:
            log.exception("could not store a command from %s; leaving it unacknowledged: the link reconnects"
                          " in %.0f s so the broker redelivers it", message.topic, REDELIVERY_RETRY_S)
            self._redeliver_at = self._redeliver_at or time.monotonic() + REDELIVERY_RETRY_S
            return
        checkpoints.reached("command_stored")
        client.ack(message.mid, message.qos)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self._acks.put((mid, not reason.is_failure))
        self._wake.set()

    # --- network thread --------------------------------------------------------------------------

    def _run_network(self) -> None:
        self._runner.run(self._stopping)

    def _count_failure(self) -> None:
        self.stats.connect_failures += 1

    # --- pump thread -----------------------------------------------------------------------------

    def _run_pump(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._settle_acks()
                if self._connected.is_set():
                    self._fill_window()
                    self._reconnect_for_redelivery()
            except StoreFull as exc:  # expected while the disk is full: one line, not a traceback
                log.error("outbox pump: %s; retrying in 1 s", exc)
                self._stopping.wait(1.0)
            except Exception:
                log.exception("outbox pump error; retrying in 1 s")
                self._stopping.wait(1.0)
        try:
            self._delete_acked()  # rows acked since the last batch
        except Exception as exc:  # noqa: BLE001 - stopping: the rows are re-published next start
            log.warning("could not delete %d acked outbox rows before stopping (%s); they will be published "
                        "again after the restart", len(self._unsettled), exc)

    def _settle_acks(self) -> None:
        """Free the window slots of acked rows; delete a batch of them (all, when nothing is in flight)."""
        while True:
            try:
                mid, ok = self._acks.get_nowait()
            except queue.Empty:
                break
            row_id = self._inflight.pop(mid, None)
            if row_id is None:
                continue  # status/offline publishes are not outbox rows
            if ok:
                self._unsettled.append(row_id)
            else:
                self.stats.refused += 1
                log.error("broker refused outbox row %d (not authorized?); it stays stored and is retried"
                          " after the agent restarts", row_id)
        if len(self._unsettled) >= DELETE_BATCH_ROWS or not self._inflight:
            self._delete_acked()

    def _delete_acked(self) -> None:
        if self._unsettled:
            self._outbox.delete(self._unsettled)  # raises on a full disk: kept, retried next wake
            self.stats.acked += len(self._unsettled)
            self._unsettled = []

    def _reconnect_for_redelivery(self) -> None:
        """After a command could not be stored, end the session so the broker redelivers it."""
        due = self._redeliver_at
        if due is None or time.monotonic() < due:
            return
        self._redeliver_at = None
        log.warning("reconnecting so the broker redelivers the commands that could not be stored")
        self._client.disconnect()

    def _fill_window(self) -> None:
        room = self._options.inflight_window - len(self._inflight)
        if room <= 0:
            return
        rows = self._outbox.pending(self._last_sent_id, room)
        if rows:
            self._sync_to_disk()  # nothing leaves the device before it is on disk (Inbox.claim)
        for row in rows:
            info = self._publish_row(row)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("publish of outbox row %d failed (%s); will retry", row.id, info.rc)
                return
            self._inflight[info.mid] = row.id
            self._last_sent_id = row.id
            self.stats.published += 1
            checkpoints.reached("row_published")
        self._settle_acks()

    def _publish_row(self, row: OutboxRow) -> mqtt.MQTTMessageInfo:
        props = None
        if row.correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = row.correlation_data
        return self._client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain, properties=props)
