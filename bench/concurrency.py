"""Concurrent chats: aggregate decode tokens/s with 1, 2, 4 and 8 chats in flight through the full
MQTT path (mosquitto -> `edge-agent run` with `model.parallel` = the largest count -> stream
chunks and replies), against
  (a) raw llama-cpp-python single-stream (`create_completion(stream=True)` in this process), and
  (b) raw llama.cpp batched decode of the same number of sequences through the low-level API in
      this process (greedy, one `llama_decode` per step: the limit),
both on the prompts the agent evaluates: each chat's user message in the GGUF's chat template, as
llama-cpp-python's `create_chat_completion` formats and tokenizes it.
Full path: each chat's tokens after its first over (last terminal reply - first stream chunk seen);
the aggregate is their sum over (last terminal reply - earliest first chunk). Per-stream time to
first token (publish -> first chunk with text) as P50/P95. The aggregate's window holds the
evaluation of the prompts that join after the first chat's first token (the chats arrive one after
the other), (b)'s holds none; "end to end" counts every token over the time from the first publish
(raw: from its prompts' evaluation) to the last reply, prompt evaluation on both sides. Each
message is timed when the client's on_message callback had it (where a user's code would), not
when the bench's thread woke up. Runs alternate: agent, then raw.

  python bench/concurrency.py                              # bench model, 2 threads, 128 tokens
  python bench/concurrency.py --counts 1,4 --rounds 3
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from llama_cpp import llama_chat_format  # noqa: E402
from llama_timing import model_parser, time_stream  # noqa: E402

from edge_agent.engine.llama import decide_repack, load_llama  # noqa: E402
from tests.support.agent_proc import AgentProcess  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.cloud import CloudClient, chat, command  # noqa: E402

PROMPT = "The gateway reported the following sensor readings and asked for a summary:"


def message(round_: int, i: int) -> str:
    """Chat `i`'s user message in round `round_` (a fresh one each round: no prompt cache serves it)."""
    return f"Round {round_}, pump {i}: {PROMPT}"


def chat_tokens(llm: llama_cpp.Llama, content: str) -> list[int]:
    """What `create_chat_completion` evaluates for one user message: the GGUF's chat template as
    llama-cpp-python sets it up (`Llama.__init__`), tokenized as its chat handler does."""
    def text(token: int) -> str:
        return llm._model.token_get_text(token) if token != -1 else ""

    formatter = llama_chat_format.Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                                      eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))
    result = formatter(messages=[{"role": "user", "content": content}])
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def raw_batched(llm: llama_cpp.Llama, prompts: list[list[int]], steps: int) -> tuple[float, float]:
    """(b): one sequence per prompt decoded together, greedy: (decode tokens/s after the prompts,
    end to end: every token, the first included, over the time from the prompts' evaluation on)."""
    ctx, mem = llm._ctx.ctx, llama_cpp.llama_get_memory(llm._ctx.ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llm._model.vocab)
    llama_cpp.llama_memory_clear(mem, True)
    n = len(prompts)
    batch = llama_cpp.llama_batch_init(max(llm.n_batch, sum(map(len, prompts))), 0, 1)

    def put(row: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[row], batch.pos[row], batch.n_seq_id[row], batch.logits[row] = token, pos, 1, logits
        batch.seq_id[row][0] = seq

    def argmax(row: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(n_vocab,))))

    try:
        rows, last_rows = 0, []
        for seq, prompt in enumerate(prompts):
            for pos, token in enumerate(prompt):
                put(rows, token, pos, seq, pos == len(prompt) - 1)
                rows += 1
            last_rows.append(rows - 1)
        batch.n_tokens = rows
        begun = time.perf_counter()
        assert llama_cpp.llama_decode(ctx, batch) == 0
        tokens = [argmax(row) for row in last_rows]
        started = time.perf_counter()
        for step in range(steps):
            for seq in range(n):
                put(seq, tokens[seq], len(prompts[seq]) + step, seq, True)
            batch.n_tokens = n
            assert llama_cpp.llama_decode(ctx, batch) == 0
            tokens = [argmax(seq) for seq in range(n)]
        ended = time.perf_counter()
        return n * steps / (ended - started), n * (steps + 1) / (ended - begun)
    finally:
        llama_cpp.llama_batch_free(batch)


class Agent:
    def __init__(self, work: Path, model: Path, threads: int, parallel: int, repack: bool) -> None:
        self.broker = Broker(work / "broker").start()
        config = work / "agent.toml"
        config.write_text(
            f'device_id = "bench"\ntelemetry_interval_s = 3600\n[mqtt]\nport = {self.broker.port}\n'
            f'[store]\npath = "{work / "agent.db"}"\n'
            f'[model]\npath = "{model.resolve()}"\nn_ctx = 1024\nn_batch = 512\nn_threads = {threads}\n'
            f"repack = {str(repack).lower()}\nparallel = {parallel}\n")
        self.agent = AgentProcess(config, work / "agent.log").start()
        self.cloud = CloudClient(self.broker.port)
        self.cloud.wait_online("bench", timeout=300)

    def run(self, n: int, max_tokens: int, round_: int) -> tuple[float, float, list[float]]:
        """(aggregate decode tokens/s, end-to-end tokens/s, per-stream ms to first text) of `n` chats
        sent at once."""
        jobs = [command("chat", chat(message(round_, i), max_tokens=max_tokens, seed=i,
                                     temperature=0.0, stream=True)) for i in range(n)]
        sent: dict[str, float] = {}
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        tokens = everything = 0
        seen = len(self.cloud.messages)
        for job in jobs:
            sent[job["id"]] = time.perf_counter()
            self.cloud.send("bench", job)

        def progress() -> bool:
            """Read only the messages that arrived since the last call (scanning all would steal a core)."""
            nonlocal seen, tokens, everything
            arrived = list(zip(self.cloud.messages[seen:], self.cloud.arrived_at[seen:], strict=True))
            for (topic, body), at in arrived:  # `at`: when the client's callback had it
                if not isinstance(body, dict):
                    continue
                cid = body.get("command_id", "")
                if "/stream/" in topic and body.get("delta") and cid not in first:
                    first[cid] = at
                elif topic.endswith("/reply") and body.get("status") == "succeeded" and cid in sent:
                    done.setdefault(cid, at)
                    tokens += body["output"]["usage"]["completion_tokens"] - 1
                    everything += body["output"]["usage"]["completion_tokens"]
            seen += len(arrived)
            return len(done) == n

        deadline = time.monotonic() + 600
        while not progress():  # every 20 ms: the times come from the callback; waking per chunk only costs CPU
            assert time.monotonic() < deadline, "timed out waiting for every chat's reply"
            time.sleep(0.02)
        aggregate = tokens / (max(done.values()) - min(first.values()))
        end_to_end = everything / (max(done.values()) - min(sent.values()))
        return aggregate, end_to_end, [(first[cid] - sent[cid]) * 1000 for cid in first]

    def close(self) -> None:
        self.cloud.close()
        self.agent.terminate()
        self.broker.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = model_parser(__doc__, threads=2, max_tokens=128)
    parser.add_argument("--counts", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per count after a warm-up round")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    repack = decide_repack("auto").enabled
    print(f"model {args.model.name}, {args.threads} threads, {args.max_tokens} tokens, repack {repack}")
    llm = load_llama(dict(model_path=str(args.model), n_ctx=1024 * max(counts), n_batch=512, n_threads=args.threads,
                          n_gpu_layers=0, verbose=False), repack, max(counts))
    prompt = chat_tokens(llm, message(0, 0))
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        agent = Agent(Path(tmp), args.model, args.threads, max(counts), repack)
        try:
            single = statistics.median(time_stream(llm, prompt, args.max_tokens, seed)[1] for seed in range(3))
            print(f"(a) raw single-stream: {single:.1f} tokens/s")
            print("chats | agent aggregate tok/s | (b) raw batched tok/s | agent/(b) | agent/(a) | end to end: agent, "
                  "(b), agent/(b) | TTFT P50 / P95 ms")
            for n in counts:
                agent.run(n, 8, -n)  # warm-up
                rates, limits, whole, whole_limits, ttfts = [], [], [], [], []
                for round_ in range(args.rounds):
                    rate, end_to_end, first = agent.run(n, args.max_tokens, round_)
                    rates.append(rate)
                    whole.append(end_to_end)
                    ttfts += first
                    prompts = [chat_tokens(llm, message(round_, i)) for i in range(n)]  # the agent's, token for token
                    limit, limit_end_to_end = raw_batched(llm, prompts, args.max_tokens)
                    limits.append(limit)
                    whole_limits.append(limit_end_to_end)
                rate, limit = statistics.median(rates), statistics.median(limits)
                end_to_end, limit_end_to_end = statistics.median(whole), statistics.median(whole_limits)
                print(f"{n:5d} | {rate:21.1f} | {limit:21.1f} | {rate / limit:8.2f} | {rate / single:8.2f} | "
                      f"{end_to_end:6.1f}, {limit_end_to_end:6.1f}, {end_to_end / limit_end_to_end:4.2f} | "
                      f"{percentile(ttfts, 0.5):.0f} / {percentile(ttfts, 0.95):.0f}")
        finally:
            agent.close()
            llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
