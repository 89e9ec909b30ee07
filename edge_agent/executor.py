"""The executor: worker threads (one, or `model.parallel` to feed the batched engine) that run stored
commands through a table of handlers by kind, and one thread for the commands that must not wait
behind them (`cancel`). Every state change goes through the inbox with the reply announcing it;
`lifecycle` says which changes are legal, so two threads never run or finish one command twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from autoglm_wire import lifecycle
from autoglm_wire.errors import Cancelled, Expired, Internal, InvalidCommand, ProtocolError
from autoglm_wire.lifecycle import State
from autoglm_wire.local_origin import is_local_id, local_marks
from autoglm_wire.protocol import (
    CancelParams,
    ChatParams,
    CompleteParams,
    ErrorInfo,
    OnnxParams,
    ParsedCommand,
    Sampling,
    parse_command,
)
from autoglm_wire.topics import DeviceTopics
from edge_agent import checkpoints
from edge_agent.engine import EngineSwap, Generation, TextEngine
from edge_agent.engine.onnx import OnnxModels
from edge_agent.engine.settings import OnnxModelConfig
from edge_agent.engine.stream import ChunkStreamer
from edge_agent.inbox import Inbox, StoredCommand
from edge_agent.outbox import ReplyDraft
from edge_agent.policy import Policy, apply_defaults
from edge_agent.sqlite_file import StoreUnavailable

log = logging.getLogger(__name__)

# Run at once on the executor's `immediate` thread, not behind a running generation; never on the
# link's network thread, which a store that cannot write (disk full) would then block.
IMMEDIATE_KINDS = frozenset({"cancel"})
# Kinds whose handlers do nothing but compute their output: an idle worker may start them while
# intake is still storing them (`Executor.start_early`). Not `config` (it writes the policy).
EARLY_KINDS = frozenset({"ping", "chat", "complete", "onnx"})
EARLY_DECISION_S = 30.0  # how often an early start still waiting for intake's decision is logged


@dataclass(frozen=True)
class Outcome:
    """What a handler produced: the terminal state plus the reply's output, error and metrics."""

    state: State
    output: dict[str, Any] | None
    metrics: dict[str, Any]
    error: ProtocolError | None = None
    deferred: bool = False  # the handler goes on in the background and calls `Executor.finish` later


DEFERRED = Outcome(State.RUNNING, None, {}, deferred=True)


Handler = Callable[[ParsedCommand, threading.Event], Outcome]


class EarlyStart:
    """A command the idle worker starts while intake is still storing it (`Executor.start_early`),
    so the intake commit overlaps the prompt evaluation instead of preceding it. Nothing of the run
    leaves the device before intake reports the command stored and claimed (`stored`); if it was
    not stored (duplicate delivery, outbox full, store error: `drop`), the generation is cancelled
    and its output discarded, never published."""

    def __init__(self, parsed: ParsedCommand) -> None:
        self.parsed = parsed
        self.cancel = threading.Event()
        self._command: StoredCommand | None = None
        self._decided = threading.Event()

    def stored(self, command: StoredCommand) -> None:
        """Intake committed the command, already `running` (`Inbox.accept(claim=True)`)."""
        self._command = command
        self._decided.set()

    def drop(self) -> None:
        """Intake did not store the command: cancel the run, discard its output."""
        self.cancel.set()
        self._decided.set()

    def wait(self) -> StoredCommand | None:
        """The stored command once intake decided; None if it was dropped. Intake decides on every
        path right after its commit, so this waits as long as the commit takes (a slow disk): giving
        up would leave a command stored `running` with nobody to finish it."""
        while not self._decided.wait(EARLY_DECISION_S):
            log.warning("command %s started early; intake has not reported for %.0f s whether it was stored "
                        "(a slow or stalled disk?); still waiting", self.parsed.id, EARLY_DECISION_S)
        return self._command


class Executor:
    def __init__(
        self,
        inbox: Inbox,
        sync_to_disk: Callable[[], None],
        engine: TextEngine,
        topics: DeviceTopics,
        agent_version: str,
        publish_volatile: Callable[[str, bytes], None],
        on_stored: Callable[[], None],
        stream_interval_s: float,
        workers: int = 1,
    ) -> None:
        # the ledger, the SQLite file's fsync barrier, and who to wake when a reply is stored
        self._inbox, self._sync_to_disk, self._on_stored = inbox, sync_to_disk, on_stored
        self._engine = engine
        self._topics = topics
        self._agent_version = agent_version
        # stream chunks: QoS 0, not stored, coalesced over this interval
        self._publish_volatile, self._stream_interval_s = publish_volatile, stream_interval_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a worker's run ended, or an engine swap did
        self._workers = workers  # each runs one command at a time; the engine decodes them together
        # The workers' commands and their cancel events, set before their claim (or, started early,
        # before intake stores them): a cancel that finds one `running` in the ledger finds it here.
        self._running: dict[str, threading.Event] = {}
        self._immediate: queue.SimpleQueue[tuple[StoredCommand, ParsedCommand]] = queue.SimpleQueue()
        self._idle: set[str] = set()  # workers that found nothing to run and wait: `submit` may hand one a command
        self._handoff: tuple[StoredCommand, ParsedCommand] | EarlyStart | None = None
        self._local = threading.local()  # `early`: the worker's current run, when it was started early
        self._busy = 0  # workers running a command
        self._reloads: deque[EngineSwap] = deque()  # engine swaps waiting for the running commands to end
        self._swapping = False
        self._threads: list[threading.Thread] = []
        self.tokens_per_s_ewma: float | None = None
        self.local_delta: Callable[[str], Callable[[str], None] | None] = lambda command_id: None  # local API
        self.policy: Callable[[], Policy] = Policy  # the agent points this at the policy in force
        self.handlers: dict[str, Handler] = {
            "ping": self._ping,
            "chat": self._chat,
            "complete": self._complete,
            "cancel": self._cancel,
        }

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.handlers)

    # --- lifecycle of the worker -----------------------------------------------------------------

    def recover(self, resolve: Callable[[StoredCommand], Outcome | None] = lambda command: None) -> int:
        """Give every command left `running` by a crash its terminal reply. Returns how many.
        `resolve` may answer one itself (a `model` command: from the activation journal)."""
        interrupted = self._inbox.in_state(State.RUNNING)
        for command in interrupted:
            error = Internal(
                "the agent stopped while this command was running (crash or power loss); it was not run "
                "again. Send it with a new id to retry", command.id)
            self._finish(command.id, resolve(command) or Outcome(State.FAILED, None, {}, error))
        return len(interrupted)

    def start(self) -> None:
        workers = [(f"executor-{i}", self._run_worker) for i in range(self._workers)]
        for name, target in [*workers, ("executor-immediate", self._run_immediate_worker)]:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def start_early(self, parsed: ParsedCommand) -> EarlyStart | None:
        """Before intake stores a command of EARLY_KINDS: if the worker is idle, it starts running
        the command now. The caller then stores it claimed (`Inbox.accept(claim=True)`) and must
        call `stored` or `drop` on the returned EarlyStart. None: the worker is busy (or
        stopping); store the command as usual and `submit` it."""
        if parsed.kind not in EARLY_KINDS:
            return None
        with self._lock:
            if not self._idle or self._handoff is not None or self._stopping.is_set():
                return None
            early = EarlyStart(parsed)
            self._handoff = early
            self._running[parsed.id] = early.cancel
            self._idle.pop()
        self._wake.set()
        return early

    def submit(self, command: StoredCommand, parsed: ParsedCommand) -> None:
        """A command was just accepted: hand it (already parsed) straight to an idle worker, which
        then skips the ledger query and the re-parse; a busy worker finds it in the ledger later.
        Either way the worker claims it from the ledger, so nothing can run it twice."""
        with self._lock:
            if self._idle and self._handoff is None:
                self._handoff = (command, parsed)
                self._idle.pop()
        self._wake.set()

    def run_immediate(self, command: StoredCommand, parsed: ParsedCommand) -> None:
        """A command of IMMEDIATE_KINDS was just accepted: run it now on the immediate thread (the
        caller, the link's network thread, returns at once)."""
        self._immediate.put((command, parsed))

    def alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def stop(self, timeout_s: float) -> None:
        """Finish the running commands (cancel them after `timeout_s`); queued ones stay stored."""
        self._stopping.set()
        self._wake.set()
        if not self._threads:
            return
        *workers, immediate = self._threads
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in workers):
            self._cancel_running("the agent is shutting down")
            for worker in workers:
                worker.join(10.0)
        immediate.join(10.0)

    @property
    def engine(self) -> TextEngine:
        return self._engine

    def reload_engine(self, reload: EngineSwap) -> None:
        """Swap the text engine between commands, on a worker thread once no worker runs one
        (swaps asked for meanwhile run one after the other, in order)."""
        with self._lock:
            self._reloads.append(reload)
        self._wake.set()

    def _reload_if_requested(self) -> None:
        """Wait while a reload waits for running commands or another worker swaps; then swap if asked."""
        with self._changed:
            while self._swapping or (self._reloads and self._busy):
                self._changed.wait()
            reload = self._reloads.popleft() if self._reloads else None
            self._swapping = reload is not None
        if reload is None:
            return
        try:
            self._engine = reload.swap(self._engine)
        finally:
            with self._changed:
                self._swapping = False
                self._changed.notify_all()

    def _run_worker(self) -> None:
        while not self._stopping.is_set() or isinstance(self._handoff, EarlyStart):  # it is claimed: finish it
            self._reload_if_requested()
            work = self._next_command()
            if work is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                if isinstance(work, EarlyStart):
                    self._run_early(work)
                else:
                    self.run(*work)
            except Exception:
                log.exception("executor failed on command %s; the worker goes on in 1 s",
                              work.parsed.id if isinstance(work, EarlyStart) else work[0].id)
                self._stopping.wait(1.0)  # a store that cannot write (disk full) must not spin the worker
            finally:
                with self._changed:
                    self._busy -= 1
                    self._changed.notify_all()

    def _run_immediate_worker(self) -> None:
        while not self._stopping.is_set():
            try:
                command, parsed = self._immediate.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                self.run(command, parsed)
            except Exception:
                log.exception("executor failed on command %s", command.id)

    def _next_command(self) -> tuple[StoredCommand, ParsedCommand | None] | EarlyStart | None:
        """What `start_early` or `submit` handed over, else the ledger's next runnable command;
        when there is none the worker is marked idle (unless a wake-up is already pending). Nothing
        new starts while a reload waits for the running commands to end."""
        me = threading.current_thread().name
        with self._lock:
            self._idle.discard(me)
            if self._reloads:
                return None
            handoff, self._handoff = self._handoff, None
            self._busy += 1
        if handoff is not None:
            return handoff
        command = self._inbox.next_runnable()
        if command is None:
            with self._changed:
                self._busy -= 1
                self._changed.notify_all()
                if self._handoff is None and not self._wake.is_set():
                    self._idle.add(me)
            return None
        return command, None

    # --- running one command ---------------------------------------------------------------------

    def run(self, command: StoredCommand, parsed: ParsedCommand | None = None) -> None:
        """Run one accepted command to its terminal state (no-op if another thread claimed it).

        Commands of IMMEDIATE_KINDS run on the immediate thread while the worker is busy; only the
        worker's command is the `running` one that a cancel can stop. `parsed` saves re-parsing
        the stored payload when the caller has just parsed it.
        """
        if lifecycle.start_decision(command.expires_at, time.time()) is State.EXPIRED:
            error = Expired("the command expired before the device could run it", command.id)
            self._finish(command.id, Outcome(State.EXPIRED, None, {}, error))
            return
        tracked = command.kind not in IMMEDIATE_KINDS
        cancel = threading.Event()
        if tracked:
            with self._lock:
                self._running[command.id] = cancel
        try:
            ran = self._claim_and_execute(command, parsed, cancel)
        finally:
            if tracked:
                with self._lock:
                    self._running.pop(command.id, None)
        if ran is not None and not ran[0].deferred:
            outcome, queue_ms = ran
            self._finish(command.id, outcome, {"queue_ms": queue_ms})

    def finish(self, command_id: str, outcome: Outcome) -> None:
        """The terminal reply of a command whose handler answered DEFERRED (any thread)."""
        self._finish(command_id, outcome)

    def _claim_and_execute(self, command: StoredCommand, parsed: ParsedCommand | None,
                           cancel: threading.Event) -> tuple[Outcome, float] | None:
        """Claim the command and run its handler: its outcome and how long it queued (ms); None if
        it was no longer `accepted`."""
        claimed = self._inbox.claim(command.id)
        self._on_stored()
        if not claimed:
            return None
        checkpoints.reached("command_running")
        queue_ms = round((time.time() - command.received_at) * 1000.0, 3)
        if parsed is None:
            try:
                parsed = parse_command(command.payload.encode("utf-8"), max_bytes=1 << 30, kinds=self.kinds)
            except ProtocolError as exc:
                exc.command_id = command.id
                return Outcome(State.FAILED, None, {}, exc), queue_ms
        return self._execute(parsed, cancel), queue_ms

    def _run_early(self, early: EarlyStart) -> None:
        """Run a command intake is still storing; finish it once intake says it was stored, drop
        it if not. Its `queue_ms` is 0: it started before it was stored."""
        self._local.early = early
        try:
            outcome = self._execute(early.parsed, early.cancel)
        finally:
            self._local.early = None
            with self._lock:
                self._running.pop(early.parsed.id, None)
        command = early.wait()
        if command is None:
            log.info("dropped the early start of command %s: intake did not store it (a duplicate delivery, a "
                     "full outbox or a store error; see the intake's log line)", early.parsed.id)
            return
        checkpoints.reached("command_running")
        self._finish(command.id, outcome, {"queue_ms": 0.0})

    def _execute(self, parsed: ParsedCommand, cancel: threading.Event) -> Outcome:
        """The handler's outcome; errors become failed/cancelled outcomes. A cancel that came
        between the claim and now stops it before the handler starts."""
        if cancel.is_set():
            return Outcome(State.CANCELLED, None, {}, Cancelled("cancelled before it started", parsed.id))
        try:
            if isinstance(parsed.params, Sampling):  # sampling fields left out take the device policy
                parsed = parsed.model_copy(update={"params": apply_defaults(parsed.params, self.policy())})
            return self.handlers[parsed.kind](parsed, cancel)
        except ProtocolError as exc:
            exc.command_id = parsed.id
            state = State.CANCELLED if isinstance(exc, Cancelled) else State.FAILED
            return Outcome(state, None, {}, exc)
        except Exception as exc:
            log.exception("command %s failed unexpectedly", parsed.id)
            return Outcome(State.FAILED, None, {}, Internal(f"unexpected error: {exc!r}", parsed.id))

    def _finish(self, command_id: str, outcome: Outcome, extra_metrics: dict[str, Any] | None = None) -> None:
        error = outcome.error
        stored = self._inbox.get(command_id) if is_local_id(command_id) else None
        if stored is not None:  # a local API command: the cloud learns where it came from
            extra_metrics = {**(extra_metrics or {}), **local_marks(stored.kind)}
        draft = ReplyDraft(
            status=lifecycle.reply_status(outcome.state),
            output=outcome.output,
            error=ErrorInfo(code=error.code, message=error.message) if error else None,
            metrics={**(extra_metrics or {}), **outcome.metrics},
        )
        self._store_until_written(command_id, outcome.state, draft)
        checkpoints.reached("reply_stored")
        self._on_stored()

    def _store_until_written(self, command_id: str, state: State, draft: ReplyDraft) -> None:
        """A terminal reply is never dropped: while the disk is full, keep it and retry (until stop;
        then the command stays `running` and the restart's recovery gives it `failed`/`internal`)."""
        delay = 0.5
        while True:
            try:
                self._inbox.transition(command_id, state, draft)
                return
            except StoreUnavailable as exc:
                log.error("cannot store the %s reply of %s: %s; retrying in %.0f s", state, command_id, exc, delay)
                if self._stopping.wait(delay):
                    raise
                delay = min(delay * 2, 30.0)

    def _cancel_running(self, reason: str, target: str | None = None) -> bool:
        """Cancel the running command `target` (every running one if None); False if none was running."""
        with self._lock:
            targets = [target] if target is not None and target in self._running else (
                list(self._running) if target is None else [])
            for command_id in targets:
                log.info("cancelling running command %s: %s", command_id, reason)
                self._running[command_id].set()
            return bool(targets)

    # --- handlers --------------------------------------------------------------------------------

    def _ping(self, parsed: ParsedCommand, cancel: threading.Event) -> Outcome:
        output = {"pong": True, "agent_version": self._agent_version, "model": self._engine.info.name}
        return Outcome(State.SUCCEEDED, output, {})

    def _chat(self, parsed: ParsedCommand, cancel: threading.Event) -> Outcome:
        params = parsed.params
        assert isinstance(params, ChatParams)
        return self._text(parsed, lambda on_delta: self._engine.chat(params, on_delta, cancel))

    def _complete(self, parsed: ParsedCommand, cancel: threading.Event) -> Outcome:
        params = parsed.params
        assert isinstance(params, CompleteParams)
        return self._text(parsed, lambda on_delta: self._engine.complete(params, on_delta, cancel))

    def _text(self, parsed: ParsedCommand,
              generate: Callable[[Callable[[str], None] | None], Generation]) -> Outcome:
        params = parsed.params
        assert isinstance(params, ChatParams | CompleteParams)
        streamer = ChunkStreamer(self._topics.stream(parsed.id), parsed.id, self._publish_after_sync,
                                self._stream_interval_s)
        generation = generate(_both(streamer.delta if params.stream else None, self.local_delta(parsed.id)))
        if params.stream:
            streamer.done()
        self._record_speed(generation)
        output = {
            "text": generation.text,
            "finish_reason": generation.finish_reason,
            "usage": {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens},
        }
        metrics = {
            "ttft_ms": round(generation.ttft_ms, 3),
            "total_ms": round(generation.total_ms, 3),
            "tokens_per_s": round(generation.tokens_per_s, 3),
            "provenance": {
                "model_sha256": self._engine.info.sha256,
                "model": self._engine.info.name,
                "sampling": {"temperature": params.temperature, "top_p": params.top_p,
                             "max_tokens": params.max_tokens, "stop": params.stop},
                "seed": generation.seed,
            },
        }
        if generation.finish_reason == "cancelled":
            return Outcome(State.CANCELLED, output, metrics, Cancelled("generation was cancelled", parsed.id))
        return Outcome(State.SUCCEEDED, output, metrics)

    def _publish_after_sync(self, topic: str, payload: bytes) -> None:
        """Stream chunks show that a command ran: its claim must be on disk first (Inbox.claim);
        a run started early waits for intake's commit (long done by the first token, normally)
        and publishes nothing if the command was not stored."""
        early = getattr(self._local, "early", None)
        if early is not None and early.wait() is None:
            return
        self._sync_to_disk()
        self._publish_volatile(topic, payload)

    def _cancel(self, parsed: ParsedCommand, cancel: threading.Event) -> Outcome:
        params = parsed.params
        assert isinstance(params, CancelParams)
        target = self._inbox.get(params.target)
        if target is None:
            raise InvalidCommand(f"no command {params.target!r} on this device to cancel")
        before = target.state
        error = ErrorInfo(code=Cancelled.code, message=f"cancelled by command {parsed.id} before it ran")
        draft = ReplyDraft(status="cancelled", error=error)
        if before == State.ACCEPTED and self._inbox.transition(params.target, State.CANCELLED, draft,
                                                               only_from={State.ACCEPTED}):
            self._on_stored()
            after = State.CANCELLED
        elif before in (State.ACCEPTED, State.RUNNING) and self._cancel_running(f"cancel command {parsed.id}",
                                                                                 params.target):
            after = "cancelling"  # running, or claimed by the worker since `before` was read
        else:
            after = self._state_of(params.target)
        output = {"target": params.target, "previous_state": str(before), "state": str(after)}
        return Outcome(State.SUCCEEDED, output, {})

    def _state_of(self, command_id: str) -> str:
        command = self._inbox.get(command_id)
        return command.state if command else "unknown"

    def _record_speed(self, generation: Generation) -> None:
        if generation.tokens_per_s <= 0:
            return
        previous = self.tokens_per_s_ewma
        self.tokens_per_s_ewma = generation.tokens_per_s if previous is None else (
            0.8 * previous + 0.2 * generation.tokens_per_s)


def _both(first: Callable[[str], None] | None, second: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """One delta callback feeding the MQTT stream and a waiting local API call (either may be absent)."""
    if first is None or second is None:
        return first or second

    def delta(text: str) -> None:
        first(text)
        second(text)
    return delta


def onnx_handlers(configs: Mapping[str, OnnxModelConfig]) -> dict[str, Handler]:
    """{"onnx": handler} when ONNX models are configured, else {} (the kind is then not served)."""
    if not configs:
        return {}
    models = OnnxModels(configs)

    def handle(parsed: ParsedCommand, cancel: threading.Event) -> Outcome:
        assert isinstance(parsed.params, OnnxParams)
        return Outcome(State.SUCCEEDED, models.run(parsed.params), {})

    return {"onnx": handle}
