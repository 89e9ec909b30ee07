"""Tuning an `.onnx` model on ONNX Runtime: the same search as for GGUF models
(edge_agent.tune.search), over intra-op threads, graph optimization level, sequential or parallel
execution. Each trial times runs of the model on random inputs of its own signature (symbolic
dimensions as 1); both targets mean the lowest latency per run. The winner is written as a profile
for `[onnx.models.NAME] profile = "FILE"`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.engine.settings import OnnxOptimization
from edge_agent.tune.search import Column, Measure, Trial, best, conclude, progress_printer, render_table, search

RUNS_PER_TRIAL_S = 0.5  # run each candidate for this long (wall clock, at least 5 runs)


@dataclass(frozen=True)
class OnnxCandidate:
    intra_op_threads: int
    graph_optimization: OnnxOptimization = "all"
    parallel_execution: bool = False

    def normalized(self) -> OnnxCandidate:
        return self

    def profile_keys(self) -> dict[str, object]:
        return {"intra_op_threads": self.intra_op_threads, "graph_optimization": self.graph_optimization,
                "parallel_execution": self.parallel_execution}


def onnx_search_space(cpu_count: int) -> dict[str, list[object]]:
    return {"intra_op_threads": sorted({1, max(1, cpu_count // 2), cpu_count}),
            "graph_optimization": ["all", "basic", "extended"], "parallel_execution": [False, True]}


def random_inputs(session: Any) -> dict[str, np.ndarray]:
    """Inputs matching the model's signature: symbolic dimensions become 1."""
    from edge_agent.engine.onnx import DTYPES

    rng = np.random.default_rng(0)
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        feeds[spec.name] = rng.standard_normal(shape).astype(DTYPES.get(spec.type, np.float32))
    return feeds


def measure_with_onnxruntime(model: Path, providers: list[str]) -> Measure:
    import onnxruntime as ort

    from edge_agent.engine.onnx import session_options

    def measure(candidate: OnnxCandidate) -> Trial:
        started = time.monotonic()
        try:
            session = ort.InferenceSession(str(model), session_options(**candidate.profile_keys()),
                                           providers=providers)
            feeds = random_inputs(session)
            session.run(None, feeds)  # warm-up
            latencies: list[float] = []
            until = time.perf_counter() + RUNS_PER_TRIAL_S
            while len(latencies) < 5 or time.perf_counter() < until:
                run_started = time.perf_counter()
                session.run(None, feeds)
                latencies.append(time.perf_counter() - run_started)
        except Exception as exc:  # onnxruntime raises untyped errors
            return Trial(candidate, 0.0, 0.0, time.monotonic() - started, f"failed: {exc}")
        median = float(np.median(latencies))
        return Trial(candidate, median * 1000.0, 1.0 / median, time.monotonic() - started)

    return measure


ONNX_COLUMNS: list[Column] = [
    ("threads", 7, lambda t: t.candidate.intra_op_threads),
    ("optimization", 12, lambda t: t.candidate.graph_optimization),
    ("parallel", 8, lambda t: str(t.candidate.parallel_execution).lower()),
    ("latency ms", 10, lambda t: f"{t.ttft_ms:.3f}"), ("runs/s", 8, lambda t: f"{t.tokens_per_s:.1f}"),
]


def onnx_table(trials: list[Trial], winner: Trial | None, max_latency_ms: float | None) -> str:
    return render_table(ONNX_COLUMNS, trials, winner, max_latency_ms)


def onnx_profile_toml(winner: Trial, model: Path, trials: int) -> str:
    c = winner.candidate
    return (f"# written by `edge-agent tune` for {model.name}; load it with [onnx.models.NAME] profile = \"<file>\"\n"
            f"[onnx]\nintra_op_threads = {c.intra_op_threads}\ngraph_optimization = \"{c.graph_optimization}\"\n"
            f"parallel_execution = {str(c.parallel_execution).lower()}\n\n[tuned]\nmodel = \"{model.name}\"\n"
            f"trials = {trials}\nlatency_ms = {winner.ttft_ms:.3f}\n")


def run_onnx_tune(model: Path, max_latency_ms: float | None, budget_s: float, out: Path, cpu_count: int) -> int:
    import onnxruntime as ort

    from edge_agent.engine.onnx import choose_providers

    providers = choose_providers(None, ort.get_available_providers())
    start = OnnxCandidate(intra_op_threads=cpu_count)
    trials = search(start, onnx_search_space(cpu_count), measure_with_onnxruntime(model, providers), "ttft",
                    max_latency_ms, budget_s,
                    on_trial=progress_printer(budget_s, lambda trial: f"{trial.ttft_ms:.3f} ms per run"))
    winner = best(trials, "ttft", max_latency_ms)
    print(f"ONNX Runtime providers: {providers}")
    return conclude(onnx_table(trials, winner, max_latency_ms), winner, max_latency_ms, out,
                    lambda w: onnx_profile_toml(w, model, len(trials)), "[onnx.models.NAME]")
