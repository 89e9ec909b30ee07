"""Inference overhead of the agent against raw llama-cpp-python, on the same model and prompt.

  (a) raw: llama_cpp.Llama in this process, `create_completion(stream=True)` on the prompt tokens
  (b) full path: `complete` command over MQTT -> edge-agent (subprocess) -> stream chunks + reply

Both use the same GGUF, n_ctx, n_batch, n_threads, seed and max_tokens; raw and full-path runs
alternate (never at the same time: the machine has 2 cores), so drift hits both alike.
Reported per run: TTFT (raw: call -> first token; full path: MQTT publish -> first stream chunk
in the client's on_message callback, where a user's code would have it)
and decode tokens/s (tokens after the first over the time after the first).
Memory: the agent's RSS with the model loaded minus the RSS of a raw process that loaded the
same model and generated the same text.

  python bench/inference.py                       # bench model (make bench-model), 5 runs each
  python bench/inference.py --model models/tiny-glm4-q4_0.gguf --runs 3 --max-tokens 64
  python bench/inference.py --chat                # chat path, a fresh user message each run

`--chat` measures what a user compares: raw `create_chat_completion(stream=True)` against a
streamed `chat` command, a user message neither process has seen before, time to the first
non-empty text (raw: the first delta with content; full path: the first stream chunk with text).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_timing import model_parser, time_stream  # noqa: E402

from edge_agent.engine.llama import decide_repack, load_llama  # noqa: E402
from tests.support.agent_proc import AgentProcess  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.cloud import CloudClient, command  # noqa: E402

TERMINAL = frozenset({"succeeded", "failed", "rejected", "expired", "cancelled"})
PROMPT = "The gateway reported the following sensor readings and asked for a summary:"


def fresh_message(run: int) -> str:
    """A user message no earlier run sent (no prompt cache can serve it)."""
    return (f"Reading {run}: pump {run % 7} at {100 + 3 * run} kPa, vibration {run % 5} mm/s. "
            "Summarize for the operator.")


# Raw llama-cpp-python, with only the weight-repacking switch the agent decided (engine/repack.py)
# set the raw way: importing edge_agent here would add its own imports to the baseline's RSS.
RAW_RSS_SCRIPT = """
import sys, llama_cpp, llama_cpp.llama_cpp as lib
defaults = lib.llama_model_default_params
def repack_params():
    params = defaults()
    params.use_extra_bufts = sys.argv[7] == "1"
    return params
lib.llama_model_default_params = repack_params
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=int(sys.argv[3]),
                      n_threads=int(sys.argv[4]), n_gpu_layers=0, verbose=False)
for _ in llm.create_completion(prompt=sys.argv[5], max_tokens=int(sys.argv[6]), seed=1, stream=True):
    pass
with open("/proc/self/status") as f:
    print(next(l for l in f if l.startswith("VmRSS")).split()[1])
"""


RAW_ECHO_SCRIPT = """
import json, sys, paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from autoglm_wire.mqtt_session import disable_nagle
def on_message(client, userdata, message):
    command_id = json.loads(message.payload)["id"]
    client.publish(f"autoglm/echo/stream/{command_id}", b"{}", qos=0)
client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="echo")
client.on_socket_open = disable_nagle
client.on_message = on_message
client.on_connect = lambda c, *a: (c.subscribe("autoglm/echo/cmd", qos=1), print("ready", flush=True))
client.connect("127.0.0.1", int(sys.argv[1]))
client.loop_forever()
"""


class RawEcho:
    """The transport baseline: a raw paho client in its own process that answers each command
    with one QoS 0 message, as the agent answers with its first stream chunk. Its round trip is
    the part of the full-path TTFT that the MQTT hops alone cost."""

    def __init__(self, path: AgentPath) -> None:
        self.cloud = path.cloud
        self.process = subprocess.Popen([sys.executable, "-c", RAW_ECHO_SCRIPT, str(path.broker.port)],
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def run(self) -> float:
        cmd = command("ping")
        started = time.perf_counter()
        self.cloud.send("echo", cmd)
        self.cloud.wait_for(lambda: self.cloud.count(cmd["id"]) > 0, 60, "echo")
        return (arrival(self.cloud, f"/stream/{cmd['id']}") - started) * 1000

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def arrival(cloud: CloudClient, suffix: str, holds: Callable[[dict], Any] = lambda body: True) -> float:
    """When the client's on_message had the first such message (where a user's code would show
    it), not when the waiting thread woke up: that wake-up is the bench's, not the agent's."""
    at = cloud.first_arrival(suffix, holds)
    assert at is not None, f"no message on *{suffix} arrived"
    return at


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])


class RawModel:
    """Raw llama-cpp-python in this process: the baseline."""

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        self.llm = load_llama(dict(model_path=str(model), n_ctx=args.n_ctx, n_batch=args.n_batch,
                                   n_threads=args.threads, n_gpu_layers=0, verbose=False), repack_enabled(args))
        self.tokens = self.llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
        self.max_tokens = args.max_tokens

    def run(self, seed: int) -> tuple[float, float]:
        """(TTFT ms, decode tokens/s) of one streamed completion."""
        return time_stream(self.llm, self.tokens, self.max_tokens, seed)

    def run_chat(self, seed: int) -> tuple[float, float]:
        """(ms to the first non-empty text, decode pieces/s) of one streamed chat on a fresh message."""
        started = time.perf_counter()
        first = last = 0.0
        pieces = 0
        for chunk in self.llm.create_chat_completion(messages=[{"role": "user", "content": fresh_message(seed)}],
                                                     max_tokens=self.max_tokens, seed=seed, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                pieces += 1
        return (first - started) * 1000, (pieces - 1) / (last - first) if pieces > 1 else 0.0

    def close(self) -> None:
        self.llm.close()


class AgentPath:
    """The full path: a private mosquitto, `edge-agent run` on the same model, a cloud client."""

    def __init__(self, model: Path, args: argparse.Namespace, work: Path) -> None:
        self.broker = Broker(work / "broker").start()
        config = work / "agent.toml"
        config.write_text(
            f'device_id = "bench"\ntelemetry_interval_s = 3600\n[mqtt]\nport = {self.broker.port}\n'
            f'[store]\npath = "{work / "agent.db"}"\nsynchronous = "{args.synchronous}"\n'
            f'[model]\npath = "{model.resolve()}"\nn_ctx = {args.n_ctx}\n'
            f"n_batch = {args.n_batch}\nn_threads = {args.threads}\nrepack = {str(repack_enabled(args)).lower()}\n"
        )
        self.agent = AgentProcess(config, work / "agent.log").start()
        self.cloud = CloudClient(self.broker.port)
        self.cloud.wait_online("bench", timeout=300)
        self.max_tokens = args.max_tokens
        self.engine_tokens_per_s: list[float] = []  # as the agent measured it, inside its process
        self.engine_ttft_ms: list[float] = []
        self.queue_ms: list[float] = []

    def run(self, seed: int) -> tuple[float, float]:
        """(TTFT ms: publish -> first chunk, decode tokens/s: first chunk -> terminal reply)."""
        cmd = command("complete", {"prompt": PROMPT, "max_tokens": self.max_tokens, "seed": seed, "stream": True})
        return self._timed(cmd)

    def run_chat(self, seed: int) -> tuple[float, float]:
        """(ms publish -> first stream chunk with text, decode tokens/s) of a streamed chat on a fresh message."""
        # temperature 0.2: create_chat_completion's default, so both paths sample alike from the same seed
        return self._timed(command("chat", {"messages": [{"role": "user", "content": fresh_message(seed)}],
                                            "max_tokens": self.max_tokens, "seed": seed, "temperature": 0.2,
                                            "stream": True}))

    def _timed(self, cmd: dict) -> tuple[float, float]:
        """Publish `cmd`; (TTFT ms: publish -> first chunk with text, decode tokens/s: that chunk -> the
        terminal reply), both as the client's on_message had them. The bench polls every 20 ms and
        reads only the messages that arrived since (waking on each message and scanning them all
        would spend the CPU the agent runs on). The agent's own figures are kept."""
        stream, seen = f"/stream/{cmd['id']}", len(self.cloud.messages)
        first: float | None = None
        started = time.perf_counter()
        self.cloud.send("bench", cmd)
        deadline = started + 600
        while True:
            arrived = list(zip(self.cloud.messages[seen:], self.cloud.arrived_at[seen:], strict=True))
            seen += len(arrived)
            for (topic, body), at in arrived:
                if not isinstance(body, dict):
                    continue
                if first is None and topic.endswith(stream) and body.get("delta"):
                    first = at
                elif topic.endswith("/reply") and body.get("command_id") == cmd["id"] and body["status"] in TERMINAL:
                    assert first is not None, f"{cmd['id']} ended {body['status']} before any text: {body}"
                    return self._figures(body, started, first, at)
            assert time.perf_counter() < deadline, f"no terminal reply for {cmd['id']}"
            time.sleep(0.02)

    def _figures(self, reply: dict, started: float, first: float, done: float) -> tuple[float, float]:
        self.engine_tokens_per_s.append(reply["metrics"]["tokens_per_s"])
        self.engine_ttft_ms.append(reply["metrics"]["ttft_ms"])
        self.queue_ms.append(reply["metrics"]["queue_ms"])
        tokens = reply["output"]["usage"]["completion_tokens"]
        return (first - started) * 1000, (tokens - 1) / (done - first)

    def rss_kib(self) -> int:
        assert self.agent.process is not None
        return rss_kib(self.agent.process.pid)

    def close(self) -> None:
        self.cloud.close()
        self.agent.terminate()
        self.broker.stop()


def repack_enabled(args: argparse.Namespace) -> bool:
    """`--repack` as the agent decides it (engine/repack.py); raw loads the weights the same way."""
    return decide_repack({"auto": "auto", "true": True, "false": False}[args.repack]).enabled


def raw_rss_kib(model: Path, args: argparse.Namespace) -> int:
    out = subprocess.run([sys.executable, "-c", RAW_RSS_SCRIPT, str(model), str(args.n_ctx), str(args.n_batch),
                          str(args.threads), PROMPT, str(args.max_tokens), "1" if repack_enabled(args) else "0"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def summarize(name: str, runs: list[tuple[float, float]]) -> dict[str, float]:
    ttft = statistics.median(r[0] for r in runs)
    tps = statistics.median(r[1] for r in runs)
    print(f"{name:>10}: TTFT median {ttft:8.2f} ms   decode {tps:8.1f} tokens/s   ({len(runs)} runs)")
    return {"ttft_ms": ttft, "tokens_per_s": tps}


def main() -> int:
    parser = model_parser(__doc__, threads=2, max_tokens=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=1,
                        help="repeat with a fresh agent process and a freshly loaded raw model, which of the two "
                             "loads first alternating: the first decode step's speed differs between processes "
                             "(docs/performance.md); use an even number")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--repack", choices=["auto", "true", "false"], default="auto",
                        help="model.repack for both paths (llama.cpp's CPU weight repacking)")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full",
                        help="the agent's store.synchronous (full: an fsync per commit, two before the first token)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--chat", action="store_true",
                        help="chat path with a fresh user message each run, timed to the first non-empty text")
    args = parser.parse_args()
    if not args.model.exists():
        raise SystemExit(f"{args.model} is missing: run `make bench-model` (or pass --model)")
    print(f"model {args.model.name}, prompt {len(PROMPT)} chars, {args.max_tokens} tokens, {args.threads} threads")
    raw_results: list[tuple[float, float]] = []
    agent_results: list[tuple[float, float]] = []
    echo_ms: list[float] = []
    engine_rates: list[float] = []
    engine_ttfts: list[float] = []
    queues: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        for session in range(args.sessions):  # fresh processes (agent) and a fresh raw model each time
            work = Path(tmp) / f"session-{session}"
            work.mkdir()
            # On a VM the process that loads the model second can evaluate its first token 7-15 ms
            # faster for its whole life, raw or agent (docs/performance.md, eleventh session): the
            # sessions take turns at loading first, so that the order does not pick the winner.
            if session % 2:
                baseline = RawModel(args.model, args)
                path = AgentPath(args.model, args, work)
            else:
                path = AgentPath(args.model, args, work)
                baseline = RawModel(args.model, args)
            echo = RawEcho(path)
            try:
                for run in range(args.runs + 1):  # run 0 warms both up; runs alternate to share the drift
                    if args.chat:
                        raw_sample, agent_sample = baseline.run_chat(run), path.run_chat(run)
                    else:
                        raw_sample, agent_sample = baseline.run(run), path.run(run)
                    echo_sample = echo.run()
                    if run:
                        raw_results.append(raw_sample)
                        agent_results.append(agent_sample)
                        echo_ms.append(echo_sample)
                agent_rss = path.rss_kib()
                engine_rates += path.engine_tokens_per_s[1:]
                engine_ttfts += path.engine_ttft_ms[1:]
                queues += path.queue_ms[1:]
            finally:
                echo.close()
                baseline.close()
                path.close()
    inside, inside_ttft, queue = (statistics.median(v) for v in (engine_rates, engine_ttfts, queues))
    raw = summarize("raw", raw_results)
    full = summarize("full path", agent_results)
    print(f"{'(agent)':>10}: decode {inside:8.1f} tokens/s measured inside the agent process; "
          f"engine TTFT {inside_ttft:.2f} ms; queue_ms (stored -> started; 0: started early, while stored) {queue:.2f}")
    transport = statistics.median(echo_ms)
    print(f"{'(mqtt)':>10}: raw paho echo round trip (cloud -> broker -> echo process -> broker -> cloud) "
          f"{transport:.2f} ms median: the hops' share of the TTFT overhead")
    raw_rss = raw_rss_kib(args.model, args)
    figures = {
        "throughput_ratio": full["tokens_per_s"] / raw["tokens_per_s"],
        "throughput_ratio_paired": statistics.median(
            a[1] / r[1] for a, r in zip(agent_results, raw_results, strict=True)),
        "ttft_overhead_ms": full["ttft_ms"] - raw["ttft_ms"],
        # runs alternate, so each pair shares the machine's state: less noisy than the medians' difference
        "ttft_overhead_paired_ms": statistics.median(
            a[0] - r[0] for a, r in zip(agent_results, raw_results, strict=True)),
        "mqtt_round_trip_ms": transport,
        "agent_rss_mb": agent_rss / 1024,
        "raw_rss_mb": raw_rss / 1024,
        "rss_overhead_mb": (agent_rss - raw_rss) / 1024,
    }
    print(f"throughput ratio (full/raw): {figures['throughput_ratio']:.3f} (ratio of medians), "
          f"{figures['throughput_ratio_paired']:.3f} (median of per-run ratios)   (target >= 0.95)")
    print(f"TTFT overhead: {figures['ttft_overhead_ms']:+.2f} ms (difference of medians), "
          f"{figures['ttft_overhead_paired_ms']:+.2f} ms (median of per-run differences)   "
          f"(target <= {2 if args.chat else 5} ms)")  # the chat path's first visible text: issue #15
    print(f"RSS: agent {figures['agent_rss_mb']:.1f} MB, raw {figures['raw_rss_mb']:.1f} MB, "
          f"overhead {figures['rss_overhead_mb']:+.1f} MB   (target <= 40 MB)")
    if args.json:  # with every run's (TTFT ms, tokens/s), raw and full path, to pool runs of the bench
        runs = {"raw_runs": raw_results, "full_runs": agent_results}
        print(json.dumps({"raw": raw, "full": full, **figures, **runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
