"""`edge-agent` with a crash armed at a named checkpoint (`edge_agent.checkpoints`), or a bug planted
in intake, for the fault tests:

    python -m tests.support.faulty_agent --fault-point command_stored[:n] -- run --config agent.toml
    python -m tests.support.faulty_agent --intake-bug ID_PREFIX -- run --config agent.toml
    python -m tests.support.faulty_agent --rendezvous command_running:2 -- run --config agent.toml

The process SIGKILLs itself the first (or n-th) time it passes the point; with `--intake-bug`,
intake raises a RuntimeError (a stand-in for a bug) on every command whose id starts with the
prefix. With `--rendezvous NAME:N`, the first N passes of the point wait for each other (proof
that N commands run at once; "rendezvous broken" is logged if they do not meet within 60 s).
Everything after `--` goes to `edge_agent.cli.main` unchanged.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable

from autoglm_wire.protocol import ParsedCommand
from edge_agent import checkpoints, cli
from edge_agent.intake import Intake


def command(fault_point: str | None = None, intake_bug: str | None = None, rendezvous: str | None = None) -> list[str]:
    """This launcher's command line up to the edge-agent arguments (`AgentProcess(command=...)`)."""
    options = ["--fault-point", fault_point] if fault_point else []
    options += ["--intake-bug", intake_bug] if intake_bug else []
    options += ["--rendezvous", rendezvous] if rendezvous else []
    return [sys.executable, "-m", "tests.support.faulty_agent", *options, "--"]


def plant_intake_bug(prefix: str) -> None:
    """Intake's limits check raises RuntimeError for the ids starting with `prefix`."""
    check_limits = Intake._check_limits

    def buggy(self: Intake, parsed: ParsedCommand) -> None:
        if parsed.id.startswith(prefix):
            raise RuntimeError(f"a bug planted by the test launcher for ids starting with {prefix!r}")
        check_limits(self, parsed)

    Intake._check_limits = buggy  # type: ignore[method-assign]


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


def meet_at(rendezvous: str) -> Callable[[str], None]:
    """A `checkpoints.reached` where the first N passes of `name:N` wait for each other."""
    target, _, count = rendezvous.partition(":")
    barrier = threading.Barrier(int(count or 2), timeout=60)
    passes = 0
    lock = threading.Lock()

    def reached(name: str) -> None:
        nonlocal passes
        if name != target:
            return
        with lock:
            passes += 1
            if passes > barrier.parties:
                return
        try:
            barrier.wait()
            print(f"rendezvous met at {target}", file=sys.stderr, flush=True)
        except threading.BrokenBarrierError:
            print(f"rendezvous broken at {target}", file=sys.stderr, flush=True)

    return reached


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="faulty_agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault-point", help="NAME or NAME:N, NAME one of edge_agent.checkpoints.POINTS")
    parser.add_argument("--intake-bug", metavar="ID_PREFIX", help="intake raises RuntimeError on these ids")
    parser.add_argument("--rendezvous", metavar="NAME:N", help="the first N passes of NAME wait for each other")
    parser.add_argument("agent_args", nargs=argparse.REMAINDER, help="-- then the edge-agent arguments")
    args = parser.parse_args(argv)
    agent_args = args.agent_args[1:] if args.agent_args[:1] == ["--"] else args.agent_args
    if args.fault_point:
        checkpoints.reached = kill_at(args.fault_point)
    if args.intake_bug:
        plant_intake_bug(args.intake_bug)
    if args.rendezvous:
        checkpoints.reached = meet_at(args.rendezvous)
    return cli.main(agent_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
