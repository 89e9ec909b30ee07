"""Time to first token with and without the prefix cache, through the agent's LlamaEngine.

A chat with a long shared system prompt (~N tokens) and a short, changing user message:
  cold      the context last held an unrelated prompt: the whole prompt is evaluated
  warm      the previous chat had the same system prompt: llama.cpp reuses the common prefix
  alternate two system prompts take turns; without a RAM cache each turn is cold, with
            `model.prefix_cache_mb` each finds its prefix's state in the cache

  python bench/prefix_cache.py                         # bench model, 1 thread
  python bench/prefix_cache.py --model models/tiny-glm4-q4_0.gguf
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoglm_wire.protocol import ChatParams  # noqa: E402
from edge_agent.engine.llama import LlamaEngine  # noqa: E402
from edge_agent.engine.settings import ModelConfig  # noqa: E402

RULES = "Rule {i}: report pressure, temperature and vibration of pump {i} in one short line. "


def system_prompt(tag: str, words: int) -> str:
    return f"You are the {tag} gateway assistant. " + "".join(RULES.format(i=i) for i in range(words // 16))


def ttft(engine: LlamaEngine, system: str, question: str) -> float:
    params = ChatParams(messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                        max_tokens=1, seed=1)
    return engine.chat(params, None, threading.Event()).ttft_ms


def measure(engine: LlamaEngine, runs: int, words: int) -> dict[str, float]:
    first, second, other = system_prompt("north", words), system_prompt("south", words), "unrelated " * 50
    cold, warm, alternate = [], [], []
    for run in range(runs):
        ttft(engine, other, "x")
        cold.append(ttft(engine, first, f"Pump {run}?"))
        warm.append(ttft(engine, first, f"Valve {run}?"))
        alternate.append(ttft(engine, second, f"Pump {run}?"))
        alternate.append(ttft(engine, first, f"Fan {run}?"))
    return {"cold": statistics.median(cold), "warm": statistics.median(warm),
            "alternate": statistics.median(alternate[2:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "bench-glm4-q4_0.gguf")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--words", type=int, default=600, help="length of the system prompt in words")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache-mb", type=int, default=512, help="model.prefix_cache_mb for the second pass")
    args = parser.parse_args()
    for cache_mb in (0, args.cache_mb):
        config = ModelConfig(path=args.model, n_ctx=2048, n_threads=args.threads, prefix_cache_mb=cache_mb)
        engine = LlamaEngine(config)
        try:
            prompt_tokens = len(engine._llm.tokenize(system_prompt("north", args.words).encode()))
            figures = measure(engine, args.runs, args.words)
        finally:
            engine.close()
        print(f"prefix_cache_mb={cache_mb:<4} system prompt {prompt_tokens} tokens: TTFT median "
              f"cold {figures['cold']:8.1f} ms   warm (same prefix) {figures['warm']:7.1f} ms   "
              f"two prefixes alternating {figures['alternate']:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
