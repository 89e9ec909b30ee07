"""Fault-test machinery: an agent that can be SIGKILLed at named points, a rig wiring broker ->
chaos proxy -> agent, a cloud sender that resends until `accepted` (as the bridge does), and the
audit that turns what the cloud received into the counts every scenario asserts.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm_wire.lifecycle import TERMINAL as TERMINAL_STATUSES
from edge_agent.sqlite_file import SqliteFile
from tests.faults.chaos import ChaosProxy
from tests.support import faulty_agent
from tests.support.agent_proc import AgentProcess, read_ledger, write_agent_config
from tests.support.broker import Broker
from tests.support.cloud import CloudClient

REPORT_ENV = "EDGE_AGENT_FAULT_REPORT"  # a JSON-lines file the scenarios append their figures to
FAST_KEEPALIVE_S = 5  # the smallest the config allows; a black-holed link is noticed in ~2 keepalives


def report(scenario: str, **figures: Any) -> None:
    """Append a scenario's figures to $EDGE_AGENT_FAULT_REPORT (docs/reliability.md quotes them)."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"scenario": scenario, **figures}) + "\n")


def slow_enabled(config: Any) -> bool:
    """Long variants run with `-m slow` or EDGE_AGENT_SLOW_TESTS=1."""
    return "slow" in (config.getoption("-m") or "") or os.environ.get("EDGE_AGENT_SLOW_TESTS") == "1"


class FaultyAgent:
    """`edge-agent run` as a subprocess on a fixed device id and store; restartable, killable, and
    optionally armed (`tests/support/faulty_agent.py`) so it SIGKILLs itself at a named checkpoint."""

    def __init__(self, workdir: Path, model: Path, port: int, device_id: str | None = None,
                 env: dict[str, str] | None = None, store: Path | None = None) -> None:
        self.device_id = device_id or f"gw-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.store = store or workdir / f"{self.device_id}.db"
        self.config = write_agent_config(workdir / f"{self.device_id}.toml", self.device_id, port, model, self.store)
        self.env = {"EDGE_AGENT_MQTT__KEEPALIVE": str(FAST_KEEPALIVE_S), **(env or {})}
        self.kills = 0
        self.starts = 0
        self.process: AgentProcess | None = None

    def start(self, fault_point: str | None = None, intake_bug: str | None = None, **env: str) -> FaultyAgent:
        """`fault_point`: SIGKILL there; `intake_bug`: intake raises on ids with this prefix (faulty_agent)."""
        command = faulty_agent.command(fault_point, intake_bug) if fault_point or intake_bug else None
        self.process = AgentProcess(self.config, self.workdir / f"{self.device_id}.log", env={**self.env, **env},
                                    command=command).start()
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.process is not None and self.process.process.poll() is None

    def kill(self) -> None:
        """SIGKILL now (a crash or power cut of the process)."""
        assert self.process is not None
        self.process.kill()
        self.kills += 1

    def wait_fault_kill(self, timeout: float = 60.0) -> None:
        """Wait for the armed fault point to SIGKILL the agent; fails if it exited any other way."""
        assert self.process is not None and self.process.process is not None
        code = self.process.process.wait(timeout=timeout)
        assert code == -signal.SIGKILL, f"agent exited {code}, not by its fault point:\n{self.log_tail()}"
        self.kills += 1

    def terminate(self) -> int:
        assert self.process is not None
        return self.process.terminate()

    def stop_quietly(self) -> None:
        if self.process is not None:
            self.process.stop_quietly()

    def ledger(self) -> dict[str, str]:
        return read_ledger(self.store)

    def log_tail(self, lines: int = 40) -> str:
        text = self.process.log_text() if self.process else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""


def outbox_depth(store: Path) -> tuple[int, int]:
    """(rows, bytes) in the agent's outbox, read-only."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        rows, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox").fetchone()
        return int(rows), int(size)
    finally:
        conn.close()


@dataclass
class Rig:
    """cloud -> broker <- chaos proxy <- agent. The cloud talks to the broker directly."""

    broker: Broker
    proxy: ChaosProxy
    cloud: CloudClient
    agent: FaultyAgent
    faults: Counter[str] = field(default_factory=Counter)

    @property
    def device_id(self) -> str:
        return self.agent.device_id

    def restart_broker(self, sig: int = signal.SIGTERM) -> None:
        self.broker.restart(sig)
        self.faults[f"broker_restart_{signal.Signals(sig).name}"] += 1

    def cut(self) -> None:
        self.proxy.cut()
        self.faults["link_cut"] += 1

    def kill_agent(self) -> None:
        self.agent.kill()
        self.faults["agent_sigkill"] += 1


def resend_until_accepted(cloud: CloudClient, device_id: str, commands: list[dict[str, Any]],
                          timeout: float) -> int:
    """What the bridge does: resend (same id) every command the device has not answered yet, until
    each has a reply. Returns how many resends it took."""
    resends = 0

    def unanswered() -> list[dict[str, Any]]:
        answered = {r.get("command_id") for r in cloud.replies()}
        return [c for c in commands if c["id"] not in answered]

    for _ in range(max(1, int(timeout / 5))):
        try:
            cloud.wait_for(lambda: not unanswered(), 5.0, "replies to the commands sent")
            return resends
        except AssertionError:
            pass
        for cmd in unanswered():
            cloud.send(device_id, cmd)
            resends += 1
    assert not unanswered(), f"{len(unanswered())} commands never answered"
    return resends


@dataclass
class Audit:
    """What the cloud saw, after dedupe by (device_id, seq)."""

    commands: int
    with_one_terminal: int
    lost: list[str]
    multiple_terminals: list[str]
    executed_twice: list[str]
    seq_out_of_order: int
    duplicates_received: int
    outcomes: Counter[str]
    late_pairs: list[tuple[int, int]] = field(default_factory=list)  # (seq seen, smaller seq first seen after)

    def assert_clean(self) -> None:
        assert self.lost == [], f"commands with no terminal reply: {self.lost[:10]}"
        assert self.multiple_terminals == [], f"commands with several terminal replies: {self.multiple_terminals}"
        assert self.executed_twice == [], f"commands run more than once: {self.executed_twice}"
        assert self.seq_out_of_order == 0, f"replies arrived out of seq order: {self.late_pairs}"
        assert self.with_one_terminal == self.commands


def audit(cloud: CloudClient, device_id: str, command_ids: list[str]) -> Audit:
    """Each command: exactly one terminal reply (distinct seqs) and at most one execution.
    Executions are counted as distinct `running` replies by (seq, ts), over every copy received: a
    `running` reply is stored in the claim's transaction, a copy re-sent from the outbox or the
    ledger repeats its bytes, but a re-run after a claim lost to a power cut takes the same seq
    again (the counter rolled back with the claim) with a new `ts`, so counting seqs alone would
    hide it. Order: the first arrival of each seq is increasing (re-sent copies may come later)."""
    mine = [r for r in cloud.replies() if r.get("device_id") == device_id]
    first_seen: dict[int, dict[str, Any]] = {}
    for reply in mine:
        first_seen.setdefault(reply["seq"], reply)
    order = list(first_seen)
    late = [(a, b) for a, b in zip(order, order[1:], strict=False) if b <= a]
    terminal: dict[str, set[int]] = {cid: set() for cid in command_ids}
    executions: dict[str, set[tuple[int, str]]] = {cid: set() for cid in command_ids}
    outcomes: Counter[str] = Counter()
    for seq, reply in first_seen.items():
        cid = reply.get("command_id")
        if cid in terminal and reply["status"] in TERMINAL_STATUSES:
            terminal[cid].add(seq)
            outcomes[reply["status"] + (f":{reply['error']['code']}" if reply.get("error") else "")] += 1
    for reply in mine:
        if reply["status"] == "running" and reply.get("command_id") in executions:
            executions[reply["command_id"]].add((reply["seq"], reply["ts"]))
    return Audit(
        commands=len(command_ids),
        with_one_terminal=sum(1 for s in terminal.values() if len(s) == 1),
        lost=[c for c, s in terminal.items() if not s],
        multiple_terminals=[c for c, s in terminal.items() if len(s) > 1],
        executed_twice=[c for c, s in executions.items() if len(s) > 1],
        seq_out_of_order=len(late),
        late_pairs=late[:20],
        duplicates_received=len(mine) - len(first_seen),
        outcomes=outcomes,
    )


def ledger_terminal(ledger: dict[str, str], command_ids: list[str]) -> list[str]:
    """Command ids not in a terminal state in the agent's SQLite ledger."""
    return [c for c in command_ids if ledger.get(c) not in TERMINAL_STATUSES]


def wait_all_terminal(cloud: CloudClient, command_ids: list[str], timeout: float) -> None:
    """Wait until every id has a terminal reply (one pass over the messages per check)."""
    wanted = set(command_ids)

    def done() -> bool:
        finished = {r.get("command_id") for r in cloud.replies() if r["status"] in TERMINAL_STATUSES}
        return wanted <= finished

    cloud.wait_for(done, timeout, f"terminal replies for {len(wanted)} commands")


def seed_outbox(store_path: Path, device_id: str, rows: int) -> None:
    """Put `rows` Events in a (new) agent store, as if produced while the broker was unreachable."""
    SqliteFile(store_path, "normal").close()
    payloads = [json.dumps({"v": 1, "device_id": device_id, "ts": "2026-11-22T00:00:00.000Z", "level": "info",
                            "code": "backlog", "message": f"queued offline {i}", "data": {"n": i}}).encode()
                for i in range(rows)]
    conn = sqlite3.connect(store_path)
    with conn:
        conn.executemany("INSERT INTO outbox (topic, payload, qos, bytes, created_at) VALUES (?, ?, 1, ?, 0)",
                         [(f"autoglm/{device_id}/event", p, len(p)) for p in payloads])
    conn.close()
