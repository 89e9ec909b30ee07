"""Soak: run the agent for N minutes under mixed load with faults; report resource drift.

A private mosquitto, the chaos proxy of tests/faults between it and `edge-agent run`, and a cloud
client that keeps sending a mix of ping / chat / complete / cancel / hostile payloads while, every
`--fault-every` seconds, one fault strikes in turn: link cut, black hole (keepalive notices),
refused reconnects, broker restart (SIGTERM), agent SIGKILL + restart. At the end every command is
audited (exactly one terminal reply, none run twice) and the report compares start and end:
RSS of the agent, its open file descriptors, the SQLite file and WAL sizes.

  python bench/soak.py --minutes 10                 # the figures in docs/reliability.md
  python bench/soak.py --minutes 1 --fault-every 10 # a quick look

RSS / fds are sampled from /proc of the agent process after warm-up (first sample after the first
minute's traffic, or after 30 s on short runs) and at the end; after an agent SIGKILL the new
process is measured (its baseline is re-taken), so growth is reported per process lifetime.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faults.chaos import ChaosProxy  # noqa: E402
from tests.faults.harness import FaultyAgent, audit, outbox_depth, resend_until_accepted, wait_all_terminal  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.cloud import CloudClient, chat, command  # noqa: E402

FAULTS = ["cut", "blackhole", "refuse", "broker", "kill"]


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (MiB) and open fds of a process, from /proc."""
    with open(f"/proc/{pid}/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    return {"rss_mb": round(rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1),
            "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}


def file_sizes(store: Path) -> dict[str, int]:
    wal = Path(str(store) + "-wal")
    return {"db_bytes": store.stat().st_size if store.exists() else 0,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0}


def sample(agent: FaultyAgent) -> dict[str, Any]:
    assert agent.process is not None and agent.process.process is not None
    rows, size = outbox_depth(agent.store)
    return {**proc_sample(agent.process.process.pid), **file_sizes(agent.store),
            "outbox_rows": rows, "outbox_bytes": size}


def next_command(rng: random.Random, sent: list[dict[str, Any]]) -> dict[str, Any] | bytes:
    roll = rng.random()
    if roll < 0.45:
        return command("ping")
    if roll < 0.75:
        return command("chat", chat("soak", max_tokens=rng.randint(8, 96), seed=rng.randint(0, 9999)))
    if roll < 0.85:
        return command("complete", {"prompt": "soak", "max_tokens": rng.randint(8, 64)})
    if roll < 0.92 and sent:
        return command("cancel", {"target": rng.choice(sent)["id"]})
    return rng.choice([b"\xff\xfe", b"{", b'{"v": 2}', b"[" * 5000, b'{"v":1,"id":"a/b","kind":"ping"}'])


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.broker = Broker(workdir / "broker").start()
        self.proxy = ChaosProxy(self.broker.port).start()
        self.cloud = CloudClient(self.broker.port, client_id="soak-cloud")
        self.agent = FaultyAgent(workdir, Path(args.model).resolve(), self.proxy.port,
                                 env={"EDGE_AGENT_TELEMETRY_INTERVAL_S": "5"}).start()
        self.cloud.wait_online(self.agent.device_id)
        self.commands: list[dict[str, Any]] = []
        self.hostile = 0
        self.faults: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self.max_outbox_rows = 0
        self.samples: list[dict[str, Any]] = []

    def strike(self, fault: str) -> None:
        self.faults[fault] += 1
        if fault == "cut":
            self.proxy.cut()
        elif fault in ("blackhole", "refuse"):
            getattr(self.proxy, fault)(True)
            if fault == "refuse":
                self.proxy.cut()
            time.sleep(self.args.fault_length)
            self.proxy.heal()
        elif fault == "broker":
            self.broker.stop(signal.SIGTERM)
            time.sleep(self.args.fault_length)
            self.broker.start()
        else:
            self.agent.kill()
            self.agent.start()
            self.samples.append({"event": "agent restarted", "t": round(time.monotonic() - self.t0, 1)})

    def send_one(self) -> None:
        item = next_command(self.rng, self.commands)
        if isinstance(item, bytes):
            self.hostile += 1
        else:
            self.commands.append(item)
        if self.broker.running:
            self.cloud.send(self.agent.device_id, item)

    def run(self) -> dict[str, Any]:
        self.t0 = time.monotonic()
        end = self.t0 + self.args.minutes * 60
        warm = self.t0 + min(60.0, self.args.minutes * 30)
        next_fault, fault_index, baseline = self.t0 + self.args.fault_every, 0, None
        while time.monotonic() < end:
            self.send_one()
            if baseline is None and time.monotonic() >= warm and self.agent.alive:
                baseline = sample(self.agent)
            if time.monotonic() >= next_fault:
                fault = self.args.faults[fault_index % len(self.args.faults)]
                self.strike(fault)
                fault_index += 1
                next_fault = time.monotonic() + self.args.fault_every
                if fault == "kill":
                    baseline = None  # a new process: re-take its baseline after warm-up
                    warm = time.monotonic() + 15
            self.max_outbox_rows = max(self.max_outbox_rows, outbox_depth(self.agent.store)[0])
            time.sleep(1.0 / self.args.rate)
        return self.finish(baseline)

    def finish(self, baseline: dict[str, Any] | None) -> dict[str, Any]:
        self.proxy.heal()
        ids = [c["id"] for c in self.commands]
        resends = resend_until_accepted(self.cloud, self.agent.device_id, self.commands, timeout=300)
        wait_all_terminal(self.cloud, ids, timeout=300)
        self.cloud.wait_for(lambda: outbox_depth(self.agent.store)[0] == 0, 120, "outbox drained")
        result = audit(self.cloud, self.agent.device_id, ids)
        end = sample(self.agent)
        return {
            "minutes": self.args.minutes, "commands": len(ids), "hostile_payloads": self.hostile,
            "faults": self.faults, "resends": resends, "lost": len(result.lost),
            "executed_twice": len(result.executed_twice), "seq_out_of_order": result.seq_out_of_order,
            "late_pairs": result.late_pairs, "late_replies": self.late_replies(result.late_pairs),
            "outcomes": dict(result.outcomes), "max_outbox_rows": self.max_outbox_rows,
            "start": baseline, "end": end,
            "rss_growth_mb": round(end["rss_mb"] - baseline["rss_mb"], 1) if baseline else None,
            "fd_growth": end["open_fds"] - baseline["open_fds"] if baseline else None,
        }

    def late_replies(self, pairs: list[tuple[int, int]]) -> list[str]:
        """Arrival index, seq, status and command of each reply in an out-of-order pair (diagnosis)."""
        wanted = {seq for pair in pairs for seq in pair}
        return [f"#{i} seq={r['seq']} {r['status']} {r['command_id']}" for i, r in enumerate(self.cloud.replies())
                if r["seq"] in wanted]

    def close(self) -> None:
        self.agent.stop_quietly()
        self.cloud.close()
        self.proxy.close()
        if self.broker.running:
            self.broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0, help="commands sent per second")
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults")
    parser.add_argument("--fault-length", type=float, default=3.0,
                        help="seconds a black hole, refusal or broker stop lasts")
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-glm4-q4_0.gguf"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, store) and print it")
    parser.add_argument("--faults", type=lambda s: s.split(","), default=FAULTS,
                        help=f"comma-separated faults to cycle through (default: {','.join(FAULTS)})")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="soak-")
    soak = Soak(args, Path(tmp))
    try:
        report = soak.run()
    finally:
        soak.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.keep:
        report["workdir"] = tmp
    print(json.dumps(report, indent=2))
    clean = report["lost"] == 0 and report["executed_twice"] == 0 and report["seq_out_of_order"] == 0
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
