"""Scenario 2: a hypothesis RuleBasedStateMachine over {send, cut link, restore, stop broker, start
broker, kill agent, start agent, wait}, on real processes. At the end of every run the faults are
healed and the invariants of scenario 1 must hold: every command exactly one terminal reply, none
run twice, replies in seq order, every command terminal in the ledger.

The broker is stopped with SIGTERM (mosquitto saves sessions; after SIGKILL it loses queued
messages, which no device can make up for: see docs/reliability.md). CI: 4 runs of up to 10 steps;
`-m slow`: 10 runs of up to 20 steps.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from tests.conftest import TINY_MODEL
from tests.faults.chaos import ChaosProxy
from tests.faults.harness import (
    FaultyAgent,
    audit,
    ledger_terminal,
    report,
    resend_until_accepted,
    slow_enabled,
    wait_all_terminal,
)
from tests.support.broker import Broker
from tests.support.cloud import CloudClient, chat, command

pytestmark = pytest.mark.integration


class FaultMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.workdir = Path(tempfile.mkdtemp(prefix="fault-sm-"))
        self.broker = Broker(self.workdir / "broker").start()
        self.proxy = ChaosProxy(self.broker.port).start()
        self.cloud = CloudClient(self.broker.port, client_id=f"cloud-sm-{uuid.uuid4().hex[:6]}")
        self.agent = FaultyAgent(self.workdir, TINY_MODEL, self.proxy.port).start()
        self.cloud.wait_online(self.agent.device_id)
        self.commands: list[dict[str, Any]] = []

    @rule(n=st.integers(1, 6), chats=st.booleans())
    def send(self, n: int, chats: bool) -> None:
        for _ in range(n):
            i = len(self.commands)
            cmd = command("chat", chat(f"sm {i}", max_tokens=16, seed=i)) if chats else command("ping")
            self.commands.append(cmd)
            if self.broker.running:
                self.cloud.send(self.agent.device_id, cmd)  # else: only resent later, like the bridge

    @rule()
    def cut_link(self) -> None:
        self.proxy.cut()
        self.proxy.refuse(True)

    @rule()
    def restore_link(self) -> None:
        self.proxy.heal()

    @rule()
    def stop_or_start_broker(self) -> None:
        if self.broker.running:
            self.broker.stop(signal.SIGTERM)
        else:
            self.broker.start()

    @rule()
    def kill_or_start_agent(self) -> None:
        if self.agent.alive:
            self.agent.kill()
        else:
            self.agent.start()

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0]))
    def wait(self, seconds: float) -> None:
        time.sleep(seconds)  # let work, reconnects and replays happen between faults

    def teardown(self) -> None:
        try:
            self._heal_and_check()
        finally:
            self.agent.stop_quietly()
            self.cloud.close()
            self.proxy.close()
            if self.broker.running:
                self.broker.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _heal_and_check(self) -> None:
        self.proxy.heal()
        if not self.broker.running:
            self.broker.start()
        if not self.agent.alive:
            self.agent.start()
        if not self.commands:
            return
        ids = [c["id"] for c in self.commands]
        resend_until_accepted(self.cloud, self.agent.device_id, self.commands, timeout=120)
        wait_all_terminal(self.cloud, ids, timeout=120)
        result = audit(self.cloud, self.agent.device_id, ids)
        result.assert_clean()
        assert ledger_terminal(self.agent.ledger(), ids) == []
        report("state_machine_run", commands=len(ids), agent_kills=self.agent.kills, lost=len(result.lost),
               executed_twice=len(result.executed_twice), outcomes=dict(result.outcomes))


def _settings(slow: bool) -> settings:
    return settings(max_examples=10 if slow else 4, stateful_step_count=20 if slow else 10, deadline=None,
                    derandomize=not slow, database=None, suppress_health_check=list(HealthCheck))


def test_random_sequences_of_sends_cuts_broker_stops_and_agent_kills_keep_every_guarantee(
        request: pytest.FixtureRequest, tiny_model: Path) -> None:
    FaultMachine.TestCase.settings = _settings(slow_enabled(request.config))
    FaultMachine.TestCase().runTest()
