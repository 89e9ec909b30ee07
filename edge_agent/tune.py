"""`edge-agent tune`: find the fastest llama.cpp settings for a model on this machine.

The search is coordinate descent over a small grid: start from llama.cpp's defaults, then try each
value of one setting at a time (threads, batch, ubatch, flash attention, KV cache type, GPU layers)
keeping the best so far, in that order, until every value was tried or the time budget runs out.
Each trial loads the model with the candidate settings and times, three times, a prompt
evaluation (time to first token, context reset first) and a short decode; the medians count.
`--max-latency-ms` bounds the time to first token of the benchmark prompt; among the
configurations within it, `--target` picks the highest decode speed (`tokens_per_s`) or the
lowest time to first token (`ttft`).

The search and the choice are pure (`search`, `best`); `measure` is the only part that runs llama.cpp.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

Target = Literal["tokens_per_s", "ttft"]
REPEATS = 3  # timed completions per trial; the median counts (a busy 2-core box is noisy)
PROMPT = ("The gateway at the pumping station reported pressure, flow and vibration readings for the last hour. "
          "Summarize the state of each pump and flag anything unusual for the operator on duty.")


@dataclass(frozen=True)
class Candidate:
    n_threads: int
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = False
    kv_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    n_gpu_layers: int = 0

    def normalized(self) -> Candidate:
        """llama.cpp needs flash attention for a quantized V cache, and ubatch cannot exceed batch."""
        return replace(self, n_ubatch=min(self.n_ubatch, self.n_batch),
                       flash_attn=self.flash_attn or self.kv_type != "f16")

    def profile_keys(self) -> dict[str, object]:
        """The `[model]` keys of a profile (see edge_agent/engine/profile.py)."""
        return {"n_threads": self.n_threads, "n_batch": self.n_batch, "n_ubatch": self.n_ubatch,
                "flash_attn": self.flash_attn, "type_k": self.kv_type, "type_v": self.kv_type,
                "n_gpu_layers": self.n_gpu_layers}


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


def search_space(cpu_count: int, gpu_layer_options: list[int]) -> dict[str, list[object]]:
    """The values tried per setting, in search order."""
    threads = sorted({1, max(1, cpu_count // 2), cpu_count})
    return {"n_threads": list(threads), "n_batch": [512, 128, 2048], "n_ubatch": [512, 128, 256],
            "flash_attn": [False, True], "kv_type": ["f16", "q8_0", "q4_0"], "n_gpu_layers": list(gpu_layer_options)}


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


# --- I/O: measuring one candidate with llama.cpp ----------------------------------------------------


def measure_with_llama(model: Path, n_ctx: int, max_tokens: int) -> Measure:
    from edge_agent.engine.llama import KV_TYPES, decide_repack, load_llama

    repack = decide_repack("auto").enabled  # as the agent loads it with model.repack left at auto

    def measure(candidate: Candidate) -> Trial:
        started = time.monotonic()
        try:
            llm = load_llama(dict(model_path=str(model), n_ctx=n_ctx, n_threads=candidate.n_threads,
                                  n_batch=candidate.n_batch, n_ubatch=candidate.n_ubatch,
                                  flash_attn=candidate.flash_attn, type_k=KV_TYPES[candidate.kv_type],
                                  type_v=KV_TYPES[candidate.kv_type], n_gpu_layers=candidate.n_gpu_layers,
                                  verbose=False), repack)
        except ValueError as exc:
            return Trial(candidate, 0.0, 0.0, time.monotonic() - started, f"load failed: {exc}")
        try:
            tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
            _time_completion(llm, tokens, 4)  # warm-up
            runs = [_time_completion(llm, tokens, max_tokens) for _ in range(REPEATS)]
            ttft_ms = statistics.median(r[0] for r in runs)
            tokens_per_s = statistics.median(r[1] for r in runs)
        except (RuntimeError, ValueError) as exc:
            return Trial(candidate, 0.0, 0.0, time.monotonic() - started, f"run failed: {exc}")
        finally:
            llm.close()
        return Trial(candidate, ttft_ms, tokens_per_s, time.monotonic() - started)

    return measure


def _time_completion(llm: object, tokens: list[int], max_tokens: int) -> tuple[float, float]:
    """(TTFT ms, decode tokens/s) of one completion from an empty context."""
    llm.reset()  # type: ignore[attr-defined]
    started = time.perf_counter()
    first = last = started
    count = 0
    for _ in llm.create_completion(prompt=tokens, max_tokens=max_tokens, seed=1, stream=True):  # type: ignore[attr-defined]
        last = time.perf_counter()
        if count == 0:
            first = last
        count += 1
    decode = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return (first - started) * 1000.0, decode


def gpu_layer_options(model: Path) -> list[int]:
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return [0]
    from edge_agent.config import ModelConfig
    from edge_agent.engine.llama import decide_gpu_layers

    auto = decide_gpu_layers(ModelConfig(path=model)).n_gpu_layers
    return sorted({auto, -1, 0}, key=lambda n: (n != auto, n))


# --- reporting ---------------------------------------------------------------------------------------


def progress(trial: Trial, done: int, total: int, budget_left_s: float, outcome: str | None = None) -> str:
    width = 24
    filled = min(width, width * done // max(1, total))
    outcome = trial.error or outcome or f"{trial.tokens_per_s:6.1f} tok/s, TTFT {trial.ttft_ms:7.1f} ms"
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {outcome}  ({budget_left_s:.0f} s left)"


Column = tuple[str, int, Callable[[Trial], object]]  # title, width, value of a trial

LLAMA_COLUMNS: list[Column] = [
    ("threads", 7, lambda t: t.candidate.n_threads), ("batch", 5, lambda t: t.candidate.n_batch),
    ("ubatch", 6, lambda t: t.candidate.n_ubatch), ("flash", 5, lambda t: str(t.candidate.flash_attn).lower()),
    ("kv", 5, lambda t: t.candidate.kv_type), ("gpu", 4, lambda t: t.candidate.n_gpu_layers),
    ("TTFT ms", 9, lambda t: f"{t.ttft_ms:.1f}"), ("tok/s", 7, lambda t: f"{t.tokens_per_s:.1f}"),
]


def render_table(columns: list[Column], trials: list[Trial], winner: Trial | None,
                 max_latency_ms: float | None) -> str:
    """One line per trial: its cells and a note (winner, error, over the latency bound)."""
    header = " ".join(f"{title:>{width}}" for title, width, _ in columns)
    lines = [header + "  note", "-" * (len(header) + 6)]
    for t in trials:
        note = "WINNER" if t is winner else (t.error or ("" if feasible(t, max_latency_ms) else "over latency"))
        lines.append(" ".join(f"{value(t)!s:>{width}}" for _, width, value in columns) + f"  {note}")
    return "\n".join(lines)


def table(trials: list[Trial], winner: Trial | None, max_latency_ms: float | None) -> str:
    return render_table(LLAMA_COLUMNS, trials, winner, max_latency_ms)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


def profile_toml(winner: Trial, model: Path, target: Target, max_latency_ms: float | None, trials: int) -> str:
    body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in winner.candidate.profile_keys().items())
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    bound = "none" if max_latency_ms is None else f"{max_latency_ms:g} ms"
    return (f"# written by `edge-agent tune` on {stamp}; load it with [model] profile = \"<this file>\"\n"
            f"[model]\n{body}\n\n[tuned]\nmodel = \"{model.name}\"\ntarget = \"{target}\"\n"
            f"max_latency_ms = \"{bound}\"\ntrials = {trials}\n"
            f"ttft_ms = {winner.ttft_ms:.1f}\ntokens_per_s = {winner.tokens_per_s:.1f}\n"
            f"host_cpus = {os.cpu_count() or 1}\n")


def run_tune(model: Path, target: Target, max_latency_ms: float | None, budget_s: float, out: Path,
             n_ctx: int = 2048, max_tokens: int = 32) -> int:
    """The CLI's work: search, print the table, write the profile. Returns the exit code."""
    if not model.is_file():
        print(f"edge-agent tune: model file {model} does not exist", file=sys.stderr)
        return 2
    if model.suffix == ".onnx":
        from edge_agent.tune_onnx import run_onnx_tune

        return run_onnx_tune(model, target, max_latency_ms, budget_s, out, os.cpu_count() or 1)
    deadline = time.monotonic() + budget_s
    space = search_space(os.cpu_count() or 1, gpu_layer_options(model))
    start = Candidate(n_threads=max(space["n_threads"]), n_gpu_layers=space["n_gpu_layers"][0])  # type: ignore[arg-type]

    def report(trial: Trial, done: int, total: int) -> None:
        print(progress(trial, done, total, max(0.0, deadline - time.monotonic())), file=sys.stderr, flush=True)

    trials = search(start, space, measure_with_llama(model, n_ctx, max_tokens), target, max_latency_ms,
                    budget_s, on_trial=report)
    winner = best(trials, target, max_latency_ms)
    print(table(trials, winner, max_latency_ms))
    if winner is None:
        print("edge-agent tune: no configuration could be measured; see the errors above", file=sys.stderr)
        return 1
    if not feasible(winner, max_latency_ms):
        print(f"warning: no configuration met --max-latency-ms {max_latency_ms:g}; wrote the lowest-latency one",
              file=sys.stderr)
    out.write_text(profile_toml(winner, model, target, max_latency_ms, len(trials)))
    print(f"wrote {out}: {asdict(winner.candidate)}; add  profile = \"{out}\"  to [model]")
    return 0
