"""The engine's own cost, without MQTT: `LlamaEngine.complete` (watchdog, stopping criterion,
streaming callback through the ChunkStreamer) against raw `create_completion` on the same `Llama`
object, same prompt tokens, interleaved. Separates what the engine adds from machine noise and
from the MQTT path measured by bench/inference.py.

  python bench/engine_overhead.py                          # bench model, 1 thread, 128 tokens, 7 rounds
  python bench/engine_overhead.py --model models/tiny-glm4-q4_0.gguf --rounds 30
"""

from __future__ import annotations

import statistics
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_timing import model_parser, time_stream  # noqa: E402

from autoglm_wire.protocol import CompleteParams  # noqa: E402
from edge_agent.config import MqttConfig  # noqa: E402
from edge_agent.engine.llama import LlamaEngine  # noqa: E402
from edge_agent.engine.settings import ModelConfig  # noqa: E402
from edge_agent.engine.stream import ChunkStreamer  # noqa: E402

PROMPT = "The gateway reported the following sensor readings and asked for a summary:"
STREAM_INTERVAL_S = MqttConfig().stream_interval_ms / 1000  # the agent's default coalescing interval


def raw(engine: LlamaEngine, tokens: list[int], seed: int, max_tokens: int) -> tuple[float, float]:
    """As bench/inference.py's raw run, on the engine's own `Llama`."""
    return time_stream(engine._llm, tokens, max_tokens, seed)


def through_engine(engine: LlamaEngine, seed: int, max_tokens: int) -> tuple[float, float]:
    streamer = ChunkStreamer("autoglm/bench/stream/x", "x", lambda topic, payload: None, STREAM_INTERVAL_S)
    params = CompleteParams(prompt=PROMPT, max_tokens=max_tokens, seed=seed, stream=True)
    generation = engine.complete(params, streamer.delta, threading.Event())
    return generation.ttft_ms, generation.tokens_per_s


def main() -> int:
    parser = model_parser(__doc__, threads=1, max_tokens=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    engine = LlamaEngine(ModelConfig(path=args.model, n_ctx=2048, n_threads=args.threads))
    tokens = engine._llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    raws, ours = [], []
    try:
        for seed in range(args.rounds + 1):  # round 0 warms up
            pair = raw(engine, tokens, seed, args.max_tokens), through_engine(engine, seed, args.max_tokens)
            if seed:
                raws.append(pair[0])
                ours.append(pair[1])
    finally:
        engine.close()
    for name, runs in (("raw", raws), ("engine", ours)):
        print(f"{name:>7}: TTFT median {statistics.median(r[0] for r in runs):7.2f} ms   decode "
              f"{statistics.median(r[1] for r in runs):7.1f} tokens/s")
    ratio = statistics.median(o[1] / r[1] for r, o in zip(raws, ours, strict=True))
    extra = statistics.median(o[0] - r[0] for r, o in zip(raws, ours, strict=True))
    print(f"engine/raw decode ratio (median of pairs) {ratio:.3f}; TTFT difference (median of pairs) {extra:+.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
