"""Tuning a GGUF model on llama.cpp: threads, batch, ubatch, flash attention, KV cache type and GPU
layers, from llama.cpp's defaults. Each trial loads the model with the candidate settings and times,
three times, a prompt evaluation (time to first token, context reset first) and a short decode;
the medians count. `measure_with_llama` is the only part that runs llama.cpp.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from edge_agent.tune.search import (
    Column,
    Measure,
    Target,
    Trial,
    best,
    conclude,
    progress_printer,
    render_table,
    search,
)

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


def search_space(cpu_count: int, gpu_layer_options: list[int]) -> dict[str, list[object]]:
    """The values tried per setting, in search order."""
    threads = sorted({1, max(1, cpu_count // 2), cpu_count})
    return {"n_threads": list(threads), "n_batch": [512, 128, 2048], "n_ubatch": [512, 128, 256],
            "flash_attn": [False, True], "kv_type": ["f16", "q8_0", "q4_0"], "n_gpu_layers": list(gpu_layer_options)}


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


def _time_completion(llm: Any, tokens: list[int], max_tokens: int) -> tuple[float, float]:
    """(TTFT ms, decode tokens/s) of one completion from an empty context."""
    llm.reset()
    started = time.perf_counter()
    first = last = started
    count = 0
    for _ in llm.create_completion(prompt=tokens, max_tokens=max_tokens, seed=1, stream=True):
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
    from edge_agent.engine.llama import decide_gpu_layers
    from edge_agent.engine.settings import ModelConfig

    auto = decide_gpu_layers(ModelConfig(path=model)).n_gpu_layers
    return sorted({auto, -1, 0}, key=lambda n: (n != auto, n))


LLAMA_COLUMNS: list[Column] = [
    ("threads", 7, lambda t: t.candidate.n_threads), ("batch", 5, lambda t: t.candidate.n_batch),
    ("ubatch", 6, lambda t: t.candidate.n_ubatch), ("flash", 5, lambda t: str(t.candidate.flash_attn).lower()),
    ("kv", 5, lambda t: t.candidate.kv_type), ("gpu", 4, lambda t: t.candidate.n_gpu_layers),
    ("TTFT ms", 9, lambda t: f"{t.ttft_ms:.1f}"), ("tok/s", 7, lambda t: f"{t.tokens_per_s:.1f}"),
]


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


def run_llama_tune(model: Path, target: Target, max_latency_ms: float | None, budget_s: float, out: Path,
                   cpu_count: int, n_ctx: int, max_tokens: int) -> int:
    gpu_layers = gpu_layer_options(model)
    space = search_space(cpu_count, gpu_layers)
    start = Candidate(n_threads=cpu_count, n_gpu_layers=gpu_layers[0])
    trials = search(start, space, measure_with_llama(model, n_ctx, max_tokens), target, max_latency_ms,
                    budget_s, on_trial=progress_printer(budget_s, lambda trial: None))
    winner = best(trials, target, max_latency_ms)
    return conclude(table(trials, winner, max_latency_ms), winner, max_latency_ms, out,
                    lambda w: profile_toml(w, model, target, max_latency_ms, len(trials)), "[model]")
