"""Wiring of the agent: link -> intake -> inbox -> executor -> engine -> outbox -> link, on one
SQLite file; status, telemetry, signals and the systemd watchdog. Signal handlers only set a flag;
the main thread does the rest.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from autoglm_wire import __version__
from autoglm_wire.errors import ConfigError, InvalidCommand
from autoglm_wire.lifecycle import State
from autoglm_wire.mqtt_session import BrokerOptions
from autoglm_wire.notify import sd_notify, watchdog_interval_s
from autoglm_wire.protocol import (
    ConfigParams,
    Event,
    ModelRef,
    ParsedCommand,
    Status,
    Telemetry,
    format_ts,
    to_bytes,
    utc_now,
)
from autoglm_wire.signing import CommandVerifier, VerifyPolicy, load_trusted_keys
from autoglm_wire.topics import DeviceTopics, group_cmd
from edge_agent import policy
from edge_agent.canary import rss_mb
from edge_agent.config import AgentConfig
from edge_agent.engine import EngineReload, TextEngine
from edge_agent.executor import Executor, Outcome, onnx_handlers
from edge_agent.inbox import SqliteInbox
from edge_agent.intake import Intake
from edge_agent.link import InboundMessage, Link, LinkOptions
from edge_agent.local_api import LocalApi, LocalApiDeps
from edge_agent.local_calls import LocalCalls
from edge_agent.metrics import Numbers, store_bytes
from edge_agent.model_deploy import ModelDeployer
from edge_agent.model_slots import ModelSlots, Slot
from edge_agent.outbox import OutboxLimits, SqliteOutbox
from edge_agent.policy_store import PolicyStore
from edge_agent.preflight import read_token
from edge_agent.sqlite_file import SqliteFile, StoreError

log = logging.getLogger(__name__)

LEDGER_CHECK_S = 3600.0  # how often finished commands past `store.ledger_days` are forgotten (and at start)
EngineFactory = Callable[[AgentConfig], TextEngine]
CONFIG_MODEL_META = "model_config_path"  # the `[model] path` last adopted as a slot (a new one is adopted at start)


def with_slot(config: AgentConfig, slot: Slot) -> AgentConfig:
    """The config serving `slot`: its file and name in `[model]`, every other model setting kept."""
    return config.model_copy(update={"model": config.model.model_copy(update={"path": slot.path, "name": slot.name})})


class Agent:
    def __init__(self, config: AgentConfig, engine_factory: EngineFactory,
                 reload_config: Callable[[], AgentConfig] | None = None) -> None:
        if config.model.parallel == "auto":
            raise ConfigError("model.parallel = \"auto\" must be resolved before the agent starts "
                              "(edge_agent.engine.llama.resolve_parallel; `edge-agent run` does it)")
        self.config = config
        self.topics = DeviceTopics(config.mqtt.topic_prefix, config.device_id)
        self.file = SqliteFile(config.store.path, config.store.synchronous)
        limits = OutboxLimits(config.store.max_outbox_rows, config.store.max_outbox_bytes)
        self.outbox = SqliteOutbox(self.file, self.topics, limits)
        self.inbox = SqliteInbox(self.file, self.outbox)
        self.policy_store = PolicyStore(self.file)
        assert config.models.dir is not None  # load_config sets it
        self.slots = ModelSlots(self.file, config.models.dir, config.models.slots)
        self.model_load_s: float | None = None  # how long the last model load took
        self._engine_factory = self._timed(engine_factory)
        self.engine = self._start_engine(config)
        self._reload_config = reload_config  # SIGHUP: re-read the config, reload the model
        self._reload_requested = threading.Event()
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        security = config.security
        verifier = CommandVerifier(VerifyPolicy(
            required=security.require_signed_commands, trusted=load_trusted_keys(security.trusted_keys),
            max_clock_skew_s=security.max_clock_skew_s, replay_window_s=security.replay_window_s,
            legacy_until=security.legacy_signatures_until))
        self.link = Link(
            options=self._link_options(),
            subscriptions=[self.topics.cmd] + [group_cmd(config.mqtt.topic_prefix, g) for g in config.mqtt.groups],
            outbox=self.outbox,
            sync_to_disk=self.file.sync,
            on_command=lambda message: self.intake.handle(message),
            status_topic=self.topics.status,
            status_payload=self._status_payload,
            offline_payload=to_bytes(Status(device_id=config.device_id, state="offline")),
            event_topic=self.topics.event,
            event_payload=lambda level, code, message, data: to_bytes(self._new_event(level, code, message, data)),
        )
        self.executor = Executor(
            inbox=self.inbox,
            sync_to_disk=self.file.sync,
            engine=self.engine,
            topics=self.topics,
            agent_version=__version__,
            publish_volatile=self.link.publish_volatile,
            on_stored=self.link.kick,
            stream_interval_s=config.mqtt.stream_interval_ms / 1000,
            workers=int(config.model.parallel),
        )
        self.executor.handlers.update(onnx_handlers(config.onnx.models))
        self.policy = policy.initial(self.policy_store.load(), config.telemetry_interval_s, config.limits.max_tokens)
        self.executor.policy = lambda: self.policy
        self.executor.handlers["config"] = self._config_command
        self.deployer = ModelDeployer(
            self.slots, config.models, self.executor,
            load=lambda slot: self._engine_factory(with_slot(self.config, slot)),
            event=lambda level, code, message, data: self._event(level, code, message, **data),
            announce=self._model_changed)
        self.executor.handlers["model"] = self.deployer.handle
        self.intake = Intake(config, self.topics, verifier, self.inbox, self.outbox, self.executor,
                             on_stored=self.link.kick)
        self.local_calls = LocalCalls()  # `[http]`: local API requests waiting on their commands
        self.outbox.on_reply = self.local_calls.on_reply
        self.executor.local_delta = self.local_calls.on_delta
        self.local_api: LocalApi | None = None

    def _start_engine(self, config: AgentConfig) -> TextEngine:
        """The model recorded active in the store (then the previous slots, if its file is gone or
        fails to load or to hash the same); the config's `[model] path` on the first start or when
        it names another file than the one adopted last (an operator's edit wins once), recorded
        as the active slot."""
        adopted = self.file.meta(CONFIG_MODEL_META)
        if adopted == str(config.model.path):
            for slot in self.slots.slots():
                engine = self._try_slot(config, slot)
                if engine is not None:
                    return engine
        engine = self._engine_factory(config)
        self._adopt_config_model(config, engine)
        return engine

    def _try_slot(self, config: AgentConfig, slot: Slot) -> TextEngine | None:
        try:
            engine = self._engine_factory(with_slot(config, slot))
        except Exception as exc:  # noqa: BLE001 - the next slot, then the config's model
            log.error("model slot %s (%s) cannot be loaded: %s; trying the next", slot.name, slot.path, exc)
            return None
        if engine.info.sha256 != slot.sha256:
            log.error("model slot %s: %s has sha256 %s, not the recorded %s; trying the next", slot.name, slot.path,
                      engine.info.sha256, slot.sha256)
            engine.close()
            return None
        if slot != self.slots.active():
            log.warning("serving the previous model slot %s: the active one could not be loaded", slot.name)
            self.slots.activate(slot, self.slots.rollout())
        self.config = with_slot(config, slot)
        log.info("model slot %s (sha256 %s) is active: loaded %s", slot.name, slot.sha256[:12], slot.path)
        return engine

    def _adopt_config_model(self, config: AgentConfig, engine: TextEngine) -> None:
        """The config's model becomes the active slot (first start, a changed `[model] path`, SIGHUP)."""
        path = config.model.path
        slot = Slot(engine.info.name, path, engine.info.sha256, path.stat().st_size)
        if slot.sha256 != getattr(self.slots.active(), "sha256", None):
            self.slots.activate(slot)
        with self.file.write():
            self.file.set_meta(CONFIG_MODEL_META, str(path))

    def _model_changed(self, engine: TextEngine, slot: Slot) -> None:
        """On the worker thread, after a `model` command changed (or restored) the model: announce it."""
        self.engine = engine
        self.config = with_slot(self.config, slot)
        self.outbox.enqueue_status(self._status_payload())
        self.link.kick()

    def _submit_local(self, payload: bytes) -> None:
        """A local API request's command: taken by the intake exactly as an MQTT delivery on this
        device's command topic (same checks, ledger, executor), then synced to disk like before a PUBACK."""
        self.intake.handle(InboundMessage(topic=self.topics.cmd, payload=payload, response_topic=None,
                                          correlation_data=None, message_expiry_s=None, duplicate_delivery=False,
                                          local=True))
        self.file.sync()

    def readiness(self) -> dict[str, str | None]:
        """`/readyz`: each check (broker, store, model) with what fails it, or None when it passes."""
        return {
            "broker": None if self.link.connected else "not connected to the MQTT broker",
            "store": "the store cannot write (disk full or I/O error)" if self.file.write_failing else None,
            "model": None if self.executor.alive() else "the executor is not running (the model is not loaded)",
        }

    def start_local_api(self) -> None:
        """`[http]` enabled: serve the local API (after the model is loaded and the link started)."""
        http = self.config.http
        if not http.enabled:
            return
        deps = LocalApiDeps(submit=self._submit_local, calls=self.local_calls, readiness=self.readiness,
                            model_name=lambda: self.engine.info.name, device_id=self.config.device_id,
                            durable=self.file.sync, numbers=self.numbers)
        try:
            self.local_api = LocalApi(http, read_token(http), deps)
        except OSError as exc:
            raise ConfigError(f"http.host/http.port = {http.host}:{http.port}: cannot listen there ({exc}); "
                              "pick a free port or stop what holds it") from exc
        self.local_api.start()

    def _config_command(self, parsed: ParsedCommand, cancel: threading.Event) -> Outcome:
        """`config`: merge the partial policy, persist what was set, answer with the policy in force."""
        change = parsed.params
        assert isinstance(change, ConfigParams)
        if change.max_tokens is not None and change.max_tokens > self.config.limits.max_tokens:
            raise InvalidCommand(f"max_tokens {change.max_tokens} is above this device's cap "
                                 f"{self.config.limits.max_tokens} (limits.max_tokens)", parsed.id)
        self.policy_store.save({**self.policy_store.load(), **change.model_dump(exclude_none=True)})
        self.policy = policy.merge(self.policy, change, self.config.limits.max_tokens)
        log.info("policy changed by command %s: %s", parsed.id, self.policy.model_dump())
        return Outcome(State.SUCCEEDED, self.policy.model_dump(), {})

    def _link_options(self) -> LinkOptions:
        """Broker options (the device id is the client id) plus the agent's will delay and window."""
        mqtt_cfg = self.config.mqtt
        broker = BrokerOptions.from_config(mqtt_cfg, self.config.reconnect, client_id=self.config.device_id)
        return LinkOptions(broker=broker, will_delay_s=mqtt_cfg.will_delay_s, inflight_window=mqtt_cfg.inflight_window)

    # --- status and telemetry --------------------------------------------------------------------

    def _status_payload(self) -> bytes:
        status = Status(
            device_id=self.config.device_id, state="online", ts=format_ts(utc_now()), agent_version=__version__,
            model=self.engine.info, kinds=sorted(self.executor.kinds), groups=list(self.config.mqtt.groups),
            previous_model=ModelRef(**previous.ref()) if (previous := self.slots.previous()) else None,
            rollout=self.slots.rollout(),
        )
        return to_bytes(status)

    def numbers(self) -> Numbers:
        """The agent's numbers now: telemetry and the local `/metrics` both report these."""
        rows, size = self.outbox.depth()
        link = self.link.stats
        return Numbers(
            device_id=self.config.device_id, agent_version=__version__, model=self.engine.info.name,
            queue_depth=self.inbox.count_in_state("accepted"), outbox_rows=rows, outbox_bytes=size,
            reconnects=max(link.connects - 1, 0), connect_failures=link.connect_failures,
            store_bytes=store_bytes(str(self.file.path)), model_load_s=self.model_load_s,
            tokens_per_s_ewma=self.executor.tokens_per_s_ewma, rss_bytes=int(rss_mb() * 1024 * 1024),
            uptime_s=round(time.monotonic() - self.started_at, 1), broker_connected=self.link.connected,
            commands=self.inbox.counts(), dropped=self.outbox.dropped,
        )

    def telemetry(self) -> Telemetry:
        n = self.numbers()
        return Telemetry(
            device_id=n.device_id, ts=format_ts(utc_now()), queue_depth=n.queue_depth, outbox_depth=n.outbox_rows,
            outbox_bytes=n.outbox_bytes, tokens_per_s_ewma=n.tokens_per_s_ewma,
            rss_mb=round(n.rss_bytes / (1024 * 1024), 1), gpu_layers=self.engine.info.n_gpu_layers,
            uptime_s=n.uptime_s, dropped=n.dropped, redelivery=self.link.redelivery.counters(),
            reconnects=n.reconnects, store_bytes=n.store_bytes,
            model_load_s=None if n.model_load_s is None else round(n.model_load_s, 3), commands=n.commands,
            max_tokens_limit=self.config.limits.max_tokens,
        )

    def _timed(self, factory: EngineFactory) -> EngineFactory:
        """`factory`, recording how long each successful load takes (`model_load_s`)."""
        def load(config: AgentConfig) -> TextEngine:
            started = time.monotonic()
            engine = factory(config)
            self.model_load_s = time.monotonic() - started
            return engine
        return load

    def _new_event(self, level: str, code: str, message: str, data: dict[str, object]) -> Event:
        return Event(device_id=self.config.device_id, ts=format_ts(utc_now()), level=level,  # type: ignore[arg-type]
                     code=code, message=message, data=data)

    def _event(self, level: str, code: str, message: str, **data: object) -> None:
        self.outbox.enqueue_event(self._new_event(level, code, message, data))
        self.link.kick()

    # --- main loop -------------------------------------------------------------------------------

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; drain and return 0."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, lambda signum, frame: self._reload_requested.set())
        if self.file.quarantined is not None:
            self._event("error", "store_quarantined", "the SQLite store failed its integrity check and was "
                        "replaced by a fresh one", quarantined_as=str(self.file.quarantined))
        recovered = self.executor.recover(self.deployer.recovered)
        self.deployer.settle()
        self._event("info", "agent_started", f"agent {__version__} started", recovered_running=recovered,
                    model=self.engine.info.name, model_sha256=self.engine.info.sha256,
                    gpu=self.engine.gpu_reason)
        self.start_local_api()  # a port already taken fails here, before anything else starts
        self.link.start()
        self.executor.start()
        sd_notify(f"READY=1\nSTATUS=serving {self.topics.cmd}")
        log.info("agent %s serving %s (model %s, %s)", __version__, self.topics.cmd, self.engine.info.name,
                 self.engine.gpu_reason)
        self._serve()
        return self._shutdown()

    def _serve(self) -> None:
        watchdog = watchdog_interval_s()
        next_watchdog = next_telemetry = next_forget = time.monotonic()
        while not self._stop.wait(0.5):
            if self._reload_requested.is_set():
                self._reload_model()
            now = time.monotonic()
            if watchdog is not None and now >= next_watchdog and self.healthy():
                sd_notify("WATCHDOG=1")
                next_watchdog = now + watchdog
            if now >= next_telemetry:
                self.link.publish_volatile(self.topics.telemetry, to_bytes(self.telemetry()))
                next_telemetry = now + self.policy.telemetry_interval_s
            if now >= next_forget and self.config.store.ledger_days:
                self._forget_finished()
                next_forget = now + LEDGER_CHECK_S

    def _forget_finished(self) -> None:
        """`store.ledger_days`: the ledger keeps finished commands that long (duplicates of them are
        recognised and answered with their last reply), then forgets them; the disk stays bounded."""
        try:
            forgotten = self.inbox.forget_finished(time.time() - self.config.store.ledger_days * 86400)
        except StoreError as exc:  # a full disk: the next check tries again
            log.warning("could not forget finished commands: %s", exc)
            return
        if forgotten:
            log.info("forgot %d finished command(s) older than %g days (store.ledger_days)", forgotten,
                     self.config.store.ledger_days)

    def _reload_model(self) -> None:
        """SIGHUP: re-read the config file; the worker swaps the model (and templates) between commands."""
        self._reload_requested.clear()
        if self._reload_config is None:
            return
        try:
            new = self._reload_config()
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded: %s", exc)
            self._event("error", "model_reload_failed", f"config not reloaded: {exc}")
            return
        old = self.config
        active = self.slots.active()
        adopt = str(new.model.path) != self.file.meta(CONFIG_MODEL_META) or active is None
        if not adopt:
            assert active is not None
            new = with_slot(new, active)  # `[model] path` unchanged: the active slot, with the new settings
        log.info("SIGHUP: reloading the model from %s", new.model.path)
        self.executor.reload_engine(EngineReload(
            load_new=lambda: self._engine_factory(new), load_old=lambda: self._engine_factory(old),
            done=lambda engine, error: self._engine_reloaded(new, engine, error, adopt)))

    def _engine_reloaded(self, new: AgentConfig, engine: TextEngine, error: Exception | None, adopt: bool) -> None:
        """On the worker thread, after a reload: announce the model now in force (status + event); a
        new `[model] path` becomes the active slot."""
        self.engine = engine
        if error is not None:
            log.error("model reload failed, still serving %s: %s", engine.info.name, error)
            self._event("error", "model_reload_failed", f"kept the previous model: {error}",
                        model_sha256=engine.info.sha256)
        else:
            self.config = self.config.model_copy(update={"model": new.model, "templates": new.templates})
            if adopt:
                self._adopt_config_model(new, engine)
            log.info("model reloaded: %s sha256 %s (%s)", engine.info.name, engine.info.sha256, engine.gpu_reason)
            self._event("info", "model_reloaded", f"now serving {engine.info.name}", model=engine.info.name,
                        model_sha256=engine.info.sha256, gpu=engine.gpu_reason)
        self.outbox.enqueue_status(self._status_payload())
        self.link.kick()

    def healthy(self) -> bool:
        """The watchdog is fed only while the worker thread and the link threads run."""
        return self.executor.alive() and self.link.alive()

    def _shutdown(self) -> int:
        log.info("stopping: finishing the running command, flushing the outbox")
        sd_notify("STOPPING=1")
        self.executor.stop(timeout_s=self.config.shutdown_timeout_s)
        if self.local_api is not None:  # after the executor: the running commands' callers get their answers
            self.local_api.stop()
        self.link.stop(drain_timeout_s=5.0)
        self.file.close()
        self.engine.close()
        log.info("stopped")
        return 0
