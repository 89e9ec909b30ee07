"""`cloud-bridge serve`: wiring of link, registry, ingest and dispatch, plus signals.

Threads:
- `bridge-network` (link): paho's network loop and reconnects.
- `bridge-ingest`: takes deliveries off the link's queue in batches, stores (or dead-letters) them
  in one commit, then acknowledges each to the broker in arrival order. While the registry fails
  for a transient cause the batch stays unacknowledged and is retried with backoff (0.5 s doubling
  to 30 s); after `STORE_ATTEMPTS` failures in a row the bridge stops with an error (exit 3) for
  its supervisor to restart it, reconnecting to the database; the broker redelivers the batch.
- `bridge-dispatch`: every `POLL_S` asks the dispatcher what to do with each pending/sent command
  (commands may be queued by another process through the registry file), publishes to
  `P/<device>/cmd`, expires what the device never accepted (provisionally: a later report from the
  device wins), reads the broker's PUBACKs and drives rollouts.
- `bridge-upkeep`: every `alerts.check_interval_s` it raises and clears abnormal-device alerts;
  every `retention.check_interval_s` it deletes what `[retention]` says the registry may forget.
On PostgreSQL each of these loops has a database connection of its own (the HTTP API and the
webhooks share a fourth); on SQLite they share the one connection.
- `bridge-http` (when `[http] enabled`): uvicorn serving the API, `/v1` and the console page.
Signal handlers only set the stop event; the main thread then shuts everything down.

Under systemd (`Type=notify`) the main thread sends READY=1 once the loops run and the HTTP server
listens, then WATCHDOG=1 every WatchdogSec/2 while every loop thread is alive, and STOPPING=1.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from autoglm_wire.backoff import ceiling
from autoglm_wire.mqtt_session import BrokerOptions
from autoglm_wire.notify import sd_notify, watchdog_interval_s
from autoglm_wire.protocol import utc_now
from autoglm_wire.signing import sign_payload
from autoglm_wire.topics import DeviceTopics, cloud_subscriptions, group_cmd
from cloud_bridge import rollouts, webhooks
from cloud_bridge.alerts import Progress, check_fleet
from cloud_bridge.config import BridgeConfig
from cloud_bridge.dispatcher import Action, Decision, decide, message_expiry_s
from cloud_bridge.errors import BridgeError
from cloud_bridge.ingest import Ingestor, RegistryUnavailable
from cloud_bridge.link import BridgeLink, Delivery, PublishResult
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow

log = logging.getLogger(__name__)

POLL_S = 0.1
HTTP_START_S = 15.0
PASS_CHUNK = 200  # sends claimed per registry commit; a publish may precede its commit (a crash then resends)
INGEST_BATCH = 256
STORE_ATTEMPTS = 10  # tries of one batch while the registry is unavailable (about 2 min in all)
STORE_RETRY_S = (0.5, 2.0, 30.0)  # backoff before each retry: initial, multiplier, max
PUBLISH_TRACK_S = 600.0
WEBHOOK_POLL_S = 1.0  # how often due alert notifications are looked for

T = TypeVar("T")


class Publisher(Protocol):
    """What the dispatch loop needs from the link (a fake in tests)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int, expiry_s: int | None = None) -> int | None: ...


@dataclass
class BridgeStats:
    received: dict[str, int] = field(default_factory=dict)
    sends: int = 0
    expired: int = 0
    refused: int = 0


class Dispatch:
    """One dispatcher pass at a time over the registry's active commands."""

    def __init__(self, registry: Registry, publisher: Publisher, config: BridgeConfig,
                 stats: BridgeStats | None = None) -> None:
        self._registry = registry
        self._publisher = publisher
        self._prefix = config.mqtt.topic_prefix
        self._dispatch = config.dispatch
        self._signer = config.security.signer()  # issue #6: sign each command when a key is set
        self.stats = stats or BridgeStats()
        self._sent: dict[int, tuple[str, float]] = {}  # paho mid -> (command id, monotonic time)

    def run_once(self, now: datetime) -> int:
        """Act on every active command that is due; returns how many were published.

        Only what may be due is read (`commands.due`). The member rows of one group command share a
        publish: the first member due sends it on `P/group/G/cmd`, and the others due in the same pass
        count that send as theirs. Each chunk of due rows is one transaction that first locks its rows
        in id order (the order ingest locks them in), expires what is past `expires_at`, then claims
        the chunk's sends in one statement and publishes what it claimed, by priority.
        """
        published = 0
        this_pass: set[tuple[str, str | None]] = set()
        due: list[tuple[CommandRow, Decision]] = []
        for row, device_state in self._registry.commands.due(now, self._dispatch.resend_interval_s):
            decision = decide(row.view(), device_state, now, self._dispatch.resend_interval_s)
            if decision.action in (Action.SEND, Action.EXPIRE):
                due.append((row, decision))
        for start in range(0, len(due), PASS_CHUNK):
            chunk = due[start:start + PASS_CHUNK]
            with self._registry.transaction():  # one commit per chunk of sends, not one fsync per command
                self._registry.commands.lock([row.id for row, _ in chunk])
                sends = []
                for row, decision in chunk:
                    if decision.action is Action.EXPIRE:
                        self._expire(row, decision.reason, now)
                    else:
                        sends.append((row, decision))
                if not sends or not self._publisher.connected:
                    continue
                claimed = self._registry.commands.claim_sends([row for row, _ in sends], now)
                for row, decision in sends:
                    if row.id in claimed:  # else a reply moved it past `sent`, or another replica sent it
                        published += self._send(row, decision.reason, now, this_pass)
        return published

    def _expire(self, row: CommandRow, reason: str, now: datetime) -> None:
        if self._registry.commands.mark_expired(row.id, reason, now):
            self.stats.expired += 1
            log.warning("command %s for %s expired: %s", row.id, row.device_id, reason)

    def _send(self, row: CommandRow, reason: str, now: datetime, this_pass: set[tuple[str, str | None]]) -> int:
        topic = self._topic(row)
        if (topic, row.wire_id) in this_pass:
            return 0
        this_pass.add((topic, row.wire_id))
        payload = sign_payload(row.raw_payload, self._signer)
        mid = self._publisher.publish(topic, payload, self._dispatch.qos, message_expiry_s(_expires(row), now))
        if mid is None:
            return 0
        self._sent[mid] = (row.id, time.monotonic())
        self.stats.sends += 1
        log.info("sent %s %s on %s (attempt %d: %s)", row.kind, row.id, topic, row.attempts + 1, reason)
        return 1

    def _topic(self, row: CommandRow) -> str:
        """`P/group/G/cmd` for a group command's member row, else the device's `P/D/cmd`."""
        target = row.payload.get("target") or ""
        if target.startswith("group/"):
            return group_cmd(self._prefix, target.removeprefix("group/"))
        return DeviceTopics(self._prefix, row.device_id).cmd

    def settle(self, results: list[PublishResult]) -> None:
        """Log what the broker said about our publishes (refusals, nobody subscribed)."""
        for result in results:
            command_id, _ = self._sent.pop(result.mid, (None, 0.0))
            if not result.ok:
                self.stats.refused += 1
                log.error("the broker refused command %s (reason 0x%02x); check the bridge's ACL allows "
                          "publishing to %s/+/cmd", command_id, result.reason, self._prefix)
            elif result.no_subscribers:
                log.info("command %s reached no subscriber (the device has no session yet); it is resent "
                         "every %g s until accepted", command_id, self._dispatch.resend_interval_s)
        cutoff = time.monotonic() - PUBLISH_TRACK_S
        for mid in [m for m, (_, at) in self._sent.items() if at < cutoff]:
            del self._sent[mid]


def subscriptions(config: BridgeConfig) -> list[str]:
    """The device -> cloud topics; with `mqtt.shared_group`, shared among the replicas of that group.

    Status stays a plain subscription on every replica: the broker sends retained messages (the
    fleet's current states) only to non-shared subscriptions, and recording a status twice is harmless.
    """
    topics = cloud_subscriptions(config.mqtt.topic_prefix)
    group = config.mqtt.shared_group
    if group is None:
        return topics
    return [t if t.endswith("/status") else f"$share/{group}/{t}" for t in topics]


def _expires(row: CommandRow) -> datetime | None:
    return datetime.fromisoformat(row.expires_at) if row.expires_at else None


def _drain(q: queue.SimpleQueue[T], first: T | None, limit: int) -> list[T]:
    items = [] if first is None else [first]
    while len(items) < limit:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


class BridgeService:
    """The running bridge: link + ingest loop + dispatch loop around one registry."""

    def __init__(self, config: BridgeConfig, registry: Registry, clock: Callable[[], datetime] = utc_now) -> None:
        self._config = config
        self._registry = registry  # the HTTP API's and the webhooks'
        # On PostgreSQL, ingest, the dispatch loop and upkeep each get a connection of their own: one
        # loop's round trips and commits then never wait for another's (Registry.sibling).
        self._ingest_registry = registry.sibling()
        self._dispatch_registry = registry.sibling()
        self._upkeep_registry = registry.sibling()
        self._clock = clock
        self.stats = BridgeStats()
        options = BrokerOptions.from_config(config.mqtt, config.reconnect, client_id=config.mqtt.client_id)
        self._link = BridgeLink(options, subscriptions(config))
        self._ingestor = Ingestor(self._ingest_registry, config.mqtt.topic_prefix)
        self._dispatch = Dispatch(self._dispatch_registry, self._link, config, self.stats)
        self._alert_progress = Progress()  # what the alert checks read last (alerts.Progress)
        self._stop = threading.Event()
        self._failure: str | None = None
        self._threads: list[threading.Thread] = []

    def wait_connected(self, timeout_s: float) -> bool:
        """True once the link is connected (and has asked for its subscriptions)."""
        return self._link.wait_connected(timeout_s)

    def run(self, stop: threading.Event) -> None:
        """Run until `stop` is set, then shut down cleanly."""
        http = self._http_server()
        self._link.start()
        loops = [("bridge-ingest", self._run_ingest), ("bridge-dispatch", self._run_dispatch),
                 ("bridge-upkeep", self._run_upkeep)]
        if self._config.alerts.webhooks:
            loops.append(("bridge-webhooks", self._run_webhooks))
        if http is not None:
            loops.append(("bridge-http", http.run))
        for name, target in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        failure = None if http is None else self._http_failure(http, self._threads[-1])
        if failure is None:
            sd_notify(f"READY=1\nSTATUS=serving the registry {self._registry.path}")
            failure = self._serve_until(stop)
        log.info("stopping")
        sd_notify("STOPPING=1")
        self._stop.set()
        if http is not None:
            http.should_exit = True
        for thread in self._threads:
            thread.join(timeout=10.0)
        self._link.stop()
        for sibling in (self._ingest_registry, self._dispatch_registry, self._upkeep_registry):
            if sibling is not self._registry:
                sibling.close()
        if failure is not None:
            raise BridgeError(failure)

    def _serve_until(self, stop: threading.Event) -> str | None:
        """Until `stop` or a loop's failure (returned): WATCHDOG=1 every WatchdogSec/2 while the link and
        every loop thread are alive."""
        interval = watchdog_interval_s()
        next_watchdog = time.monotonic()
        while not stop.wait(0.5):
            if self._failure is not None:
                return self._failure
            if interval is not None and time.monotonic() >= next_watchdog and self.healthy():
                sd_notify("WATCHDOG=1")
                next_watchdog = time.monotonic() + interval
        return None

    def healthy(self) -> bool:
        """Every loop thread (ingest, dispatch, upkeep, HTTP) and the link's network thread are running."""
        return all(thread.is_alive() for thread in self._threads) and self._link.alive()

    def _http_failure(self, server: Any, thread: threading.Thread) -> str | None:
        """None once uvicorn listens; else why it could not (it ends its thread on a bind error)."""
        deadline = time.monotonic() + HTTP_START_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if server.started:
            return None
        http = self._config.http
        return (f"the HTTP server could not listen on {http.host}:{http.port} (is the port in use? see the log "
                "above); change [http] port or host, or set [http] enabled = false")

    def _http_server(self) -> Any:
        """The uvicorn server of `[http]`, or None when it is off. Reads the token now (errors at start)."""
        http = self._config.http
        if not http.enabled or http.token_file is None:
            return None
        import uvicorn

        from cloud_bridge.http.app import create_app
        from cloud_bridge.http.deps import read_token

        app = create_app(self._registry, self._config, read_token(http.token_file),
                         broker_connected=lambda: self._link.connected)
        log.info("HTTP API and console on http://%s:%d/ (OpenAPI at /docs)", http.host, http.port)
        return uvicorn.Server(uvicorn.Config(app, host=http.host, port=http.port, log_level="warning",
                                             access_log=False))

    # --- ingest ----------------------------------------------------------------------------------

    def _run_ingest(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    first = self._link.deliveries.get(timeout=0.2)
                except queue.Empty:
                    continue
                self._store_until_done(_drain(self._link.deliveries, first, INGEST_BATCH))
        except Exception as exc:  # a bug: stop rather than leave the fleet's messages unacknowledged for ever
            log.exception("the ingest loop failed")
            self._fail(f"the ingest loop failed: {type(exc).__name__}: {exc}")

    def _store_until_done(self, batch: list[Delivery]) -> None:
        """Store a batch and ack it; while the registry is unavailable, retry it (unacked, so nothing
        is lost) with backoff, and after STORE_ATTEMPTS failures in a row stop the bridge."""
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                outcomes = self._ingestor.handle_batch([d.message for d in batch], self._clock())
            except RegistryUnavailable as exc:
                if attempt == STORE_ATTEMPTS:
                    break
                delay = ceiling(*STORE_RETRY_S, attempt)
                log.warning("%s; %d message(s) stay unacknowledged; retry %d of %d in %g s", exc, len(batch),
                            attempt, STORE_ATTEMPTS - 1, delay)
                if self._stop.wait(delay):
                    return
                continue
            self._link.ack(batch)
            for outcome in outcomes:
                self.stats.received[outcome] = self.stats.received.get(outcome, 0) + 1
            return
        self._fail(f"the registry {self._registry.path} failed {STORE_ATTEMPTS} times in a row; stopping so that "
                   "the supervisor restarts the bridge (the broker redelivers what was not acknowledged)")

    def _fail(self, reason: str) -> None:
        """Stop the service from one of its threads; `run` raises BridgeError(reason)."""
        self._failure = reason
        self._stop.set()

    # --- dispatch --------------------------------------------------------------------------------

    def _run_dispatch(self) -> None:
        next_rollouts = 0.0
        while not self._stop.is_set():
            try:
                self._dispatch.settle(_drain(self._link.results, None, 10_000))
                if time.monotonic() >= next_rollouts:  # before the pass: a wave's commands go out at once
                    next_rollouts = time.monotonic() + self._config.rollouts.check_interval_s
                    rollouts.drive_all(self._dispatch_registry, self._config, self._clock())
                self._dispatch.run_once(self._clock())
            except Exception:
                log.exception("dispatch pass failed; retrying in 1 s")
                self._stop.wait(1.0)
            self._stop.wait(POLL_S)

    # --- upkeep ----------------------------------------------------------------------------------

    def _run_upkeep(self) -> None:
        """Alert checks every `alerts.check_interval_s`, retention every `retention.check_interval_s`,
        on a thread (and on PostgreSQL a connection) of their own: a check over a large fleet never
        holds up a send or a reply."""
        next_check = next_prune = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self._config.alerts.check_interval_s
                    self._check_alerts()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self._config.retention.check_interval_s
                    self._prune()
            except Exception:
                log.exception("upkeep pass failed (alert check or retention); retrying in 1 s")
                next_check = next_prune = time.monotonic() + 1.0
            self._stop.wait(max(0.0, min(next_check, next_prune) - time.monotonic()))

    def _prune(self) -> None:
        deleted = self._upkeep_registry.retention.prune(*self._config.retention.cutoffs(self._clock()))
        if any(deleted.values()):
            log.info("retention: deleted %s", ", ".join(f"{n} {table}" for table, n in deleted.items() if n))

    def _run_webhooks(self) -> None:
        """Send due alert notifications, once a second (cloud_bridge.webhooks)."""
        while not self._stop.wait(WEBHOOK_POLL_S):
            try:
                webhooks.deliver_due(self._registry, self._config.alerts, self._clock())
            except Exception:  # the registry unavailable, or a bug: log it, the rows stay pending
                log.exception("alert webhook pass failed; retrying")

    def _check_alerts(self) -> None:
        for device_id, kind, raised in check_fleet(self._upkeep_registry, self._config.alerts, self._clock(),
                                                     self._alert_progress):
            log.warning("alert %s %s for %s", kind, "raised" if raised else "cleared", device_id)


def serve(config: BridgeConfig) -> int:
    """Run the bridge until SIGTERM/SIGINT; returns the process exit code (0 on a clean stop)."""
    registry = Registry.from_config(config.store, create=True)
    log.info("registry %s; broker %s:%s; prefix %r", registry.path, config.mqtt.host, config.mqtt.port,
             config.mqtt.topic_prefix)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    service = BridgeService(config, registry)
    try:
        service.run(stop)
    finally:
        registry.close()
    log.info("stopped (%s)", ", ".join(f"{k}={v}" for k, v in sorted(service.stats.received.items())) or "idle")
    return 0

