"""`model.parallel` > 1: several generations decoded together in one context (engine/batch.py), on
the real tiny GGUF. Each test runs its generations on their own threads, as the executor does."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import pytest

from autoglm_wire.protocol import CompleteParams
from edge_agent.engine import Generation as EngineGeneration
from edge_agent.engine.batch import Job
from edge_agent.engine.llama import LlamaEngine
from edge_agent.engine.sampling import SamplerChain
from edge_agent.engine.settings import ModelConfig
from edge_agent.engine.watchdog import StallWatchdog

pytestmark = pytest.mark.integration

PROMPTS = ["Pump 3 reads", "Valve 7 is", "The sensor on line 2", "Compressor 4 reported"]
SYSTEM = "You are the maintenance assistant of plant 7. Answer in one short sentence about the pumps. " * 3


@pytest.fixture(scope="module")
def batched(tiny_model: Path) -> Iterator[LlamaEngine]:
    loaded = LlamaEngine(ModelConfig(path=tiny_model, n_ctx=512, n_threads=1, parallel=4))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def alone(tiny_model: Path) -> Iterator[LlamaEngine]:
    loaded = LlamaEngine(ModelConfig(path=tiny_model, n_ctx=512, n_threads=1))
    yield loaded
    loaded.close()


def greedy(prompt: str, max_tokens: int = 24, **extra: object) -> CompleteParams:
    return CompleteParams(prompt=prompt, max_tokens=max_tokens, temperature=0.0, **extra)  # type: ignore[arg-type]


def together(engine: LlamaEngine, calls: list[Callable[[], EngineGeneration]]) -> list[EngineGeneration]:
    """Run the calls at once, each on its own thread; their generations in order."""
    results: list[EngineGeneration | BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def complete(engine: LlamaEngine, params: CompleteParams, on_delta: object = None,
             cancel: threading.Event | None = None) -> Callable[[], EngineGeneration]:
    return lambda: engine.complete(params, on_delta, cancel or threading.Event())  # type: ignore[arg-type]


def test_a_greedy_command_gives_the_same_text_alone_as_inside_a_batch_of_4(
        batched: LlamaEngine, alone: LlamaEngine) -> None:
    by_itself = [batched.complete(greedy(p), None, threading.Event()).text for p in PROMPTS]
    in_batch = [g.text for g in together(batched, [complete(batched, greedy(p)) for p in PROMPTS])]
    assert in_batch == by_itself
    assert by_itself == [alone.complete(greedy(p), None, threading.Event()).text for p in PROMPTS], \
        "and the same as on the single-sequence path"
    assert len(set(in_batch)) == 4, "four different prompts, four different texts"


def test_a_seed_gives_the_same_text_on_both_paths(batched: LlamaEngine, alone: LlamaEngine) -> None:
    params = CompleteParams(prompt=PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.9, seed=11)
    texts = {g.text for g in together(batched, [complete(batched, params) for _ in range(3)])}
    assert texts == {alone.complete(params, None, threading.Event()).text}
    other_seed = params.model_copy(update={"seed": 12})
    assert batched.complete(other_seed, None, threading.Event()).text not in texts


def test_cancelling_one_sequence_leaves_the_others_running(batched: LlamaEngine) -> None:
    cancel = threading.Event()
    deltas: list[str] = []

    def cancel_after_three(delta: str) -> None:
        deltas.append(delta)
        if len(deltas) == 3:
            cancel.set()

    expected = [batched.complete(greedy(p, 48), None, threading.Event()).text for p in PROMPTS[1:]]
    results = together(batched, [complete(batched, greedy(PROMPTS[0], 48), cancel_after_three, cancel),
                                 *(complete(batched, greedy(p, 48)) for p in PROMPTS[1:])])
    assert results[0].finish_reason == "cancelled"
    assert results[0].completion_tokens < 48
    assert [g.finish_reason for g in results[1:]] == ["length"] * 3
    assert [g.text for g in results[1:]] == expected


def test_a_grammar_constrained_sequence_next_to_free_ones(batched: LlamaEngine) -> None:
    schema = {"type": "object", "properties": {"pump": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["pump", "ok"]}
    constrained = CompleteParams.model_validate({"prompt": "Status as JSON:", "max_tokens": 64, "temperature": 0.0,
                                                 "response_format": {"type": "json_schema", "schema": schema}})
    free = [greedy(p) for p in PROMPTS[:3]]
    expected = [batched.complete(p, None, threading.Event()).text for p in free]
    results = together(batched, [complete(batched, constrained), *(complete(batched, p) for p in free)])
    assert results[0].finish_reason == "stop"
    assert set(json.loads(results[0].text)) == {"pump", "ok"}
    assert [g.text for g in results[1:]] == expected, "the grammar constrains its own sequence only"


def test_stop_strings_end_one_sequence_as_on_the_single_path(batched: LlamaEngine, alone: LlamaEngine) -> None:
    text = batched.complete(greedy(PROMPTS[1]), None, threading.Event()).text
    stop = text[8:12]
    assert stop.strip() and stop in text
    stopped = greedy(PROMPTS[1], stop=[stop, "never appears"])
    results = together(batched, [complete(batched, stopped), *(complete(batched, greedy(p)) for p in PROMPTS[2:])])
    assert results[0].text == text[:text.index(stop)]
    assert results[0].finish_reason == "stop"
    reference = alone.complete(stopped, None, threading.Event())
    assert (results[0].text, results[0].completion_tokens) == (reference.text, reference.completion_tokens)
    assert all(g.finish_reason == "length" for g in results[1:])


def test_max_tokens_ends_each_sequence_at_its_own_count(batched: LlamaEngine) -> None:
    counts = [3, 9, 17, 30]
    results = together(batched, [complete(batched, greedy(p, n)) for p, n in zip(PROMPTS, counts, strict=True)])
    assert [g.completion_tokens for g in results] == counts
    assert {g.finish_reason for g in results} == {"length"}


def test_streamed_deltas_add_up_to_each_text(batched: LlamaEngine) -> None:
    streams: list[list[str]] = [[] for _ in PROMPTS]
    results = together(batched, [complete(batched, greedy(p), streams[i].append) for i, p in enumerate(PROMPTS)])
    assert ["".join(s) for s in streams] == [g.text for g in results]
    assert all(len(s) > 1 for s in streams)


def test_a_shared_system_prompt_is_evaluated_once_and_copied(tiny_model: Path, alone: LlamaEngine) -> None:
    prompts = [SYSTEM + question for question in ("Pump 1?", "Pump 2?", "Valve 3?")]
    engine = LlamaEngine(ModelConfig(path=tiny_model, n_ctx=512, n_threads=1, parallel=4))
    try:
        decoder = engine._decoder
        assert decoder is not None
        results = together(engine, [complete(engine, greedy(p)) for p in prompts])
        tokens = [engine._llm.tokenize(p.encode(), add_bos=True, special=True) for p in prompts]
        system = len(engine._llm.tokenize(SYSTEM.encode(), add_bos=True, special=True)) - 1  # ends mid-token?
        assert decoder.prompt_tokens_evaluated <= sum(map(len, tokens)) - 2 * system, "the system prompt once"
        assert [g.text for g in results] == [alone.complete(greedy(p), None, threading.Event()).text for p in prompts]
        before = decoder.prompt_tokens_evaluated
        again = engine.complete(greedy(prompts[0]), None, threading.Event())
        assert decoder.prompt_tokens_evaluated - before == 1, "a resident prompt: only its last token again"
        assert again.text == results[0].text
    finally:
        engine.close()


def test_every_sampler_chain_is_freed_also_when_the_stream_consumer_fails(batched: LlamaEngine) -> None:
    decoder = batched._decoder
    assert decoder is not None

    def job(cancel: threading.Event) -> Job:
        tokens = batched._llm.tokenize(PROMPTS[0].encode(), add_bos=True, special=True)
        return Job(tokens, 8, 0.7, 0.9, 1, [], None, cancel)

    done = job(threading.Event())
    decoder.generate(done, None, StallWatchdog(60))
    assert done.chain is not None and done.chain.closed

    def broken(delta: str) -> None:
        raise RuntimeError("stream consumer failed")

    failed = job(threading.Event())
    with pytest.raises(RuntimeError, match="stream consumer failed"):
        decoder.generate(failed, broken, StallWatchdog(60))
    assert failed.chain is not None and failed.chain.closed
    assert batched.complete(greedy(PROMPTS[0], 4), None, threading.Event()).text, "still generates afterwards"


def test_greedy_without_a_grammar_picks_what_llama_cpps_greedy_sampler_picks(alone: LlamaEngine) -> None:
    """The argmax path of SamplerChain (no llama.cpp chain) against llama.cpp's greedy sampler, row
    by row over real logits of the tiny model: the same token at every step."""
    llm = alone._llm
    ctx = llm._ctx.ctx
    fast = SamplerChain(llm._model.vocab, 0.0, 1.0, 1)
    reference = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(reference, llama_cpp.llama_sampler_init_greedy())
    picked: list[int] = []
    try:
        with alone._alone:  # no generation uses the context meanwhile
            llm.reset()
            llm.eval(llm.tokenize(PROMPTS[2].encode(), add_bos=True, special=True))
            for _ in range(12):
                token = fast.sample(ctx, -1)
                assert token == llama_cpp.llama_sampler_sample(reference, ctx, -1)
                picked.append(token)
                llm.eval([token])
    finally:
        llama_cpp.llama_sampler_free(reference)
        fast.close()
    assert fast.closed and len(set(picked)) > 1, "several distinct tokens were compared"
