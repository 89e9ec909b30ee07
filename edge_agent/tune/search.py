"""The tuner's pure part: coordinate descent over a grid of settings, the choice of a winner, the
progress line and the table. Each kind of model supplies its candidates and a `Measure`
(edge_agent.tune.llama, edge_agent.tune.onnx); `conclude` is the runners' common ending.

The search starts from a candidate, then tries each value of one setting at a time keeping the best
so far, in the order of the space, until every value was tried or the time budget runs out.
`max_latency_ms` bounds the time to first token (ONNX: the latency of one run); among the trials
within it, the target picks the highest decode speed (`tokens_per_s`) or the lowest latency (`ttft`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

Target = Literal["tokens_per_s", "ttft"]


@dataclass(frozen=True)
class Trial:
    """One measured candidate (a llama.cpp `Candidate` or an ONNX one: TTFT is then the latency of
    one run and tokens_per_s the runs per second)."""

    candidate: Any
    ttft_ms: float
    tokens_per_s: float
    seconds: float
    error: str | None = None


Measure = Callable[[Any], Trial]


def feasible(trial: Trial, max_latency_ms: float | None) -> bool:
    return trial.error is None and (max_latency_ms is None or trial.ttft_ms <= max_latency_ms)


def score(trial: Trial, target: Target) -> float:
    """Higher is better."""
    return trial.tokens_per_s if target == "tokens_per_s" else -trial.ttft_ms


def best(trials: list[Trial], target: Target, max_latency_ms: float | None) -> Trial | None:
    """The best feasible trial; if none meets the latency bound, the one with the lowest TTFT."""
    ok = [t for t in trials if feasible(t, max_latency_ms)]
    if ok:
        return max(ok, key=lambda t: score(t, target))
    measured = [t for t in trials if t.error is None]
    return min(measured, key=lambda t: t.ttft_ms) if measured else None


def search(start: Any, space: dict[str, list[object]], measure: Measure, target: Target,
           max_latency_ms: float | None, budget_s: float, clock: Callable[[], float] = time.monotonic,
           on_trial: Callable[[Trial, int, int], None] | None = None) -> list[Trial]:
    """Coordinate descent within `budget_s`: a trial starts only if the longest one so far still fits."""
    deadline = clock() + budget_s
    total = 1 + sum(len(values) - 1 for values in space.values())
    trials: list[Trial] = []
    tried: set[Any] = set()
    current = start
    steps: list[tuple[str | None, object]] = [(None, None)] + [(k, v) for k, vs in space.items() for v in vs]
    for key, value in steps:
        candidate = (current if key is None else replace(current, **{key: value})).normalized()
        if candidate in tried:
            continue
        longest = max((t.seconds for t in trials), default=0.0)
        if clock() + longest > deadline:
            break
        trial = measure(candidate)
        trials.append(trial)
        tried.add(candidate)
        if on_trial is not None:
            on_trial(trial, len(trials), total)
        chosen = best(trials, target, max_latency_ms)
        current = chosen.candidate if chosen is not None else current
    return trials


def progress(trial: Trial, done: int, total: int, budget_left_s: float, outcome: str | None = None) -> str:
    width = 24
    filled = min(width, width * done // max(1, total))
    outcome = trial.error or outcome or f"{trial.tokens_per_s:6.1f} tok/s, TTFT {trial.ttft_ms:7.1f} ms"
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {outcome}  ({budget_left_s:.0f} s left)"


def progress_printer(budget_s: float, outcome: Callable[[Trial], str | None]) -> Callable[[Trial, int, int], None]:
    """An `on_trial` callback printing the progress line to stderr, with the budget left."""
    deadline = time.monotonic() + budget_s

    def report(trial: Trial, done: int, total: int) -> None:
        left = max(0.0, deadline - time.monotonic())
        print(progress(trial, done, total, left, outcome(trial)), file=sys.stderr, flush=True)

    return report


Column = tuple[str, int, Callable[[Trial], object]]  # title, width, value of a trial


def render_table(columns: list[Column], trials: list[Trial], winner: Trial | None,
                 max_latency_ms: float | None) -> str:
    """One line per trial: its cells and a note (winner, error, over the latency bound)."""
    header = " ".join(f"{title:>{width}}" for title, width, _ in columns)
    lines = [header + "  note", "-" * (len(header) + 6)]
    for t in trials:
        note = "WINNER" if t is winner else (t.error or ("" if feasible(t, max_latency_ms) else "over latency"))
        lines.append(" ".join(f"{value(t)!s:>{width}}" for _, width, value in columns) + f"  {note}")
    return "\n".join(lines)


def conclude(table: str, winner: Trial | None, max_latency_ms: float | None, out: Path,
             profile: Callable[[Trial], str], section: str) -> int:
    """Print the table, write the winner's profile to `out`, say how to load it. Returns the exit code."""
    print(table)
    if winner is None:
        print("edge-agent tune: no configuration could be measured; see the errors above", file=sys.stderr)
        return 1
    if not feasible(winner, max_latency_ms):
        print(f"warning: no configuration met --max-latency-ms {max_latency_ms:g}; wrote the lowest-latency one",
              file=sys.stderr)
    out.write_text(profile(winner))
    print(f"wrote {out}: {asdict(winner.candidate)}; add  profile = \"{out}\"  to {section}")
    return 0
