"""llama-cpp-python 0.3.36 builds a sampler chain per completion and never frees the previous one
(~1.75 MB of RSS per command with GLM-4's vocabulary); the engine frees it after every generation,
also one that ended in an error. On the real tiny GGUF. And the agent with `model.parallel = 4` over
a raw process decoding 4 sequences in one context: <= 40 MB."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoglm_wire.protocol import CompleteParams
from edge_agent.engine.llama import LlamaEngine
from edge_agent.engine.settings import ModelConfig
from tests.conftest import AgentFactory
from tests.support.broker import Broker
from tests.support.cloud import CloudClient, chat, command

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[LlamaEngine]:
    loaded = LlamaEngine(ModelConfig(path=tiny_model, n_ctx=512, n_threads=1))
    yield loaded
    loaded.close()


def complete(engine: LlamaEngine, on_delta: object = None) -> str:
    params = CompleteParams(prompt="Pump 3 reads", max_tokens=8, seed=4, temperature=0.7)
    return engine.complete(params, on_delta, threading.Event()).text  # type: ignore[arg-type]


def test_no_sampler_outlives_a_generation_and_outputs_stay_reproducible(engine: LlamaEngine) -> None:
    first = complete(engine)
    assert engine._llm._sampler is None
    assert complete(engine) == first, "same seed, same text, with the sampler freed in between"
    assert engine._llm._sampler is None


def test_the_sampler_is_freed_when_the_generation_fails(engine: LlamaEngine) -> None:
    def broken(delta: str) -> None:
        raise RuntimeError("stream consumer failed")

    with pytest.raises(Exception, match="stream consumer failed"):
        complete(engine, broken)
    assert engine._llm._sampler is None
    assert complete(engine), "the engine still generates afterwards"


RAW_BATCHED_RSS = """
import sys, llama_cpp as L
path, n_seq, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
params = L.llama_context_default_params()
params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = n_ctx * n_seq, 512, 1, 1
params.n_seq_max, params.kv_unified = n_seq, True
params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
ctx = L.llama_init_from_model(model, params)
batch = L.llama_batch_init(512, 0, 1)
for step in range(8):
    for seq in range(n_seq):
        batch.token[seq], batch.pos[seq], batch.n_seq_id[seq], batch.logits[seq] = 100 + step, step, 1, True
        batch.seq_id[seq][0] = seq
    batch.n_tokens = n_seq
    assert L.llama_decode(ctx, batch) == 0
with open("/proc/self/status") as f:
    print(next(l for l in f if l.startswith("VmRSS")).split()[1])
"""


def test_the_agent_with_4_sequences_costs_at_most_40_mb_over_a_raw_process_with_4(
        tiny_model: Path, session_broker: Broker, start_agent: AgentFactory) -> None:
    agent, device_id, _ = start_agent(session_broker, tail="parallel = 4\n")
    cloud = CloudClient(session_broker.port, client_id="cloud-batched-rss")
    try:
        cloud.wait_online(device_id, timeout=60)
        jobs = [command("chat", chat(f"pump {i}", max_tokens=32, seed=i)) for i in range(8)]
        for job in jobs:
            cloud.send(device_id, job)
        for job in jobs:
            assert cloud.wait_terminal(job["id"], timeout=120)["status"] == "succeeded"
        assert agent.process is not None
        agent_kib = rss_kib(agent.process.pid)
    finally:
        cloud.close()
    out = subprocess.run([sys.executable, "-c", RAW_BATCHED_RSS, str(tiny_model), "4", "4096"],
                         capture_output=True, text=True, check=True)
    raw_kib = int(out.stdout.strip().splitlines()[-1])
    assert (agent_kib - raw_kib) / 1024 <= 40, f"agent {agent_kib} KiB, raw {raw_kib} KiB"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])
