"""GLM (or any GGUF) text generation through llama-cpp-python.

Chat prompts are formatted with the GGUF's own `tokenizer.chat_template` (GLM-4's template for
GLM GGUFs); generation uses `create_completion` on the formatted tokens with a stopping
criterion that watches the cancel event, so a cancel takes effect within one token step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_agent.config import ModelConfig
from edge_agent.engine import FinishReason, Generation, OnDelta
from edge_agent.engine.gpu import choose_gpu_layers
from edge_agent.errors import InvalidCommand, ModelError
from edge_agent.protocol import ChatParams, CompleteParams, ModelInfo, Sampling

log = logging.getLogger(__name__)

# llama.cpp's enum llama_ftype, for the quantization name in status.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LlamaEngine:
    """One loaded GGUF model and its llama.cpp context."""

    def __init__(self, config: ModelConfig) -> None:
        if not config.path.is_file():
            raise ModelError(
                f"model file {config.path} does not exist; build the tiny model with "
                "`python models/build_gguf.py` or point [model] path at a GLM GGUF (see models/manifest.toml)"
            )
        gpu = choose_gpu_layers(config.n_gpu_layers, bool(llama_cpp.llama_supports_gpu_offload()))
        self.gpu_reason = gpu.reason
        log.info("GPU offload: %s", gpu.reason)
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(config.path),
                n_gpu_layers=gpu.n_gpu_layers,
                n_ctx=config.n_ctx,
                n_batch=config.n_batch,
                n_threads=config.n_threads,
                verbose=False,
            )
        except ValueError as exc:
            raise ModelError(f"llama.cpp could not load {config.path}: {exc}") from exc
        meta = self._llm.metadata
        self._n_ctx = self._llm.n_ctx()
        self._formatter = self._make_formatter(meta)
        arch = meta.get("general.architecture", "unknown")
        layers = int(meta.get(f"{arch}.block_count", 0))
        self.info = ModelInfo(
            name=config.name or meta.get("general.name") or config.path.stem,
            sha256=file_sha256(config.path),
            arch=arch,
            quant=FILE_TYPES.get(int(meta.get("general.file_type", -1)), "unknown"),
            n_gpu_layers=layers if gpu.n_gpu_layers < 0 else min(gpu.n_gpu_layers, layers),
        )

    def _make_formatter(self, meta: dict[str, str]) -> Jinja2ChatFormatter | None:
        template = meta.get("tokenizer.chat_template")
        if not template:
            return None
        def token_text(key: str) -> str:
            token_id = meta.get(key)
            return self._llm.detokenize([int(token_id)], special=True).decode("utf-8", "replace") if token_id else ""
        return Jinja2ChatFormatter(
            template=template,
            eos_token=token_text("tokenizer.ggml.eos_token_id"),
            bos_token=token_text("tokenizer.ggml.bos_token_id"),
        )

    def close(self) -> None:
        self._llm.close()

    def chat(self, params: ChatParams, on_delta: OnDelta | None, cancel: threading.Event) -> Generation:
        if params.template is not None:
            raise InvalidCommand(f"prompt template {params.template!r} is not defined on this device")
        if self._formatter is None:
            raise ModelError("this GGUF has no tokenizer.chat_template; send `complete` with a formatted prompt")
        messages = [m.model_dump() for m in params.messages]
        prompt = self._formatter(messages=messages).prompt
        tokens = self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        return self._generate(tokens, params, on_delta, cancel)

    def complete(self, params: CompleteParams, on_delta: OnDelta | None, cancel: threading.Event) -> Generation:
        tokens = self._llm.tokenize(params.prompt.encode("utf-8"), add_bos=True, special=True)
        return self._generate(tokens, params, on_delta, cancel)

    def _generate(self, tokens: list[int], params: Sampling, on_delta: OnDelta | None,
                  cancel: threading.Event) -> Generation:
        if len(tokens) >= self._n_ctx:
            raise InvalidCommand(
                f"prompt is {len(tokens)} tokens; the model context (n_ctx) is {self._n_ctx}: shorten the prompt"
            )
        max_tokens = min(params.max_tokens, self._n_ctx - len(tokens))
        seed = params.seed if params.seed is not None else random.randrange(2**32)
        grammar = None
        if params.response_format is not None:
            grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(params.response_format.schema_), verbose=False)
        def should_stop(input_ids: object, logits: object) -> bool:
            return cancel.is_set()

        started = time.perf_counter()
        first_token_at: float | None = None
        pieces: list[str] = []
        finish: FinishReason = "stop"
        try:
            stream = self._llm.create_completion(
                prompt=tokens,
                max_tokens=max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=params.stop or None,
                seed=seed,
                grammar=grammar,
                stream=True,
                stopping_criteria=llama_cpp.StoppingCriteriaList([should_stop]),
            )
            for chunk in stream:
                choice = chunk["choices"][0]
                delta = choice["text"]
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if delta:
                    pieces.append(delta)
                    if on_delta is not None:
                        on_delta(delta)
                if choice.get("finish_reason"):
                    finish = "length" if choice["finish_reason"] == "length" else "stop"
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"llama.cpp failed while generating: {exc}") from exc
        ended = time.perf_counter()
        if cancel.is_set():
            finish = "cancelled"
        # Tokens evaluated after the prompt; the last sampled token is never evaluated, and it counts
        # as output unless it was end-of-generation (finish "stop" without stop strings).
        evaluated = self._llm.n_tokens - len(tokens)
        last_counts = finish == "length" or (finish == "stop" and bool(params.stop))
        completion_tokens = min(max_tokens, evaluated + (1 if last_counts else 0))
        return Generation(
            text="".join(pieces),
            finish_reason=finish,
            prompt_tokens=len(tokens),
            completion_tokens=completion_tokens,
            ttft_ms=((first_token_at or ended) - started) * 1000.0,
            total_ms=(ended - started) * 1000.0,
            seed=seed,
        )
