"""Continuous batching (`model.parallel` = N > 1): up to N generations decoded together in one
llama.cpp context, through llama-cpp-python's low-level bindings.

One decoder thread owns the context. Each generation (a `Job`) gets a slot, i.e. a sequence id of
the KV cache, and its own sampler chain (engine/sampling.py: temperature, top_p, seed, grammar).
Every step builds one `llama_batch`: the next token of every sequence that is generating, then
as many prompt tokens of joining sequences as `n_batch` leaves room for, so a long prompt is
evaluated in chunks between the running sequences' steps and their streams keep flowing. After
the step each generating sequence samples its token from its own batch row; stop strings,
`max_tokens`, end of generation and cancellation (checked before every step) end a sequence and
free its sampler chain. New jobs take free slots between steps, first come first served (the
executor admits commands by priority, engine/../executor.py).

The prompt prefix is shared, never evaluated twice: a finished sequence's KV cells stay in its
slot, and a new job takes the free slot whose tokens share the longest prefix with its prompt
(cutting the rest with `llama_memory_seq_rm`); if a busy slot shares a longer one (a system
prompt being evaluated or generated from right now), the job waits until that prefix is in the
cache and copies it with `llama_memory_seq_cp` (the unified KV cache shares the cells).

Callers run on their own threads (`generate`): the decoder hands them text through a queue, so
streaming, publishing and the stall watchdog never hold up the step.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import llama_cpp

from autoglm_wire.errors import ModelError
from edge_agent.engine import FinishReason, OnDelta, TextSink
from edge_agent.engine.prefix import MIN_GAIN_TOKENS, common_prefix
from edge_agent.engine.sampling import SamplerChain
from edge_agent.engine.stops import StopScan
from edge_agent.engine.watchdog import StallWatchdog

log = logging.getLogger(__name__)
WATCH_S = 0.05  # how often a waiting caller checks its stall watchdog


class Finished(NamedTuple):
    reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: FinishReason
    first_token_at: float | None
    completion_tokens: int


class Job:
    """One generation: its prompt and sampling, and what the decoder thread keeps about it."""

    def __init__(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float, seed: int,
                 stop: list[str], grammar: llama_cpp.LlamaGrammar | None, cancel: threading.Event) -> None:
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.temperature, self.top_p, self.seed, self.grammar = temperature, top_p, seed, grammar
        self.cancel = cancel
        self.abandoned = False  # the caller gave up (its stream consumer failed): end it like a cancel
        self.events: queue.SimpleQueue[str | Finished | Exception] = queue.SimpleQueue()
        # decoder thread only:
        self.chain: SamplerChain | None = None
        self.stops = StopScan(stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.donor: tuple[Slot, int, Job] | None = None  # (slot, tokens to copy, its job then)
        self.next_token: int | None = None  # sampled, evaluated in the next step
        self.generated = 0


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # the tokens this sequence holds in the KV cache
    job: Job | None = None

    def known(self) -> list[int]:
        """The tokens this sequence holds or is about to evaluate."""
        return self.cached + self.job.pending if self.job is not None else self.cached


def shared(tokens: list[int], prompt: list[int]) -> int:
    """Prompt tokens reusable from `tokens`; the prompt's last token is always evaluated (its logits)."""
    return min(common_prefix(tokens, prompt), len(prompt) - 1)


class BatchDecoder:
    def __init__(self, llm: llama_cpp.Llama, n_seq: int) -> None:
        self._ctx = llm._ctx.ctx
        self.vocab = llm._model.vocab
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        llama_cpp.llama_memory_clear(self._mem, True)
        self._n_batch = llm.n_batch
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self._slots = [Slot(seq_id) for seq_id in range(n_seq)]
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.prompt_tokens_evaluated = 0  # prompt tokens that went through llama_decode (shared ones did not)
        self._thread = threading.Thread(target=self._run, name="batch-decoder", daemon=True)
        self._thread.start()

    # --- callers' side ----------------------------------------------------------------------------

    def generate(self, job: Job, on_delta: OnDelta | None, watchdog: StallWatchdog) -> Outcome:
        """Queue `job`, pass its text to `on_delta` as it comes, return when it ended. `watchdog`
        (armed by the caller) hears every token and is checked while waiting."""
        with self._cond:
            if self._closed:
                raise ModelError("the engine is closed")
            self._waiting.append(job)
            self._cond.notify()
        sink = TextSink(on_delta, watchdog.tick)
        try:
            while True:
                try:
                    event = job.events.get(timeout=WATCH_S)
                except queue.Empty:
                    watchdog.check()
                    continue
                if isinstance(event, Finished):
                    return Outcome(sink.text, event.reason, sink.first_token_at, event.completion_tokens)
                if isinstance(event, Exception):
                    raise event
                sink.token(event)
        except BaseException:
            job.abandoned = True
            self._wait_ended(job)
            raise

    def _wait_ended(self, job: Job) -> None:
        """After the caller gave up: the decoder ends the job (and frees its chain) within one step."""
        while self._thread.is_alive():
            try:
                if isinstance(job.events.get(timeout=WATCH_S), Finished | Exception):
                    return
            except queue.Empty:
                continue

    def close(self) -> None:
        """End every job (ModelError), stop the thread, free the batch. The caller frees the context."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)

    # --- the decoder thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not any(s.job for s in self._slots):
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            try:
                self._step()
            except Exception as exc:  # a failed decode: every sequence in the context fails with it
                log.exception("batched decode failed")
                with self._cond:
                    self._fail_all(exc if isinstance(exc, ModelError) else ModelError(f"llama.cpp failed: {exc!r}"))
        with self._cond:
            self._fail_all(ModelError("the engine was closed while this generation ran"))

    def _admit(self) -> None:
        while self._waiting and any(s.job is None for s in self._slots):
            job = self._waiting.popleft()
            try:
                job.chain = SamplerChain(self.vocab, job.temperature, job.top_p, job.seed, job.grammar)
            except ModelError as exc:
                job.events.put(exc)
                continue
            self._place(job)

    def _place(self, job: Job) -> None:
        """Into the free slot sharing the longest prefix, or copy a longer one from a busy slot."""
        slot = max((s for s in self._slots if s.job is None), key=lambda s: shared(s.cached, job.prompt))
        share = shared(slot.cached, job.prompt)
        donors = [(s, shared(s.known(), job.prompt)) for s in self._slots if s.job is not None]
        donor, donor_share = max(donors, key=lambda d: d[1], default=(None, 0))
        if donor is not None and donor.job is not None and donor_share > share and donor_share >= MIN_GAIN_TOKENS:
            share = 0
            job.donor = (donor, donor_share, donor.job)
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, share, -1)
        del slot.cached[share:]
        job.pending = [] if job.donor else job.prompt[share:]
        slot.job = job

    def _copy_from_donor(self, slot: Slot, job: Job) -> bool:
        """Copy the shared prefix once the donor holds it (or as much as it holds, if it ended)."""
        assert job.donor is not None
        donor, share, donor_job = job.donor
        have = min(common_prefix(donor.cached, job.prompt), share)
        if have < share and donor.job is donor_job:
            return False
        if have:
            llama_cpp.llama_memory_seq_cp(self._mem, donor.seq_id, slot.seq_id, 0, have)
        slot.cached = job.prompt[:have]
        job.pending = job.prompt[have:]
        job.donor = None
        return True

    def _step(self) -> None:
        for slot in self._slots:
            if slot.job is not None and (slot.job.cancel.is_set() or slot.job.abandoned):
                self._finish(slot, "cancelled")
        rows: list[tuple[Slot, int]] = []  # (slot, batch row) of every row to sample from
        n = 0
        generating = [s for s in self._slots if s.job is not None and s.job.next_token is not None]
        for slot in generating:
            assert slot.job is not None and slot.job.next_token is not None
            self._put(n, slot.job.next_token, len(slot.cached), slot.seq_id, True)
            rows.append((slot, n))
            n += 1
        chunks: list[tuple[Slot, list[int]]] = []
        for slot in self._slots:
            job = slot.job
            if job is None or job.next_token is not None or n >= self._n_batch:
                continue
            if job.donor is not None and not self._copy_from_donor(slot, job):
                continue
            chunk = job.pending[:self._n_batch - n]
            for i, token in enumerate(chunk):
                last = len(chunk) == len(job.pending) and i == len(chunk) - 1
                self._put(n, token, len(slot.cached) + i, slot.seq_id, last)
                if last:
                    rows.append((slot, n))
                n += 1
            chunks.append((slot, chunk))
        if n == 0:
            return
        self._batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise ModelError(f"llama_decode returned {status} with {n} tokens in the batch")
        for slot in generating:
            assert slot.job is not None and slot.job.next_token is not None
            slot.cached.append(slot.job.next_token)
        for slot, chunk in chunks:
            assert slot.job is not None
            slot.cached.extend(chunk)
            del slot.job.pending[:len(chunk)]
            self.prompt_tokens_evaluated += len(chunk)
        for slot, row in rows:
            assert slot.job is not None and slot.job.chain is not None
            self._accept(slot, slot.job.chain.sample(self._ctx, row))

    def _put(self, row: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        batch.token[row], batch.pos[row], batch.n_seq_id[row], batch.logits[row] = token, pos, 1, logits
        batch.seq_id[row][0] = seq_id

    def _accept(self, slot: Slot, token: int) -> None:
        job = slot.job
        assert job is not None
        job.next_token = None
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, "stop")
            return
        job.generated += 1
        shown, stopped = job.stops.feed(job.utf8.decode(self._token_bytes(token)))
        job.events.put(shown)
        if stopped:
            self._finish(slot, "stop", flush=False)
        elif job.generated >= job.max_tokens:
            self._finish(slot, "length")
        else:
            job.next_token = token

    def _token_bytes(self, token: int) -> bytes:
        size = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if size < 0:
            self._piece = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:size]

    def _finish(self, slot: Slot, reason: FinishReason, flush: bool = True) -> None:
        """End the slot's job: its held-back text, its sampler chain freed, its outcome. Its KV
        cells stay for the next job sharing its prefix."""
        job = slot.job
        assert job is not None
        if flush:
            tail = job.stops.feed(job.utf8.decode(b"", final=True))[0] + job.stops.flush()
            if tail:
                job.events.put(tail)
        if job.chain is not None:
            job.chain.close()
        slot.job = None
        job.events.put(Finished(reason, job.generated))

    def _fail_all(self, error: Exception) -> None:
        for slot in self._slots:
            job = slot.job
            if job is not None:
                if job.chain is not None:
                    job.chain.close()
                slot.job = None
                job.events.put(error)
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, 0, -1)
            slot.cached = []
        while self._waiting:
            self._waiting.popleft().events.put(error)
