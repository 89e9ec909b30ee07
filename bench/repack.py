"""What llama.cpp's CPU weight repacking (`model.repack`, engine/repack.py) is worth on this
machine: the same GGUF loaded with repacking on and off, each round in a fresh process (a crash
is reported, not fatal), alternating, measured on a long prompt's evaluation (batched matrix
products, where repacked or AMX kernels matter most) and on decode. Prints this build's CPU
features (an AMX build is where `auto` turns repacking off).

  python bench/repack.py                              # bench model, 1 thread, 7 rounds
  python bench/repack.py --threads 2 --rounds 11
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama_cpp  # noqa: E402
from llama_timing import model_parser, time_stream  # noqa: E402

from edge_agent.engine.llama import decide_repack, load_llama  # noqa: E402

SENTENCE = "Pump 3 reported pressure 4.2 bar, flow 31 l/min and a vibration peak at 120 Hz. "


def measure(llm: llama_cpp.Llama, tokens: list[int], max_tokens: int) -> tuple[float, float]:
    """(prompt evaluation ms, decode tokens/s) of one completion, the whole prompt evaluated (`reset`)."""
    llm.reset()
    return time_stream(llm, tokens, max_tokens, seed=1)


def child(args: argparse.Namespace) -> int:
    """One measurement in its own process, so a crash of one setting does not end the bench."""
    settings = dict(model_path=str(args.model), n_ctx=2048, n_batch=512, n_threads=args.threads,
                    n_gpu_layers=0, verbose=False)
    llm = load_llama(settings, args.child == "on")
    tokens = llm.tokenize((SENTENCE * 40).encode(), add_bos=True, special=True)[: args.prompt_tokens]
    measure(llm, tokens, 4)  # warm-up
    print(json.dumps(measure(llm, tokens, args.max_tokens)))
    llm.close()
    return 0


def main() -> int:
    parser = model_parser(__doc__, threads=1, max_tokens=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(llama_cpp.llama_print_system_info().decode().strip())
    print(f"model.repack = auto here: {decide_repack('auto').reason}")
    runs: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    crashes: dict[str, list[str]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        for name in runs:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--model", str(args.model),
                                  "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                                  "--max-tokens", str(args.max_tokens)], capture_output=True, text=True)
            if out.returncode == 0:
                runs[name].append(tuple(json.loads(out.stdout.strip().splitlines()[-1])))
            else:
                code = out.returncode
                crashes[name].append(signal.Signals(-code).name if code < 0 else f"exit {code}")
    for name, results in runs.items():
        line = f"repack {name:>3}: "
        if results:
            prompt_ms, rate = statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)
            line += (f"prompt ({args.prompt_tokens} tokens) median {prompt_ms:8.1f} ms   decode median "
                     f"{rate:6.1f} tokens/s   ({len(results)} rounds)")
        if crashes[name]:
            how = ", ".join(sorted(set(crashes[name])))
            line += f"   crashed in {len(crashes[name])} of {args.rounds} rounds ({how})"
        print(line)
    if runs["on"] and runs["off"]:
        pairs = list(zip(runs["off"], runs["on"], strict=False))
        print(f"off / on, paired medians: prompt time x{statistics.median(o[0] / n[0] for o, n in pairs):.3f}, "
              f"decode rate x{statistics.median(o[1] / n[1] for o, n in pairs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
