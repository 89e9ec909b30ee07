"""A cache of KV states for several prompt prefixes (`model.prefix_cache_mb`).

llama.cpp already reuses the longest prefix a prompt shares with the *previous* one. With two or
more long system prompts taking turns that reuse never happens; this cache keeps the KV cache of
recent prompts (`llama_state_seq_get_data`: the KV cells only, no logits, unlike LlamaRAMCache,
which also copies n_batch x n_vocab scores: ~300 MB per entry with GLM-4's vocabulary) and,
before a generation, loads the entry sharing the longest prefix when that beats what the context
holds. Entries are evicted least recently used first. `best_entry` is the pure decision.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from typing import Any

import llama_cpp

log = logging.getLogger(__name__)
MIN_GAIN_TOKENS = 16  # loading a state costs a copy: only worth it for a real head start


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def best_entry(keys: list[tuple[int, ...]], prompt: list[int], in_context: int) -> tuple[tuple[int, ...], int] | None:
    """The cached token sequence sharing the longest prefix with `prompt`, if it beats the `in_context`
    prefix the context already holds by MIN_GAIN_TOKENS. The last prompt token is always evaluated."""
    limit = len(prompt) - 1
    found = max(((key, min(common_prefix(key, prompt), limit)) for key in keys), key=lambda kv: kv[1], default=None)
    if found is None or found[1] < in_context + MIN_GAIN_TOKENS:
        return None
    return found


def superseded(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """A new state replaces an old one that shares at least half of the old one's tokens (the same
    system prompt with another question): one entry per prefix, not one per command."""
    return common_prefix(old, new) * 2 >= len(old)


class PrefixStates:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self.hits = 0

    @property
    def size_bytes(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def restore(self, llm: Any, prompt: list[int]) -> int:
        """Before a generation: load the best cached prefix into the context. Returns its length (0: none)."""
        in_context = common_prefix(llm.input_ids[: llm.n_tokens].tolist(), prompt)
        found = best_entry(list(self._entries), prompt, in_context)
        if found is None:
            return 0
        key, shared = found
        data = self._entries[key]
        self._entries.move_to_end(key)
        llm._ctx.kv_cache_clear()
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buffer, len(data), 0) != len(data):
            log.warning("prefix cache: llama.cpp refused a cached state; evaluating the prompt in full")
            llm.n_tokens = 0
            return 0
        llm.input_ids[: len(key)] = key
        llm.n_tokens = len(key)
        self.hits += 1
        return shared

    def save(self, llm: Any, prompt_tokens: int) -> None:
        """After a generation: keep the context's KV state, keyed by the tokens it holds."""
        if prompt_tokens < MIN_GAIN_TOKENS or llm.n_tokens == 0:
            return
        key = tuple(llm.input_ids[: llm.n_tokens].tolist())
        size = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
        if size > self.capacity_bytes:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(llm._ctx.ctx, buffer, size, 0)
        for old in [k for k in self._entries if superseded(k, key)]:
            del self._entries[old]
        self._entries[key] = ctypes.string_at(buffer, written)
        while self.size_bytes > self.capacity_bytes:
            self._entries.popitem(last=False)
