"""`edge-agent run` as a real subprocess with its own config, store and log."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

AGENT = [sys.executable, "-m", "edge_agent.cli"]


def write_agent_config(path: Path, device_id: str, port: int, model: Path, store: Path, tail: str = "",
                       **extra: str) -> Path:
    """Write a minimal agent TOML; `extra` adds top-level `key = value` lines (values pre-quoted);
    `tail` is raw TOML appended after the `[model]` section (more model keys, then other tables)."""
    top = "\n".join(f"{k} = {v}" for k, v in extra.items())
    path.write_text(
        f'device_id = "{device_id}"\n{top}\n'
        f"[mqtt]\nport = {port}\nkeepalive = 5\nwill_delay_s = 0\n"
        "[reconnect]\ninitial_s = 0.2\nmultiplier = 2.0\nmax_s = 1.0\n"
        f'[store]\npath = "{store}"\n'
        f'[model]\npath = "{model}"\nn_ctx = 4096\nn_threads = 1\n{tail}'
    )
    return path


class AgentProcess:
    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.command = command or AGENT  # the command line up to `run` (tests/support/faulty_agent.py arms a crash)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        handle = self.log.open("ab")
        self.process = subprocess.Popen([*self.command, "run", "--config", str(self.config)], stdout=handle,
                                        stderr=subprocess.STDOUT, env=self.env)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, like a power cut for the process."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop_quietly(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def read_ledger(store: Path) -> dict[str, str]:
    """command id -> state, read from the agent's SQLite file (read-only)."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return dict(conn.execute("SELECT id, state FROM commands").fetchall())
    finally:
        conn.close()


def outbox_rows(store: Path) -> int:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        conn.close()
