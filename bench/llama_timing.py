"""What the llama.cpp benches share: timing one streamed completion, and their common options."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def time_stream(llm: Any, tokens: list[int], max_tokens: int, seed: int) -> tuple[float, float]:
    """(TTFT ms, decode tokens/s) of one `create_completion(stream=True)` on a `llama_cpp.Llama`.
    The stream ends with a chunk that only carries the finish reason: it is not a token, so it is
    not counted (counting it flattered the rate by 1/127 at 128 tokens)."""
    started = time.perf_counter()
    first = last = started
    count = 0
    for chunk in llm.create_completion(prompt=tokens, max_tokens=max_tokens, seed=seed, stream=True):
        choice = chunk["choices"][0]
        if choice["finish_reason"] is not None and not choice["text"]:
            continue
        last = time.perf_counter()
        if count == 0:
            first = last
        count += 1
    return (first - started) * 1000, (count - 1) / (last - first)


def model_parser(doc: str | None, threads: int, max_tokens: int) -> argparse.ArgumentParser:
    """`--model` (the bench GGUF), `--threads`, `--max-tokens`; the caller adds its own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "bench-glm4-q4_0.gguf")
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    return parser
