"""GLM (or any GGUF) text generation through llama-cpp-python.

Chat prompts are formatted with the GGUF's own `tokenizer.chat_template` (GLM-4's template for
GLM GGUFs), after a named prompt template from the config (if the command names one) filled in
the conversation. Generation uses `create_completion` on the formatted tokens with a stopping
criterion that watches the cancel event, so a cancel or a stall takes effect within one token
step. llama.cpp reuses the longest token prefix shared with the previous prompt by itself (a long
shared system prompt is evaluated once); `prefix_cache_mb` adds a cache of KV states for several
prefixes (engine/prefix.py). `response_format` is compiled to a grammar and the output is checked against the schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from autoglm_wire.errors import InvalidCommand, ModelError, Timeout
from autoglm_wire.protocol import ChatParams, CompleteParams, ModelInfo, Sampling
from edge_agent.engine import FinishReason, Generation, OnDelta, TextSink
from edge_agent.engine.batch import BatchDecoder, Job
from edge_agent.engine.gpu import GpuChoice, choose_gpu_layers, footprint_from_metadata, probe_free_device_memory
from edge_agent.engine.parallel import available_memory, choose_parallel
from edge_agent.engine.prefix import PrefixStates
from edge_agent.engine.repack import RepackChoice, choose_repack
from edge_agent.engine.settings import ModelConfig
from edge_agent.engine.templates import PromptTemplate, apply_template
from edge_agent.engine.watchdog import StallWatchdog

log = logging.getLogger(__name__)

# llama.cpp's enum llama_ftype, for the quantization name in status.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}
KV_TYPES = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16,
            "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF's metadata without loading its weights (vocab only)."""
    probe = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(probe.metadata)
    finally:
        probe.close()


def decide_gpu_layers(config: ModelConfig) -> GpuChoice:
    """What to offload: reads the model's metadata and the free device memory only when it matters."""
    supports = bool(llama_cpp.llama_supports_gpu_offload())
    if config.n_gpu_layers != "auto" or not supports:
        return choose_gpu_layers(config.n_gpu_layers, supports)
    footprint = footprint_from_metadata(gguf_metadata(config.path), config.path.stat().st_size, config.n_ctx)
    return choose_gpu_layers("auto", supports, footprint, probe_free_device_memory())


def resolve_parallel(config: ModelConfig) -> ModelConfig:
    """`parallel = "auto"` replaced by the N `choose_parallel` picks (logged with its reason)."""
    if config.parallel != "auto":
        return config
    size = config.path.stat().st_size
    footprint = footprint_from_metadata(gguf_metadata(config.path), size, config.n_ctx)
    kv = footprint.kv_bytes_per_layer * footprint.n_layers if footprint is not None else None
    choice = choose_parallel(kv, size, available_memory())
    log.info("model.parallel: %s", choice.reason)
    return config.model_copy(update={"parallel": choice.n})


_LOAD_LOCK = threading.Lock()


def decide_repack(setting: Literal["auto"] | bool) -> RepackChoice:
    return choose_repack(setting, llama_cpp.llama_print_system_info().decode(errors="replace"))


def load_llama(settings: Mapping[str, Any], repack: bool, n_seq: int = 1) -> llama_cpp.Llama:
    """`llama_cpp.Llama(**settings)` with `use_extra_bufts = repack` (engine/repack.py) and, for
    `n_seq` > 1, a context for that many sequences sharing one (unified) KV cache: parameters
    `Llama` has no argument for. They are set on the defaults `Llama` starts from, for the
    duration of this load. Raises ModelError if llama-cpp-python stopped honouring repack."""
    model_defaults = llama_cpp.llama_cpp.llama_model_default_params
    context_defaults = llama_cpp.llama_cpp.llama_context_default_params

    def with_repack() -> llama_cpp.llama_model_params:
        params = model_defaults()
        params.use_extra_bufts = repack
        return params

    def with_sequences() -> llama_cpp.llama_context_params:
        params = context_defaults()
        if n_seq > 1:
            params.n_seq_max, params.kv_unified = n_seq, True
        return params

    with _LOAD_LOCK:
        llama_cpp.llama_cpp.llama_model_default_params = with_repack
        llama_cpp.llama_cpp.llama_context_default_params = with_sequences
        try:
            llm = llama_cpp.Llama(**settings)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = model_defaults
            llama_cpp.llama_cpp.llama_context_default_params = context_defaults
    if llm.model_params.use_extra_bufts != repack:
        llm.close()
        raise ModelError(f"this llama-cpp-python ignores use_extra_bufts (wanted {repack}); pin "
                         "llama-cpp-python==0.3.36 as pyproject.toml does, or set model.repack to match its default")
    return llm


def llama_settings(config: ModelConfig, n_gpu_layers: int) -> dict[str, Any]:
    """Keyword arguments of `llama_cpp.Llama` for a model config (shared with the tuner); with
    `parallel` sequences the context holds `n_ctx` tokens for each."""
    settings: dict[str, Any] = {
        "model_path": str(config.path), "n_gpu_layers": n_gpu_layers, "n_ctx": config.n_ctx * config.parallel,
        "n_batch": config.n_batch, "n_threads": config.n_threads, "flash_attn": config.flash_attn,
        "verbose": False,
    }
    if config.n_ubatch is not None:
        settings["n_ubatch"] = min(config.n_ubatch, config.n_batch)
    for key in ("type_k", "type_v"):
        kind = getattr(config, key)
        if kind is not None:
            settings[key] = KV_TYPES[kind]
    return settings


class LlamaEngine:
    """One loaded GGUF model and its llama.cpp context."""

    def __init__(self, config: ModelConfig, templates: Mapping[str, PromptTemplate] | None = None,
                 max_generation_s: float | None = None) -> None:
        if not config.path.is_file():
            raise ModelError(
                f"model file {config.path} does not exist; build the tiny model with "
                "`python models/build_gguf.py` or point [model] path at a GLM GGUF (see models/manifest.toml)"
            )
        config = resolve_parallel(config)
        self._templates = dict(templates or {})
        self._max_generation_s = max_generation_s
        self._stall_timeout_s = config.stall_timeout_s
        self._watchdog = StallWatchdog(config.stall_timeout_s)
        gpu = decide_gpu_layers(config)
        self.gpu_reason = gpu.reason
        log.info("GPU offload: %s", gpu.reason)
        repack = decide_repack(config.repack)
        log.info("weight repacking: %s", repack.reason)
        try:
            self._llm = load_llama(llama_settings(config, gpu.n_gpu_layers), repack.enabled, config.parallel)
        except ValueError as exc:
            raise ModelError(f"llama.cpp could not load {config.path}: {exc}") from exc
        # parallel > 1: the batched decoder, whose finished sequences' KV cells are its prefix cache
        self._decoder = BatchDecoder(self._llm, config.parallel) if config.parallel > 1 else None
        self._alone = threading.Lock()  # the high-level path is one context: one generation at a time
        self._prefixes = PrefixStates(config.prefix_cache_mb * 1024 * 1024) \
            if config.prefix_cache_mb and self._decoder is None else None
        meta = self._llm.metadata
        self._n_ctx = self._llm.n_ctx() // config.parallel
        self._formatter = self._make_formatter(meta)
        self.info = self._model_info(config, meta, gpu)
        self._watchdog.start()

    def _model_info(self, config: ModelConfig, meta: dict[str, str], gpu: GpuChoice) -> ModelInfo:
        arch = meta.get("general.architecture", "unknown")
        layers = int(meta.get(f"{arch}.block_count", 0))
        return ModelInfo(
            name=config.name or meta.get("general.name") or config.path.stem,
            sha256=file_sha256(config.path),
            arch=arch,
            quant=FILE_TYPES.get(int(meta.get("general.file_type", -1)), "unknown"),
            n_gpu_layers=layers if gpu.n_gpu_layers < 0 else min(gpu.n_gpu_layers, layers),
            gpu_reason=gpu.reason,
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
        self._watchdog.close()
        if self._decoder is not None:
            self._decoder.close()
        self._llm.close()

    def chat(self, params: ChatParams, on_delta: OnDelta | None, cancel: threading.Event) -> Generation:
        messages = [m.model_dump() for m in params.messages]
        if params.template is not None:
            messages = apply_template(self._templates, params.template, params.variables, messages)
        elif params.variables:
            raise InvalidCommand("`variables` were given without a `template`: name the template they fill in")
        if self._formatter is None:
            raise ModelError("this GGUF has no tokenizer.chat_template; send `complete` with a formatted prompt")
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
        schema = params.response_format.schema_ if params.response_format is not None else None
        grammar = _compile_grammar(schema) if schema is not None else None

        started = time.perf_counter()
        if self._decoder is None:
            with self._alone:  # several executor workers (a reload from model.parallel > 1) take turns
                text, finish, first_token_at = self._generate_alone(tokens, max_tokens, seed, grammar, params,
                                                                    on_delta, cancel)
                completion_tokens = self._completion_tokens(len(tokens), max_tokens, finish, bool(params.stop))
            watchdog = self._watchdog
        else:
            watchdog = StallWatchdog(self._stall_timeout_s)  # one per generation, checked by its caller
            job = Job(tokens, max_tokens, params.temperature, params.top_p, seed, params.stop, grammar, cancel)
            with watchdog.watching(cancel, self._max_generation_s):
                outcome = self._decoder.generate(job, on_delta, watchdog)
            text, finish, first_token_at = outcome.text, outcome.finish_reason, outcome.first_token_at
            completion_tokens = outcome.completion_tokens
        ended = time.perf_counter()
        if watchdog.stalled:
            raise Timeout(f"no token for {self._stall_timeout_s} s (model.stall_timeout_s); the generation was "
                          "stopped. Raise the key if long prompts legitimately take that long on this device")
        if watchdog.overran:
            raise Timeout(f"the generation ran longer than {self._max_generation_s} s (limits.max_generation_s) "
                          "and was stopped; ask for fewer max_tokens or raise the limit")
        if cancel.is_set():
            finish = "cancelled"
        if schema is not None and finish == "stop":
            _check_schema(text, schema)
        return Generation(
            text=text, finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=completion_tokens,
            ttft_ms=((first_token_at or ended) - started) * 1000.0, total_ms=(ended - started) * 1000.0, seed=seed,
        )

    def _generate_alone(self, tokens: list[int], max_tokens: int, seed: int, grammar: llama_cpp.LlamaGrammar | None,
                        params: Sampling, on_delta: OnDelta | None,
                        cancel: threading.Event) -> tuple[str, FinishReason, float | None]:
        """One generation on llama-cpp-python's high-level API (`model.parallel` = 1)."""

        def should_stop(input_ids: object, logits: object) -> bool:
            return cancel.is_set()

        if self._prefixes is not None:
            self._prefixes.restore(self._llm, tokens)
        stream: Iterator[Any] | None = None
        with self._watchdog.watching(cancel, self._max_generation_s) as watchdog:
            try:
                stream = self._llm.create_completion(
                    prompt=tokens, max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                    stop=params.stop or None, seed=seed, grammar=grammar, stream=True,
                    stopping_criteria=llama_cpp.StoppingCriteriaList([should_stop]),
                )
                result = _consume(stream, on_delta, watchdog)
            except (RuntimeError, ValueError) as exc:
                raise ModelError(f"llama.cpp failed while generating: {exc}") from exc
            finally:
                if stream is not None:
                    stream.close()  # a no-op once drained; ends it first if _consume raised
                _free_sampler(self._llm)
        if self._prefixes is not None:
            self._prefixes.save(self._llm, len(tokens))
        return result

    def _completion_tokens(self, prompt_tokens: int, max_tokens: int, finish: FinishReason, has_stop: bool) -> int:
        """Tokens evaluated after the prompt; the last sampled token is never evaluated, and it counts
        as output unless it was end-of-generation (finish "stop" without stop strings)."""
        evaluated = self._llm.n_tokens - prompt_tokens
        last_counts = finish == "length" or (finish == "stop" and has_stop)
        return min(max_tokens, evaluated + (1 if last_counts else 0))


def _free_sampler(llm: llama_cpp.Llama) -> None:
    """Free the sampler chain llama-cpp-python made for this generation. It builds a new one per
    `create_completion` and never frees the old (0.3.36): with GLM-4's 151,552-token vocabulary
    that leaked ~1.75 MB of RSS per command (docs/performance.md, "Memory"). `Llama.sample` makes
    a new one when it finds None."""
    sampler = getattr(llm, "_sampler", None)
    if sampler is not None:
        sampler.close()
        llm._sampler = None


def _consume(stream: Iterable[Any], on_delta: OnDelta | None,
             watchdog: StallWatchdog) -> tuple[str, FinishReason, float | None]:
    """Drain a llama.cpp completion stream: (text, finish reason, time of the first token)."""
    sink = TextSink(on_delta, watchdog.tick)
    finish: FinishReason = "stop"
    for chunk in stream:
        choice = chunk["choices"][0]
        sink.token(choice["text"])
        if choice.get("finish_reason"):
            finish = "length" if choice["finish_reason"] == "length" else "stop"
    return sink.text, finish, sink.first_token_at


def _compile_grammar(schema: dict[str, Any]) -> llama_cpp.LlamaGrammar:
    import jsonschema  # imported on first use: ~3 MB the agent needs only for response_format

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
        return llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except jsonschema.SchemaError as exc:
        raise InvalidCommand(f"response_format.schema is not a valid JSON Schema: {exc.message}") from exc
    # llama-cpp-python's converter asserts on a schema it does not recognise (found by the fuzzer)
    except (ValueError, KeyError, TypeError, RecursionError, AssertionError) as exc:
        raise InvalidCommand(f"response_format.schema cannot be compiled to a llama.cpp grammar ({exc!r}); "
                             "use plain objects, arrays, strings, numbers, enums and $defs") from exc


def _check_schema(text: str, schema: dict[str, Any]) -> None:
    """The grammar forces JSON shape, types, enums, required keys and string lengths; numeric bounds
    and a few other keywords it does not. Anything that slips through fails the command."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except json.JSONDecodeError as exc:
        raise ModelError(f"the output is not JSON ({exc.msg}) although a grammar constrained it: {text[:200]!r}") \
            from exc
    except jsonschema.ValidationError as exc:
        raise ModelError(f"the output does not satisfy response_format.schema: {exc.message} (llama.cpp's grammar "
                         "does not enforce every JSON Schema keyword, e.g. minimum/maximum)") from exc
