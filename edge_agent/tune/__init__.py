"""`edge-agent tune`: find the fastest settings for a model on this machine, and write them as a
profile the agent loads (`[model] profile = ...` or `[onnx.models.NAME] profile = ...`).

`search` is the pure coordinate descent and choice; `llama` measures GGUF models on llama.cpp,
`onnx` measures `.onnx` models on ONNX Runtime.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edge_agent.tune.llama import run_llama_tune
from edge_agent.tune.onnx import run_onnx_tune
from edge_agent.tune.search import Target


def run_tune(model: Path, target: Target, max_latency_ms: float | None, budget_s: float, out: Path,
             n_ctx: int = 2048, max_tokens: int = 32) -> int:
    """The CLI's work: search, print the table, write the profile. Returns the exit code."""
    if not model.is_file():
        print(f"edge-agent tune: model file {model} does not exist", file=sys.stderr)
        return 2
    cpu_count = os.cpu_count() or 1
    if model.suffix == ".onnx":
        return run_onnx_tune(model, max_latency_ms, budget_s, out, cpu_count)
    return run_llama_tune(model, target, max_latency_ms, budget_s, out, cpu_count, n_ctx, max_tokens)
