"""The MQTT link: the only module that touches paho.

- MQTT 5, persistent session (`clean_start=False`, SessionExpiryInterval), retained status on
  every connect and a retained `offline` last will with a will delay.
- Commands are delivered with `manual_ack`: the handler (intake) stores the command, then we
  make it durable (`sync_to_disk`, the SQLite file's fsync barrier) and PUBACK. A handler or sync
  that raises (intake raises only when the store cannot write: disk full, I/O error) leaves the
  message unacknowledged. An MQTT 5 broker redelivers it only on a new connection, so the pump
  reconnects for it, backing off (`REDELIVERY_*`, full jitter); meanwhile other deliveries are
  stored and acknowledged as usual (paho's `ack()` takes any mid, in any order). `Redelivery`
  counts it (Telemetry `redelivery`), and a `redelivery_backoff` / `redelivery_recovered` Event
  marks a failing spell's start and end (published directly: the store is what fails).
- Client construction and reconnects (tenacity: exponential backoff, full jitter; paho's own
  reconnect is off) are `autoglm_wire.mqtt_session`'s, shared with the bridge; this module adds the
  will, the in-flight window, the callbacks and the pump.
- The outbox pump (its own thread) publishes stored rows in id order with a bounded in-flight
  window (after `sync_to_disk`) and deletes acked rows from the outbox in batches
  (`DELETE_BATCH_ROWS`). After a reconnect paho re-sends the rows that were in flight (after the
  CONNACK, once `on_connect` has returned); the pump publishes no newer row until those are
  acked, so nothing overtakes them. paho's `on_publish` only appends to a queue; the one lock of
  ours a paho callback takes is `_publish_lock` in `on_pre_connect`, which paho calls from
  `reconnect()` holding none of its own locks.
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

from autoglm_wire.backoff import full_jitter
from autoglm_wire.mqtt_session import BrokerOptions, SessionRunner, make_client
from edge_agent import checkpoints
from edge_agent.outbox import Outbox, OutboxRow
from edge_agent.sqlite_file import StoreError, StoreFull

log = logging.getLogger(__name__)

# A command that could not be stored stays unacknowledged; MQTT 5 brokers redeliver only on a new
# connection, so the pump reconnects for it: the n-th time of a failing spell after
# uniform(0, min(REDELIVERY_MAX_S, REDELIVERY_INITIAL_S * 2 ** (n - 1))) seconds.
REDELIVERY_INITIAL_S = 5.0
REDELIVERY_MAX_S = 60.0

EventPayload = Callable[[str, str, str, dict[str, object]], bytes]  # (level, code, message, data) -> an Event

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
    local: bool = False  # minted by the local API (edge_agent/local_api.py), not delivered by the broker


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


@dataclass
class Redelivery:
    """Deliveries that could not be stored and the reconnects made so the broker redelivers them.
    Written on the paho thread (and `due`, `attempts` by the pump); read by telemetry."""

    unacked: int = 0  # deliveries of the current connection left unacknowledged
    attempts: int = 0  # reconnects made for them in the current failing spell
    failed_deliveries: int = 0  # deliveries that could not be stored, since the agent started
    failing_since: float | None = None  # time.monotonic() of the spell's first failure; None: not failing
    due: float | None = None  # time.monotonic() at which the pump reconnects

    def counters(self) -> dict[str, int]:
        """Telemetry's `redelivery`."""
        return {"unacked": self.unacked, "attempts": self.attempts, "failed_deliveries": self.failed_deliveries}


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
        event_topic: str,
        event_payload: EventPayload,
    ) -> None:
        self._options = options
        self._subscriptions = subscriptions
        self._outbox, self._sync_to_disk = outbox, sync_to_disk  # rows to publish; the file's fsync barrier
        self._on_command = on_command
        # the retained status: its topic, the payload while online, the one the will and a clean stop leave
        self._status_topic, self._status_payload, self._offline_payload = status_topic, status_payload, offline_payload
        self._event_topic, self._event_payload = event_topic, event_payload  # the redelivery Events
        self.stats = LinkStats()
        self.redelivery = Redelivery()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id; pump thread only
        self._last_sent_id = 0
        self._unsettled: list[int] = []  # acked rows whose delete failed (disk full); retried
        # A publish by the pump and the start of a new connection exclude each other, so the pump
        # knows whether the connection it publishes on is the one it saw (`_connection`).
        self._publish_lock = threading.Lock()
        self._connection = 0  # connections begun (on_pre_connect); under _publish_lock
        self._connection_served = 0  # the connection the pump last published on; pump only
        self._resending: set[int] = set()  # mids paho re-sends on the current connection; pump only
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
        client.on_pre_connect = self._on_pre_connect
        return client

    def _on_pre_connect(self, client: mqtt.Client, userdata: object) -> None:
        """Called by paho's `reconnect()` before the new socket exists, with none of paho's locks
        held: waiting here for a publish of the pump to finish cannot deadlock."""
        with self._publish_lock:
            self._connection += 1

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
        self.redelivery.unacked = 0  # the broker redelivers them on this connection
        self.redelivery.due = None
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
        except Exception as exc:
            self._leave_unacknowledged(client, message.topic, exc)
            return
        checkpoints.reached("command_stored")
        client.ack(message.mid, message.qos)
        redelivery = self.redelivery
        if redelivery.failing_since is not None and redelivery.unacked == 0:
            self._publish_event(client, "info", "redelivery_recovered", "commands are stored again", {
                "attempts": redelivery.attempts, "failed_deliveries": redelivery.failed_deliveries,
                "failing_s": round(time.monotonic() - redelivery.failing_since, 1)})
            log.info("commands are stored again after %d redelivery attempt(s)", redelivery.attempts)
            redelivery.failing_since, redelivery.attempts = None, 0

    def _leave_unacknowledged(self, client: mqtt.Client, topic: str, exc: Exception) -> None:
        """A delivery could not be stored: no PUBACK; the pump reconnects (backing off) so the broker
        redelivers it. The first failure of a spell is announced by an Event."""
        redelivery = self.redelivery
        now = time.monotonic()
        redelivery.unacked += 1
        redelivery.failed_deliveries += 1
        if redelivery.due is None:
            redelivery.due = now + full_jitter(REDELIVERY_INITIAL_S, 2.0, REDELIVERY_MAX_S, redelivery.attempts + 1)
        log.error("could not store a command from %s (%s); it stays unacknowledged and the link reconnects in "
                  "%.1f s (redelivery attempt %d) so the broker redelivers it", topic, exc, redelivery.due - now,
                  redelivery.attempts + 1, exc_info=not isinstance(exc, StoreError))
        if redelivery.failing_since is None:
            redelivery.failing_since = now
            self._publish_event(client, "warning", "redelivery_backoff", "a command could not be stored; it stays "
                                "unacknowledged and the device reconnects, backing off, until it can be stored",
                                {"topic": topic, "error": str(exc)})

    def _publish_event(self, client: mqtt.Client, level: str, code: str, message: str,
                       data: dict[str, object]) -> None:
        """QoS 1, not stored (it reports the store failing): paho keeps it until the broker acks it,
        across reconnects, but not across a restart of the agent."""
        client.publish(self._event_topic, self._event_payload(level, code, message, data), qos=1)

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
                self._pump_once()
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

    def _pump_once(self) -> None:
        if self._connected.is_set():
            self._reconnect_for_redelivery()  # first: deletes failing on a full disk must not hold it back
        self._settle_acks()
        if self._connected.is_set():
            self._fill_window()

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
        due = self.redelivery.due
        if due is None or time.monotonic() < due:
            return
        self.redelivery.due = None
        self.redelivery.attempts += 1
        log.warning("reconnecting so the broker redelivers the commands that could not be stored (attempt %d)",
                    self.redelivery.attempts)
        self._client.disconnect()

    def _fill_window(self) -> None:
        room = self._options.inflight_window - len(self._inflight)
        if room <= 0:
            return
        rows = self._outbox.pending(self._last_sent_id, room)
        if rows:
            self._sync_to_disk()  # nothing leaves the device before it is on disk (Inbox.claim)
        with self._publish_lock:
            if not rows or not self._connected.is_set() or self._resending_first():
                return
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

    def _resending_first(self) -> bool:
        """Under `_publish_lock`, connected: whether rows of an earlier connection are still in
        flight. paho re-sends them after this connection's CONNACK (`clean_start=False`), after
        `on_connect` has returned; a row published before that would overtake them."""
        if self._connection != self._connection_served:
            self._connection_served = self._connection
            self._resending = set(self._inflight)
        self._resending &= self._inflight.keys()
        return bool(self._resending)

    def _publish_row(self, row: OutboxRow) -> mqtt.MQTTMessageInfo:
        props = None
        if row.correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = row.correlation_data
        return self._client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain, properties=props)
