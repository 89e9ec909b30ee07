"""The executor's worker on the in-memory inbox (MemoryInbox; the SQLite inbox has its own tests on a
real file), with a scripted stand-in for the text engine (the real engine is exercised in
tests/integration): hand-over to an idle worker, claim-once, and the durability barrier before
stream chunks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from autoglm_wire.protocol import ChatParams, CompleteParams, ModelInfo, ParsedCommand, parse_command
from autoglm_wire.topics import DeviceTopics
from edge_agent import executor as executor_module
from edge_agent.engine import Generation, OnDelta
from edge_agent.executor import Executor
from edge_agent.inbox import MemoryInbox, StoredCommand
from edge_agent.outbox import MemoryOutbox

TOPICS = DeviceTopics("autoglm", "d1")
KINDS = frozenset({"ping", "chat", "complete", "cancel"})


class ScriptedEngine:
    """Emits the prompt's words as deltas; counts its calls; can be held until released."""

    info = ModelInfo(name="scripted", sha256="0" * 64, arch="none", quant="none", n_gpu_layers=0)
    gpu_reason = "no GPU"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()
        self.release.set()

    def complete(self, params: CompleteParams, on_delta: OnDelta | None, cancel: threading.Event) -> Generation:
        self.calls.append(params.prompt)
        self.release.wait(10)
        words = params.prompt.split()
        for word in words:
            if on_delta is not None:
                on_delta(word)
        return Generation(text=" ".join(words), finish_reason="stop", prompt_tokens=len(words),
                          completion_tokens=len(words), ttft_ms=1.0, total_ms=2.0, seed=1)

    def chat(self, params: ChatParams, on_delta: OnDelta | None, cancel: threading.Event) -> Generation:
        raise NotImplementedError

    def close(self) -> None:
        pass


def complete(prompt: str, command_id: str, priority: int = 0, stream: bool = False) -> ParsedCommand:
    raw = json.dumps({"v": 1, "id": command_id, "kind": "complete", "priority": priority,
                      "created_at": "2026-11-21T10:00:00Z", "params": {"prompt": prompt, "stream": stream}})
    return parse_command(raw.encode(), 1 << 20, KINDS)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Rig:
    def __init__(self) -> None:
        self.outbox = MemoryOutbox(TOPICS)
        self.inbox = MemoryInbox(self.outbox)
        self.engine = ScriptedEngine()
        self.published: list[tuple[str, bytes]] = []
        self.events: list[str] = []  # "sync" and "publish", in order
        self.executor = Executor(self.inbox, lambda: self.events.append("sync"), self.engine, TOPICS, "test",
                                 self._publish, on_stored=lambda: None, stream_interval_s=0.05)

    def _publish(self, topic: str, payload: bytes) -> None:
        self.events.append("publish")
        self.published.append((topic, payload))

    def send(self, prompt: str, command_id: str, priority: int = 0, stream: bool = False,
             early: bool = False) -> None:
        """As the agent's intake does; `early`: let an idle worker start before the command is
        stored (then stored already claimed)."""
        parsed = complete(prompt, command_id, priority, stream)
        started = self.executor.start_early(parsed) if early else None
        intake = self.inbox.accept(command_id, "complete", parsed.command.model_dump_json(), priority, None,
                                   claim=started is not None)
        assert intake.command is not None
        if started is not None:
            started.stored(intake.command)
        else:
            self.executor.submit(intake.command, parsed)

    def wait_idle(self) -> None:
        wait_until(lambda: self.executor._idle, "the worker to go idle")

    def store_claimed(self, parsed: ParsedCommand) -> StoredCommand:
        intake = self.inbox.accept(parsed.id, parsed.kind, parsed.command.model_dump_json(), 0, None, claim=True)
        assert intake.command is not None and intake.command.state == "running"
        return intake.command

    def wait_state(self, command_id: str, state: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stored = self.inbox.get(command_id)
            if stored is not None and stored.state == state:
                return
            time.sleep(0.005)
        raise AssertionError(f"{command_id} never reached {state}")

    def statuses(self) -> list[tuple[str, str, int]]:
        bodies = [json.loads(r.payload) for r in self.outbox.pending(0, 1000) if r.topic == TOPICS.reply]
        return [(b["command_id"], b["status"], b["seq"]) for b in bodies]


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    made.executor.start()
    yield made
    made.engine.release.set()
    made.executor.stop(5.0)


def test_a_command_submitted_to_the_idle_worker_runs_once_with_its_replies_in_seq_order(rig: Rig) -> None:
    rig.send("hello there", "c1")
    rig.wait_state("c1", "succeeded")
    assert rig.engine.calls == ["hello there"]
    statuses = rig.statuses()
    assert [s for _, s, _ in statuses] == ["accepted", "running", "succeeded"]
    assert [q for _, _, q in statuses] == sorted(q for _, _, q in statuses)


def test_a_command_run_again_after_its_claim_is_not_executed_twice(rig: Rig) -> None:
    rig.send("once", "c1")
    rig.wait_state("c1", "succeeded")
    stored = rig.inbox.get("c1")
    assert stored is not None
    rig.executor.run(stored)
    assert rig.engine.calls == ["once"]


def test_commands_submitted_while_the_worker_is_busy_run_after_it_by_priority(rig: Rig) -> None:
    rig.engine.release.clear()
    rig.send("first", "c1")
    rig.wait_state("c1", "running")
    rig.send("low", "c2", priority=0)
    rig.send("high", "c3", priority=5)
    rig.engine.release.set()
    for command_id in ("c1", "c2", "c3"):
        rig.wait_state(command_id, "succeeded")
    assert rig.engine.calls == ["first", "high", "low"]


def test_an_idle_worker_starts_a_command_before_it_is_stored_and_finishes_it_once_stored(rig: Rig) -> None:
    rig.wait_idle()
    claims: list[str] = []
    real_claim = rig.inbox.claim
    rig.inbox.claim = lambda command_id: claims.append(command_id) or real_claim(command_id)  # type: ignore[method-assign]
    parsed = complete("hello there", "c1", stream=True)
    early = rig.executor.start_early(parsed)
    assert early is not None
    wait_until(lambda: rig.engine.calls == ["hello there"], "the engine to start before the command is stored")
    time.sleep(0.05)
    assert rig.published == [] and rig.inbox.get("c1") is None, "nothing leaves before the command is stored"
    early.stored(rig.store_claimed(parsed))
    rig.wait_state("c1", "succeeded")
    assert claims == [], "intake's commit claimed it: the worker does not claim again"
    assert [s for _, s, _ in rig.statuses()] == ["accepted", "running", "succeeded"]
    assert rig.events[0] == "sync", "the intake commit is synced before the first chunk"
    chunks = [json.loads(p) for t, p in rig.published if t == TOPICS.stream("c1")]
    assert "".join(c["delta"] for c in chunks) == "hellothere"
    reply = json.loads([r.payload for r in rig.outbox.pending(0, 100) if r.topic == TOPICS.reply][-1])
    assert reply["metrics"]["queue_ms"] == 0.0


def test_an_early_start_that_intake_drops_publishes_nothing_and_the_worker_serves_on(rig: Rig) -> None:
    rig.wait_idle()
    early = rig.executor.start_early(complete("never shown", "c1", stream=True))
    assert early is not None
    wait_until(lambda: rig.engine.calls == ["never shown"], "the early start")
    early.drop()  # e.g. a duplicate delivery: intake found the id in the ledger
    assert early.cancel.is_set(), "the generation is told to stop"
    rig.wait_idle()
    assert rig.published == [] and rig.statuses() == []
    rig.send("next one", "c2", early=True)
    rig.wait_state("c2", "succeeded")
    assert rig.engine.calls == ["never shown", "next one"]


def test_a_busy_worker_or_a_kind_with_side_effects_is_not_started_early(rig: Rig) -> None:
    rig.wait_idle()
    config = parse_command(json.dumps({"v": 1, "id": "k1", "kind": "config", "params": {},
                                       "created_at": "2026-11-21T10:00:00Z"}).encode(), 1 << 20,
                           KINDS | {"config"})
    assert rig.executor.start_early(config) is None, "config writes the policy: only after it is stored"
    rig.engine.release.clear()
    rig.send("first", "c1", early=True)
    rig.wait_state("c1", "running")
    assert rig.executor.start_early(complete("second", "c2")) is None, "the worker is busy"
    rig.send("second", "c2", early=True)  # stored `accepted`, claimed by the worker after c1
    assert rig.inbox.get("c2").state == "accepted"  # type: ignore[union-attr]
    rig.engine.release.set()
    rig.wait_state("c2", "succeeded")
    assert rig.engine.calls == ["first", "second"]


def test_an_early_start_still_finishes_when_the_agent_stops_before_intake_stored_it(rig: Rig) -> None:
    rig.wait_idle()
    parsed = complete("late one", "c1")
    early = rig.executor.start_early(parsed)
    assert early is not None
    stopper = threading.Thread(target=rig.executor.stop, args=(5.0,))
    stopper.start()
    time.sleep(0.05)
    assert rig.executor.alive(), "the worker waits for intake's answer"
    assert rig.executor.start_early(complete("later", "c2")) is None, "nothing starts once stopping"
    early.stored(rig.store_claimed(parsed))
    stopper.join(10)
    assert rig.engine.calls == ["late one"] and rig.inbox.get("c1").state == "succeeded"  # type: ignore[union-attr]


def test_an_early_start_waits_out_a_slow_intake_commit_and_still_finishes_the_command(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(executor_module, "EARLY_DECISION_S", 0.05)
    rig.wait_idle()
    parsed = complete("slow disk", "c1")
    early = rig.executor.start_early(parsed)
    assert early is not None
    wait_until(lambda: rig.engine.calls == ["slow disk"], "the early start")
    time.sleep(0.3)  # intake's commit outlasts several decision periods
    early.stored(rig.store_claimed(parsed))
    rig.wait_state("c1", "succeeded")  # giving up would leave it stored `running`, with nobody to finish it
    assert "still waiting" in caplog.text


def test_the_claim_is_synced_to_disk_before_the_first_stream_chunk(rig: Rig) -> None:
    rig.send("one two three", "c1", stream=True)
    rig.wait_state("c1", "succeeded")
    assert rig.published, "the chunks were published"
    assert rig.events[0] == "sync" and "publish" in rig.events
    chunks = [json.loads(p) for t, p in rig.published if t == TOPICS.stream("c1")]
    assert "".join(c["delta"] for c in chunks) == "onetwothree" and chunks[-1]["done"] is True


def cancel_of(target: str, command_id: str) -> ParsedCommand:
    raw = json.dumps({"v": 1, "id": command_id, "kind": "cancel", "created_at": "2026-11-21T10:00:00Z",
                      "params": {"target": target}})
    return parse_command(raw.encode(), 1 << 20, KINDS)


def test_a_cancel_that_comes_right_after_the_workers_claim_stops_the_command_before_it_runs(rig: Rig) -> None:
    cancel = cancel_of("c1", "x1")
    real_claim = rig.inbox.claim

    def claim_then_cancel(command_id: str) -> bool:
        claimed = real_claim(command_id)
        if command_id == "c1":  # the race: claimed (`running` in the ledger), its handler not started yet
            stored = rig.inbox.accept("x1", "cancel", cancel.command.model_dump_json(), 0, None).command
            assert stored is not None
            rig.executor.run(stored, cancel)
        return claimed

    rig.inbox.claim = claim_then_cancel  # type: ignore[method-assign]
    rig.send("must not run", "c1")
    rig.wait_state("c1", "cancelled")
    assert rig.engine.calls == [], "the generation never started"
    (reply,) = [json.loads(r.payload) for r in rig.outbox.pending(0, 100)
                if json.loads(r.payload).get("command_id") == "x1" and json.loads(r.payload)["status"] == "succeeded"]
    assert reply["output"] == {"target": "c1", "previous_state": "running", "state": "cancelling"}


class GatedEngine(ScriptedEngine):
    """Each prompt waits for its own gate (or its cancel): several run at once, as with `model.parallel`."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, threading.Event] = {}

    def complete(self, params: CompleteParams, on_delta: OnDelta | None, cancel: threading.Event) -> Generation:
        self.calls.append(params.prompt)
        gate = self.gates.setdefault(params.prompt, threading.Event())
        while not gate.wait(0.01):
            if cancel.is_set():
                return Generation(text="", finish_reason="cancelled", prompt_tokens=1, completion_tokens=0,
                                  ttft_ms=1.0, total_ms=2.0, seed=1)
        return Generation(text=params.prompt, finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                          ttft_ms=1.0, total_ms=2.0, seed=1)


@pytest.fixture
def parallel_rig() -> Iterator[Rig]:
    made = Rig()
    made.engine = GatedEngine()
    made.executor = Executor(made.inbox, lambda: None, made.engine, TOPICS, "test", made._publish,
                             on_stored=lambda: None, stream_interval_s=0.05, workers=2)
    made.executor.start()
    yield made
    for gate in made.engine.gates.values():  # type: ignore[attr-defined]
        gate.set()
    made.executor.stop(5.0)


def test_two_workers_run_two_commands_at_once_and_a_freed_slot_takes_the_highest_priority(
        parallel_rig: Rig) -> None:
    rig, engine = parallel_rig, parallel_rig.engine
    assert isinstance(engine, GatedEngine)
    rig.send("first", "c1")
    rig.send("second", "c2")
    wait_until(lambda: len(engine.calls) == 2, "both commands to run at once")
    rig.send("low", "c3", priority=0)
    rig.send("high", "c4", priority=5)
    time.sleep(0.05)
    assert engine.calls == ["first", "second"], "no third slot"
    engine.gates["first"].set()
    wait_until(lambda: len(engine.calls) == 3, "the freed worker to take the next command")
    assert engine.calls[2] == "high"
    for prompt in ("second", "high", "low"):
        engine.gates.setdefault(prompt, threading.Event()).set()
    for command_id in ("c1", "c2", "c3", "c4"):
        rig.wait_state(command_id, "succeeded")
    for command_id in ("c1", "c2", "c3", "c4"):
        sequence = [(s, q) for c, s, q in rig.statuses() if c == command_id]
        assert [s for s, _ in sequence] == ["accepted", "running", "succeeded"]
        assert [q for _, q in sequence] == sorted(q for _, q in sequence)


def test_cancelling_one_of_two_running_commands_leaves_the_other_running(parallel_rig: Rig) -> None:
    rig, engine = parallel_rig, parallel_rig.engine
    assert isinstance(engine, GatedEngine)
    rig.send("first", "c1")
    rig.send("second", "c2")
    wait_until(lambda: len(engine.calls) == 2, "both commands to run at once")
    raw = json.dumps({"v": 1, "id": "x1", "kind": "cancel", "created_at": "2026-11-21T10:00:00Z",
                      "params": {"target": "c1"}})
    cancel = parse_command(raw.encode(), 1 << 20, KINDS)
    stored = rig.inbox.accept("x1", "cancel", cancel.command.model_dump_json(), 0, None).command
    assert stored is not None
    rig.executor.run(stored, cancel)
    rig.wait_state("c1", "cancelled")
    assert rig.inbox.get("c2").state == "running"  # type: ignore[union-attr]
    engine.gates["second"].set()
    rig.wait_state("c2", "succeeded")
