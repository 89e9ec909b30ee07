"""The executor's worker on a real SQLite store, with a scripted stand-in for the text engine (the
real engine is exercised in tests/integration): hand-over to an idle worker, claim-once, and the
durability barrier before stream chunks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.engine import Generation, OnDelta
from edge_agent.executor import Executor
from edge_agent.protocol import ChatParams, CompleteParams, ModelInfo, parse_command
from edge_agent.store import Store
from edge_agent.topics import DeviceTopics

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


class Rig:
    def __init__(self, path: Path) -> None:
        self.store = Store(path, TOPICS)
        self.engine = ScriptedEngine()
        self.published: list[tuple[str, bytes]] = []
        self.events: list[str] = []  # "sync" and "publish", in order
        real_sync = self.store.sync

        def sync() -> None:
            self.events.append("sync")
            real_sync()

        self.store.sync = sync  # type: ignore[method-assign]
        self.executor = Executor(self.store, self.engine, TOPICS, "test", self._publish, on_stored=lambda: None)

    def _publish(self, topic: str, payload: bytes) -> None:
        self.events.append("publish")
        self.published.append((topic, payload))

    def send(self, prompt: str, command_id: str, priority: int = 0, stream: bool = False,
             claim: bool = False) -> None:
        """As the agent's intake does; `claim`: reserve the worker first and, if it is idle, store
        the command already claimed."""
        raw = json.dumps({"v": 1, "id": command_id, "kind": "complete", "priority": priority,
                          "created_at": "2026-11-21T10:00:00Z",
                          "params": {"prompt": prompt, "stream": stream}}).encode()
        parsed = parse_command(raw, 1 << 20, KINDS)
        reserved = claim and self.executor.reserve()
        intake = self.store.accept(command_id, "complete", raw.decode(), priority, None, claim=reserved)
        assert intake.command is not None
        self.executor.submit(intake.command, parsed)

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.executor._idle:
            assert time.monotonic() < deadline, "the worker never went idle"
            time.sleep(0.005)

    def wait_state(self, command_id: str, state: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stored = self.store.get(command_id)
            if stored is not None and stored.state == state:
                return
            time.sleep(0.005)
        raise AssertionError(f"{command_id} never reached {state}")

    def statuses(self) -> list[tuple[str, str, int]]:
        bodies = [json.loads(r.payload) for r in self.store.pending(0, 1000) if r.topic == TOPICS.reply]
        return [(b["command_id"], b["status"], b["seq"]) for b in bodies]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path / "edge.db")
    made.executor.start()
    yield made
    made.engine.release.set()
    made.executor.stop(5.0)
    made.store.close()


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
    stored = rig.store.get("c1")
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


def test_an_idle_worker_reserved_at_intake_runs_the_command_claimed_there_once(rig: Rig) -> None:
    rig.wait_idle()
    claims: list[str] = []
    real_claim = rig.store.claim
    rig.store.claim = lambda command_id: claims.append(command_id) or real_claim(command_id)  # type: ignore[method-assign]
    rig.send("hello there", "c1", claim=True)
    rig.wait_state("c1", "succeeded")
    assert rig.engine.calls == ["hello there"]
    assert claims == [], "the intake commit claimed it: the worker does not claim again"
    assert [s for _, s, _ in rig.statuses()] == ["accepted", "running", "succeeded"]


def test_a_busy_or_reserved_worker_cannot_be_reserved_and_a_released_one_serves_again(rig: Rig) -> None:
    rig.wait_idle()
    assert rig.executor.reserve() is True
    assert rig.executor.reserve() is False, "one reservation at a time"
    rig.executor.release()
    rig.wait_idle()
    rig.engine.release.clear()
    rig.send("first", "c1", claim=True)
    rig.wait_state("c1", "running")
    assert rig.executor.reserve() is False, "the worker is busy"
    rig.send("second", "c2", claim=True)  # not reserved: stored `accepted`, claimed by the worker later
    assert rig.store.get("c2").state == "accepted"  # type: ignore[union-attr]
    rig.engine.release.set()
    rig.wait_state("c2", "succeeded")
    assert rig.engine.calls == ["first", "second"]


def test_a_command_claimed_at_intake_still_runs_when_the_agent_stops_before_the_hand_over(rig: Rig) -> None:
    rig.wait_idle()
    assert rig.executor.reserve() is True
    stopper = threading.Thread(target=rig.executor.stop, args=(5.0,))
    stopper.start()
    time.sleep(0.05)
    assert rig.executor.alive(), "the worker waits for the reserved hand-over"
    assert rig.executor.reserve() is False, "no reservation once stopping"
    raw = json.dumps({"v": 1, "id": "c1", "kind": "complete", "created_at": "2026-11-21T10:00:00Z",
                      "params": {"prompt": "late one"}}).encode()
    intake = rig.store.accept("c1", "complete", raw.decode(), 0, None, claim=True)
    assert intake.command is not None
    rig.executor.submit(intake.command, parse_command(raw, 1 << 20, KINDS))
    stopper.join(10)
    assert rig.engine.calls == ["late one"] and rig.store.get("c1").state == "succeeded"  # type: ignore[union-attr]


def test_the_claim_is_synced_to_disk_before_the_first_stream_chunk(rig: Rig) -> None:
    rig.send("one two three", "c1", stream=True)
    rig.wait_state("c1", "succeeded")
    assert rig.published, "the chunks were published"
    assert rig.events[0] == "sync" and "publish" in rig.events
    chunks = [json.loads(p) for t, p in rig.published if t == TOPICS.stream("c1")]
    assert "".join(c["delta"] for c in chunks) == "onetwothree" and chunks[-1]["done"] is True
