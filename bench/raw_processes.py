"""Raw llama-cpp-python against itself in a second process: the share of bench/inference.py's
TTFT overhead that comes from running the model in another process at all, with no agent code.
The bench process and a child process each load the same GGUF with the same settings (weights
as `model.repack = auto` decides) and take turns generating, as raw and the agent do in
bench/inference.py; each times its own completions.

  python bench/raw_processes.py                    # bench model, 1 thread, 128 tokens, 11 pairs
  python bench/raw_processes.py --child-first      # the child generates first in each pair
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_timing import model_parser, time_stream  # noqa: E402

from edge_agent.engine.llama import decide_repack, load_llama  # noqa: E402

PROMPT = "The gateway reported the following sensor readings and asked for a summary:"  # as bench/inference.py


def load(args: object) -> tuple[object, list[int]]:
    settings = dict(model_path=str(args.model), n_ctx=2048, n_batch=512, n_threads=args.threads,  # type: ignore[attr-defined]
                    n_gpu_layers=0, verbose=False)
    llm = load_llama(settings, decide_repack("auto").enabled)
    return llm, llm.tokenize(PROMPT.encode(), add_bos=True, special=True)


def main() -> int:
    parser = model_parser(__doc__, threads=1, max_tokens=128)
    parser.add_argument("--pairs", type=int, default=11)
    parser.add_argument("--child-first", action="store_true")
    parser.add_argument("--child", action="store_true", help="internal: serve seeds read from stdin")
    args = parser.parse_args()
    llm, tokens = load(args)
    if args.child:
        print("ready", flush=True)
        for line in sys.stdin:
            print(json.dumps(time_stream(llm, tokens, args.max_tokens, int(line))), flush=True)
        return 0
    child = subprocess.Popen([sys.executable, __file__, "--child", "--model", str(args.model), "--threads",
                              str(args.threads), "--max-tokens", str(args.max_tokens)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdin is not None and child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise SystemExit("the child process did not load the model")

    def in_child(seed: int) -> tuple[float, float]:
        child.stdin.write(f"{seed}\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        return tuple(json.loads(child.stdout.readline()))  # type: ignore[union-attr, return-value]

    here, there = [], []
    for seed in range(args.pairs + 1):  # pair 0 warms both up
        if args.child_first:
            pair = in_child(seed), time_stream(llm, tokens, args.max_tokens, seed)
        else:
            pair = time_stream(llm, tokens, args.max_tokens, seed), in_child(seed)
        if seed:
            here.append(pair[1] if args.child_first else pair[0])
            there.append(pair[0] if args.child_first else pair[1])
    child.stdin.close()
    child.wait()
    for name, runs in (("bench process", here), ("child process", there)):
        print(f"{name}: TTFT median {statistics.median(r[0] for r in runs):7.2f} ms   decode "
              f"{statistics.median(r[1] for r in runs):6.1f} tokens/s   ({len(runs)} runs)")
    print(f"child - bench process, paired median: TTFT "
          f"{statistics.median(t[0] - h[0] for h, t in zip(here, there, strict=True)):+.2f} ms, decode ratio "
          f"{statistics.median(t[1] / h[1] for h, t in zip(here, there, strict=True)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
