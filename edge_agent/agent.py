"""Wiring of the agent: store, engine, executor and link; intake of commands; status, telemetry,
signals and the systemd watchdog. Signal handlers only set a flag; the main thread does the rest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from autoglm_wire import __version__, lifecycle
from autoglm_wire.errors import Busy, ConfigError, InvalidCommand, ProtocolError, Unauthorized
from autoglm_wire.lifecycle import State
from autoglm_wire.mqtt_session import BrokerOptions
from autoglm_wire.protocol import (
    ChatParams,
    CompleteParams,
    ConfigParams,
    Event,
    ParsedCommand,
    Sampling,
    Status,
    Telemetry,
    format_ts,
    parse_command,
    to_bytes,
    utc_now,
)
from autoglm_wire.signing import CommandVerifier, VerifyPolicy, load_trusted_keys
from autoglm_wire.topics import DeviceTopics, group_cmd
from edge_agent import policy
from edge_agent.config import AgentConfig
from edge_agent.engine import EngineReload, TextEngine
from edge_agent.executor import IMMEDIATE_KINDS, Executor, Outcome, onnx_handlers
from edge_agent.link import InboundMessage, Link, LinkOptions
from edge_agent.notify import sd_notify, watchdog_interval_s
from edge_agent.store import OutboxLimits, ReplyDraft, Store, StoreError

log = logging.getLogger(__name__)

LEDGER_CHECK_S = 3600.0  # how often finished commands past `store.ledger_days` are forgotten (and at start)
EngineFactory = Callable[[AgentConfig], TextEngine]


def prompt_chars(params: object) -> int:
    """Characters of prompt text a command brings: the prompt, or every message and template variable."""
    if isinstance(params, CompleteParams):
        return len(params.prompt)
    if isinstance(params, ChatParams):
        return sum(len(m.content) for m in params.messages) + sum(len(v) for v in params.variables.values())
    return 0


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


class Agent:
    def __init__(self, config: AgentConfig, engine_factory: EngineFactory,
                 reload_config: Callable[[], AgentConfig] | None = None) -> None:
        self.config = config
        self.topics = DeviceTopics(config.mqtt.topic_prefix, config.device_id)
        limits = OutboxLimits(config.store.max_outbox_rows, config.store.max_outbox_bytes)
        self.store = Store(config.store.path, self.topics, config.store.synchronous, limits)
        self.engine = engine_factory(config)
        self._engine_factory = engine_factory
        self._reload_config = reload_config  # SIGHUP: re-read the config, reload the model
        self._reload_requested = threading.Event()
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        security = config.security
        self.verifier = CommandVerifier(VerifyPolicy(
            required=security.require_signed_commands, trusted=load_trusted_keys(security.trusted_keys),
            max_clock_skew_s=security.max_clock_skew_s, replay_window_s=security.replay_window_s))
        self.link = Link(
            options=self._link_options(),
            subscriptions=[self.topics.cmd] + [group_cmd(config.mqtt.topic_prefix, g) for g in config.mqtt.groups],
            outbox=self.store,
            on_command=self.intake,
            status_topic=self.topics.status,
            status_payload=self._status_payload,
            offline_payload=to_bytes(Status(device_id=config.device_id, state="offline")),
        )
        self.executor = Executor(
            store=self.store,
            engine=self.engine,
            topics=self.topics,
            agent_version=__version__,
            publish_volatile=self.link.publish_volatile,
            on_stored=self.link.kick,
            stream_interval_s=config.mqtt.stream_interval_ms / 1000,
        )
        self.executor.handlers.update(onnx_handlers(config.onnx.models))
        self.policy = policy.initial(self.store.load_policy(), config.telemetry_interval_s)
        self.executor.policy = lambda: self.policy
        self.executor.handlers["config"] = self._config_command

    def _config_command(self, parsed: ParsedCommand, cancel: threading.Event) -> Outcome:
        """`config`: merge the partial policy, persist what was set, answer with the policy in force."""
        change = parsed.params
        assert isinstance(change, ConfigParams)
        if change.max_tokens is not None and change.max_tokens > self.config.limits.max_tokens:
            raise InvalidCommand(f"max_tokens {change.max_tokens} is above this device's cap "
                                 f"{self.config.limits.max_tokens} (limits.max_tokens)", parsed.id)
        self.store.save_policy({**self.store.load_policy(), **change.model_dump(exclude_none=True)})
        self.policy = policy.merge(self.policy, change)
        log.info("policy changed by command %s: %s", parsed.id, self.policy.model_dump())
        return Outcome(State.SUCCEEDED, self.policy.model_dump(), {})

    def _link_options(self) -> LinkOptions:
        """Broker options (the device id is the client id) plus the agent's will delay and window."""
        mqtt_cfg = self.config.mqtt
        broker = BrokerOptions.from_config(mqtt_cfg, self.config.reconnect, client_id=self.config.device_id)
        return LinkOptions(broker=broker, will_delay_s=mqtt_cfg.will_delay_s, inflight_window=mqtt_cfg.inflight_window)

    # --- intake (paho thread: store, then return so the link acks) -------------------------------

    def intake(self, message: InboundMessage) -> None:
        try:
            parsed = parse_command(message.payload, self.config.mqtt.max_payload_bytes, self.executor.kinds)
            self._authorize(parsed, message)
        except ProtocolError as exc:
            self._reject(exc, message)
            return
        expires_at = parsed.command.expires_at.timestamp() if parsed.command.expires_at else None
        if message.message_expiry_s is not None:
            by_broker = time.time() + message.message_expiry_s
            expires_at = by_broker if expires_at is None else min(expires_at, by_broker)
        # An idle worker starts the command now, while this commit stores it already `running`:
        # the generation does not wait for intake. Nothing of the run leaves the device before the
        # commit (and the fsync before any publish); a command not stored is dropped by the worker.
        # Not for a command that has expired (the worker answers `expired`), nor for a redelivery
        # of a known id (a look-up by primary key: it spares the worker a doomed prompt evaluation).
        early = None
        if (lifecycle.start_decision(expires_at, time.time()) is not State.EXPIRED
                and not self.store.known(parsed.id)):
            early = self.executor.start_early(parsed)
        try:
            intake = self.store.accept(
                parsed.id, parsed.kind, message.payload.decode("utf-8"), parsed.command.priority, expires_at,
                message.response_topic, message.correlation_data, claim=early is not None,
            )
        except BaseException as exc:
            if early is not None:
                early.drop()
            if not isinstance(exc, Busy):
                raise
            self._reject(exc, message)  # the outbox is at its cap: refuse new work rather than lose its reply
            return
        if early is not None:  # decided before anything else can raise: the worker waits for it
            if intake.command is None:
                early.drop()
            else:
                early.stored(intake.command)
        self.link.kick()
        if intake.duplicate:
            log.info("duplicate delivery of command %s (state %s); re-sent its last reply", parsed.id, intake.state)
            return
        assert intake.command is not None
        if early is not None:
            return  # the worker is already running it
        if parsed.kind in IMMEDIATE_KINDS:
            self.executor.run(intake.command, parsed)
        else:
            self.executor.submit(intake.command, parsed)

    def _check_target(self, parsed: ParsedCommand) -> None:
        target = parsed.command.target
        allowed = {self.config.device_id} | {f"group/{g}" for g in self.config.mqtt.groups}
        if target is not None and target not in allowed:
            raise Unauthorized(f"command targets {target!r}, not this device ({self.config.device_id})", parsed.id)

    def _authorize(self, parsed: ParsedCommand, message: InboundMessage) -> None:
        """Target, signature and age, reply topic, limits: raises the ProtocolError to reject with."""
        self._check_target(parsed)
        if self.verifier.enabled:
            key_id = self.verifier.check(json.loads(message.payload), parsed.command.created_at, utc_now())
            log.debug("command %s: signature key %s", parsed.id, key_id)
        if not self._response_topic_allowed(message.response_topic):
            raise Unauthorized(f"ResponseTopic {message.response_topic!r} is outside this device's reply tree "
                               f"({self.topics.reply}/...) and security.response_topic_prefixes", parsed.id)
        self._check_limits(parsed)

    def _response_topic_allowed(self, topic: str | None) -> bool:
        """A command may send its replies to `P/D/reply` or below it, or under a configured prefix."""
        if topic is None:
            return True
        if any(c in topic for c in "+#\0"):
            return False
        own = self.topics.reply
        return topic == own or topic.startswith(own + "/") or any(
            topic.startswith(prefix) for prefix in self.config.security.response_topic_prefixes)

    def _check_limits(self, parsed: ParsedCommand) -> None:
        """`[limits]`: prompt length and max_tokens; a command asking for more is rejected, not trimmed."""
        limits, params = self.config.limits, parsed.params
        if isinstance(params, Sampling) and params.max_tokens > limits.max_tokens:
            raise InvalidCommand(f"max_tokens {params.max_tokens} is above this device's limit "
                                 f"{limits.max_tokens} (limits.max_tokens)", parsed.id)
        chars = prompt_chars(params)
        if chars > limits.max_prompt_chars:
            raise InvalidCommand(f"the prompt is {chars} characters; this device accepts at most "
                                 f"{limits.max_prompt_chars} (limits.max_prompt_chars)", parsed.id)

    def _reject(self, exc: ProtocolError, message: InboundMessage) -> None:
        log.warning("rejected a payload on %s: %s: %s", message.topic, exc.code, exc.message)
        event = Event(
            device_id=self.config.device_id, ts=format_ts(utc_now()), level="warning", code="command_rejected",
            message=exc.message, data={"error_code": exc.code.value, "command_id": exc.command_id,
                                       "topic": message.topic, "bytes": len(message.payload)},
        )
        response_topic = message.response_topic if self._response_topic_allowed(message.response_topic) else None
        self.store.reject(exc.command_id, ReplyDraft.failure("rejected", exc), event,
                          response_topic, message.correlation_data)
        self.link.kick()

    # --- status and telemetry --------------------------------------------------------------------

    def _status_payload(self) -> bytes:
        status = Status(
            device_id=self.config.device_id, state="online", ts=format_ts(utc_now()), agent_version=__version__,
            model=self.engine.info, kinds=sorted(self.executor.kinds), groups=list(self.config.mqtt.groups),
        )
        return to_bytes(status)

    def telemetry(self) -> Telemetry:
        rows, size = self.store.outbox_depth()
        return Telemetry(
            device_id=self.config.device_id, ts=format_ts(utc_now()),
            queue_depth=self.store.count_in_state("accepted"), outbox_depth=rows, outbox_bytes=size,
            tokens_per_s_ewma=self.executor.tokens_per_s_ewma, rss_mb=round(rss_mb(), 1),
            gpu_layers=self.engine.info.n_gpu_layers, uptime_s=round(time.monotonic() - self.started_at, 1),
            dropped=dict(self.store.dropped),
        )

    def _event(self, level: str, code: str, message: str, **data: object) -> None:
        self.store.enqueue_event(Event(device_id=self.config.device_id, ts=format_ts(utc_now()),
                                       level=level, code=code, message=message, data=data))  # type: ignore[arg-type]

    # --- main loop -------------------------------------------------------------------------------

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; drain and return 0."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, lambda signum, frame: self._reload_requested.set())
        if self.store.quarantined is not None:
            self._event("error", "store_quarantined", "the SQLite store failed its integrity check and was "
                        "replaced by a fresh one", quarantined_as=str(self.store.quarantined))
        recovered = self.executor.recover()
        self._event("info", "agent_started", f"agent {__version__} started", recovered_running=recovered,
                    model=self.engine.info.name, model_sha256=self.engine.info.sha256,
                    gpu=self.engine.gpu_reason)
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
            forgotten = self.store.forget_finished(time.time() - self.config.store.ledger_days * 86400)
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
        log.info("SIGHUP: reloading the model from %s", new.model.path)
        self.executor.reload_engine(EngineReload(load_new=lambda: self._engine_factory(new),
                                                 load_old=lambda: self._engine_factory(old),
                                                 done=lambda engine, error: self._engine_reloaded(new, engine, error)))

    def _engine_reloaded(self, new: AgentConfig, engine: TextEngine, error: Exception | None) -> None:
        """On the worker thread, after a reload: announce the model now in force (status + event)."""
        self.engine = engine
        if error is not None:
            log.error("model reload failed, still serving %s: %s", engine.info.name, error)
            self._event("error", "model_reload_failed", f"kept the previous model: {error}",
                        model_sha256=engine.info.sha256)
        else:
            self.config = self.config.model_copy(update={"model": new.model, "templates": new.templates})
            log.info("model reloaded: %s sha256 %s (%s)", engine.info.name, engine.info.sha256, engine.gpu_reason)
            self._event("info", "model_reloaded", f"now serving {engine.info.name}", model=engine.info.name,
                        model_sha256=engine.info.sha256, gpu=engine.gpu_reason)
        self.store.enqueue_status(self._status_payload())
        self.link.kick()

    def healthy(self) -> bool:
        """The watchdog is fed only while the worker thread and the link threads run."""
        return self.executor.alive() and self.link.alive()

    def _shutdown(self) -> int:
        log.info("stopping: finishing the running command, flushing the outbox")
        sd_notify("STOPPING=1")
        self.executor.stop(timeout_s=self.config.shutdown_timeout_s)
        self.link.stop(drain_timeout_s=5.0)
        self.store.close()
        self.engine.close()
        log.info("stopped")
        return 0
