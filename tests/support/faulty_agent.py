"""`edge-agent` with a crash armed at a named checkpoint (`edge_agent.checkpoints`), for the fault tests:

    python -m tests.support.faulty_agent --fault-point command_stored[:n] -- run --config agent.toml

The process SIGKILLs itself the first (or n-th) time it passes the point; everything after `--`
goes to `edge_agent.cli.main` unchanged.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable

from edge_agent import checkpoints, cli


def command(fault_point: str) -> list[str]:
    """This launcher's command line up to the edge-agent arguments (`AgentProcess(command=...)`)."""
    return [sys.executable, "-m", "tests.support.faulty_agent", "--fault-point", fault_point, "--"]


def kill_at(fault_point: str) -> Callable[[str], None]:
    """A `checkpoints.reached` that SIGKILLs this process at the n-th pass of `name[:n]`."""
    target, _, nth = fault_point.partition(":")
    if target not in checkpoints.POINTS:
        raise SystemExit(f"unknown fault point {target!r}; known: {', '.join(checkpoints.POINTS)}")
    kill_on = int(nth or 1)
    hits = 0
    lock = threading.Lock()

    def reached(name: str) -> None:
        nonlocal hits
        if name != target:
            return
        with lock:
            hits += 1
            if hits == kill_on:
                os.kill(os.getpid(), signal.SIGKILL)

    return reached


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="faulty_agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault-point", required=True,
                        help="NAME or NAME:N, NAME one of edge_agent.checkpoints.POINTS")
    parser.add_argument("agent_args", nargs=argparse.REMAINDER, help="-- then the edge-agent arguments")
    args = parser.parse_args(argv)
    agent_args = args.agent_args[1:] if args.agent_args[:1] == ["--"] else args.agent_args
    checkpoints.reached = kill_at(args.fault_point)
    return cli.main(agent_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
