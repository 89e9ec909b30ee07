"""One sequence's llama.cpp sampler chain, built like llama-cpp-python's `Llama` builds its own (so a
seed gives the same text on both paths) and freed by `close()`: `Llama` never frees its chains
(docs/performance.md, "Memory"), this one is freed when its sequence ends.

Order, as in `Llama._init_sampler`: grammar, then greedy (temperature 0) or top_k 40, top_p,
min_p 0.05, temperature and the seeded draw. `llama_sampler_sample` applies the chain to one batch
row's logits and accepts the token into every sampler (the grammar advances): no separate accept.

Greedy without a grammar builds no chain: the token is the first highest logit of the row, read
with numpy, which is what llama.cpp's greedy sampler picks. `llama_sampler_sample` would first copy
all n_vocab logits into a candidate array: with GLM-4's 151,552 tokens that is ~185 us a row
against ~28 us for numpy's argmax, paid by every greedy sequence at every step while the
llama.cpp threads wait (docs/performance.md, "Concurrent chats").
"""

from __future__ import annotations

import llama_cpp
import numpy as np

from autoglm_wire.errors import ModelError

TOP_K = 40  # llama-cpp-python's defaults for what our protocol does not expose
MIN_P = 0.05


class SamplerChain:
    def __init__(self, vocab: llama_cpp.llama_vocab_p, temperature: float, top_p: float, seed: int,
                 grammar: llama_cpp.LlamaGrammar | None = None) -> None:
        self._closed = False
        self._chain: llama_cpp.llama_sampler_p | None = None
        # greedy without a grammar: `sample` takes the argmax of a row of this many logits
        self._argmax_of = llama_cpp.llama_vocab_n_tokens(vocab) if temperature == 0.0 and grammar is None else None
        if self._argmax_of is not None:
            return
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if grammar is not None:
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"),
                                                           grammar._root.encode("utf-8"))
            if not sampler:
                self.close()
                raise ModelError("llama.cpp could not build the grammar of response_format")
            self._add(sampler)
        if temperature == 0.0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        self._add(llama_cpp.llama_sampler_init_top_k(TOP_K))
        self._add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
        self._add(llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
        self._add(llama_cpp.llama_sampler_init_temp(temperature))
        self._add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)  # the chain owns it from now on

    def sample(self, ctx: llama_cpp.llama_context_p, row: int) -> int:
        """The next token from the logits of batch row `row`, accepted into the chain."""
        if self._argmax_of is not None:
            logits = llama_cpp.llama_get_logits_ith(ctx, row)
            return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self._argmax_of,))))
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, row))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        self._closed = True
