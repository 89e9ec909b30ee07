#!/usr/bin/env python3
"""Build a tiny, deterministic GLM-4 (``glm4`` arch) GGUF with random weights.

The file is a structurally real GLM-4 model: llama.cpp / llama-cpp-python load
it, tokenize with a byte-level BPE tokenizer that carries GLM-4's special
tokens and chat template, and generate real tokens (gibberish text, since the
weights are random).  It exists so tests, demos and benchmarks of the edge
agent never need to download a multi-GB checkpoint.

Usage::

    python models/build_gguf.py --preset tiny --seed 0 --out models/tiny-glm4-q4_0.gguf

The same ``(preset, seed)`` always yields a byte-identical file.

Notes on the format (checked against llama.cpp ``src/models/glm4.cpp`` and
``conversion/glm.py``):

* 2-D weights are ``Q4_0``; norms and biases stay ``F32``.
* ``ffn_up`` is fused (gate and up, ``2 * n_ff`` rows); every block has
  ``post_attention_norm`` and ``post_ffw_norm``.
* ``rope.dimension_count`` is ``head_dim / 2`` (GLM's partial rotary factor).
* ``tokenizer.ggml.pre = "glm4"`` makes llama.cpp use the ChatGLM4 pre-tokenizer
  regex with ``ignore_merges`` (whole pre-tokens found in the vocab become one
  token) and clears the default BOS; the converter then sets
  bos = eos = unk = ``<|endoftext|>`` and eot = ``<|user|>``.
* Output-head rows of tokens that should never be sampled (control, unused
  and non-printable byte tokens) are zero, so generated text is plain ASCII
  and the model practically never emits a special token (it stops only at
  ``max_tokens``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, TokenType

ARCH = "glm4"
WEIGHT_QTYPE = GGMLQuantizationType.Q4_0
DEFAULT_DIR = Path(__file__).resolve().parent

# GLM-4's added tokens in tokenizer order; in the real 151552-token vocab the
# first one, <|endoftext|>, has id 151329 and the rest follow consecutively.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

# Special ids written as in llama.cpp's Glm4Model.set_vocab (conversion/glm.py).
SPECIAL_ROLES: dict[str, str] = {
    "bos": "<|endoftext|>",
    "eos": "<|endoftext|>",
    "eot": "<|user|>",
    "unk": "<|endoftext|>",
    "pad": "<|endoftext|>",
}

_TOOLS_PROMPT = (
    "{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
    "{% set tools = item['tools'] %}{% for tool in tools %}"
    "{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% elif tool['type'] == 'python' %}\n\n## python\n\n"
    "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
    "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
    "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。"
    "不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
    "{% elif tool['type'] == 'simple_browser' %}\n\n## simple_browser\n\n"
    "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
    "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，"
    "可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
    "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。"
    "选择多个角度的页面，同时尽可能选择可信任的信息来源。"
    "考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
    "`open_url(url: str)`：打开指定的 URL。\n\n"
    "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
    "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; "
    "3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n"
    " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
    "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
    "{% elif tool['type'] == 'cogview' %}\n\n## cogview\n\n"
    "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。"
    "你需要向 `cogview` 发送图像描述，规则：\n"
    "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
    "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
    "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
    "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
    "{% endif %}{% endfor %}{% endif %}"
)

# The chat template of THUDM/glm-4-9b-chat (tokenizer_config.json).
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}"
    + _TOOLS_PROMPT
    + "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Training text for the toy BPE merges: common English plus edge-agent words,
# most frequent first (frequency is derived from the rank, Zipf-style).
_CORPUS_WORDS = """
the of and to a in is you that it he was for on are as with his they I at be
this have from or one had by word but not what all were we when your can said
there use an each which she do how their if will up other about out many then
them these so some her would make like him into time has look two more write go
see number no way could people my than first water been call who oil its now
find long down day did get come made may part over new sound take only little
work know place year live me back give most very after thing our just name good
sentence man think say great where help through much before line right too mean
old any same tell boy follow came want show also around form three small set put
end does another well large must big even such because turn here why ask went
men read need land different home us move try kind hand picture again change off
play spell air away animal house point page letter mother answer found study
still learn should hello hi thanks please sorry yes okay model agent edge device
sensor temperature humidity pressure status error message request response
reply topic queue retry timeout battery voltage current power network signal
server client data value report alert warning info debug level config update
system user assistant observation tool function call result weather today
tomorrow morning evening night light door window camera motion alarm check
""".split()

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Preset:
    """Hyper-parameters of one synthetic GLM-4 model."""

    name: str
    n_vocab: int  # total rows of token_embd / output
    special_start: int  # id of <|endoftext|>; specials follow consecutively
    n_merges: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        """Per-head width (n_embd / n_head)."""
        return self.n_embd // self.n_head

    @property
    def rope_dims(self) -> int:
        """Rotary dimensions: GLM rotates half of each head."""
        return self.head_dim // 2


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        n_vocab=1024,
        special_start=1000,
        n_merges=320,
        n_embd=128,
        n_layer=2,
        n_head=4,
        n_head_kv=2,
        n_ff=384,
        n_ctx=2048,
    ),
    "bench": Preset(
        name="bench",
        n_vocab=151552,
        special_start=151329,
        n_merges=600,
        n_embd=1536,
        n_layer=8,
        n_head=12,
        n_head_kv=2,
        n_ff=4608,
        n_ctx=8192,
    ),
}


@dataclass(frozen=True)
class Vocab:
    """A GPT-2 style byte-level BPE vocabulary."""

    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]

    def id_of(self, token: str) -> int:
        """Return the id of ``token`` (first occurrence)."""
        return self.tokens.index(token)

    def special_ids(self) -> dict[str, int]:
        """Map every GLM-4 special token to its id."""
        return {tok: self.id_of(tok) for tok in SPECIAL_TOKENS}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: GGUF name, numpy shape (rows, cols) and init kind."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "embd" | "proj" | "output" | "bias" | "norm"

    @property
    def qtype(self) -> GGMLQuantizationType:
        """Storage type: Q4_0 for 2-D weights, F32 for norms and biases."""
        return WEIGHT_QTYPE if len(self.shape) == 2 else GGMLQuantizationType.F32


# ---------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _encode(text: str) -> str:
    """Map UTF-8 text to its byte-level unicode spelling."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _corpus() -> dict[tuple[str, ...], int]:
    """Word -> frequency table used to learn merges (space-prefixed + bare)."""
    freqs: Counter[tuple[str, ...]] = Counter()
    for rank, word in enumerate(_CORPUS_WORDS):
        weight = 10_000 // (rank + 10)
        freqs[tuple(_encode(" " + word))] += 3 * weight
        freqs[tuple(_encode(word))] += weight
        freqs[tuple(_encode(" " + word.capitalize()))] += weight
    return dict(freqs)


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Apply one merge to a symbol sequence."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_merges(n_merges: int) -> list[tuple[str, str]]:
    """Learn up to ``n_merges`` BPE merges from the built-in corpus.

    Deterministic: ties on pair frequency are broken by the pair itself.
    """
    words = _corpus()
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        words = {_merge_word(w, best): f for w, f in words.items()}
    return merges


def _filler_words() -> Iterator[str]:
    """Endless deterministic pseudo-words (``Ġbaku``, ``baku``, ...)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    space = bytes_to_unicode()[ord(" ")]
    for n in itertools.count(1):
        for combo in itertools.product(syllables, repeat=n):
            word = "".join(combo)
            yield space + word
            yield word


def build_vocab(preset: Preset) -> Vocab:
    """Bytes, learned merges, filler words, GLM-4 specials, then ``[PADn]``."""
    tokens = list(bytes_to_unicode().values())
    types = [TokenType.NORMAL] * 256
    merges = train_merges(preset.n_merges)
    seen = set(tokens)
    fillers = _filler_words()
    for merged in itertools.chain((a + b for a, b in merges), fillers):
        if len(tokens) >= preset.special_start:
            break
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
            types.append(TokenType.NORMAL)
    tokens += SPECIAL_TOKENS
    types += [TokenType.CONTROL] * len(SPECIAL_TOKENS)
    pads = range(len(tokens), preset.n_vocab)
    tokens += [f"[PAD{i}]" for i in pads]
    types += [TokenType.UNUSED] * len(pads)
    return Vocab(tuple(tokens), tuple(int(t) for t in types), tuple(f"{a} {b}" for a, b in merges))


def _emittable_mask(vocab: Vocab) -> np.ndarray:
    """True for tokens the random model may sample: printable ASCII text."""
    printable = {bytes_to_unicode()[b] for b in [10, *range(32, 127)]}
    mask = np.zeros(len(vocab.tokens), dtype=bool)
    for i, (tok, typ) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
        if typ == TokenType.NORMAL and (i >= 256 or tok in printable):
            mask[i] = True
    return mask


# ------------------------------------------------------------------ tensors


def _block_specs(p: Preset, i: int) -> list[TensorSpec]:
    """Tensors of transformer block ``i`` in llama.cpp's glm4 layout."""
    q_dim, kv_dim = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    blk = f"blk.{i}"
    return [
        TensorSpec(f"{blk}.attn_norm.weight", (p.n_embd,), "norm"),
        TensorSpec(f"{blk}.attn_q.weight", (q_dim, p.n_embd), "proj"),
        TensorSpec(f"{blk}.attn_q.bias", (q_dim,), "bias"),
        TensorSpec(f"{blk}.attn_k.weight", (kv_dim, p.n_embd), "proj"),
        TensorSpec(f"{blk}.attn_k.bias", (kv_dim,), "bias"),
        TensorSpec(f"{blk}.attn_v.weight", (kv_dim, p.n_embd), "proj"),
        TensorSpec(f"{blk}.attn_v.bias", (kv_dim,), "bias"),
        TensorSpec(f"{blk}.attn_output.weight", (p.n_embd, q_dim), "proj"),
        TensorSpec(f"{blk}.post_attention_norm.weight", (p.n_embd,), "norm"),
        TensorSpec(f"{blk}.ffn_norm.weight", (p.n_embd,), "norm"),
        TensorSpec(f"{blk}.ffn_up.weight", (2 * p.n_ff, p.n_embd), "proj"),
        TensorSpec(f"{blk}.ffn_down.weight", (p.n_embd, p.n_ff), "proj"),
        TensorSpec(f"{blk}.post_ffw_norm.weight", (p.n_embd,), "norm"),
    ]


def tensor_specs(p: Preset) -> list[TensorSpec]:
    """All tensors of the model, in file order."""
    specs = [TensorSpec("token_embd.weight", (p.n_vocab, p.n_embd), "embd")]
    for i in range(p.n_layer):
        specs += _block_specs(p, i)
    specs += [
        TensorSpec("output_norm.weight", (p.n_embd,), "norm"),
        TensorSpec("output.weight", (p.n_vocab, p.n_embd), "output"),
    ]
    return specs


def _nbytes(spec: TensorSpec) -> tuple[tuple[int, ...], int]:
    """Stored (byte or element) shape and byte size of a tensor."""
    if spec.qtype == GGMLQuantizationType.F32:
        return spec.shape, int(np.prod(spec.shape)) * 4
    shape = gguf.quant_shape_to_byte_shape(spec.shape, spec.qtype)
    return shape, int(np.prod(shape))


def _rng(seed: int, name: str) -> np.random.Generator:
    """Independent, order-free random stream per (seed, tensor name)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _init_scale(spec: TensorSpec) -> float:
    """Standard deviation of a tensor's random init."""
    fan_in = spec.shape[-1]
    return {"embd": 1.0, "proj": fan_in**-0.5, "output": 3.0 * fan_in**-0.5, "bias": 0.02}[spec.kind]


def make_tensor(spec: TensorSpec, seed: int, emit_mask: np.ndarray) -> np.ndarray:
    """Generate and (for 2-D weights) Q4_0-quantize one tensor, row-chunked."""
    if spec.kind == "norm":
        return np.ones(spec.shape, dtype=np.float32)
    rng, scale = _rng(seed, spec.name), np.float32(_init_scale(spec))
    if spec.kind == "bias":
        return rng.standard_normal(spec.shape, dtype=np.float32) * scale
    rows, cols = spec.shape
    chunks = []
    for start in range(0, rows, 8192):
        block = rng.standard_normal((min(8192, rows - start), cols), dtype=np.float32)
        block *= scale
        if spec.kind == "output":
            block[~emit_mask[start : start + len(block)]] = 0.0
        chunks.append(gguf.quants.quantize(block, spec.qtype))
    return np.concatenate(chunks)


# ----------------------------------------------------------------- metadata


def _write_hparams(w: gguf.GGUFWriter, p: Preset, seed: int) -> None:
    """General and architecture keys."""
    w.add_name(f"autoglm-edge synthetic GLM-4 ({p.name}, seed {seed})")
    w.add_description("Random weights for tests/benchmarks; output is gibberish.")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(p.n_vocab)
    w.add_context_length(p.n_ctx)
    w.add_embedding_length(p.n_embd)
    w.add_block_count(p.n_layer)
    w.add_feed_forward_length(p.n_ff)
    w.add_head_count(p.n_head)
    w.add_head_count_kv(p.n_head_kv)
    w.add_layer_norm_rms_eps(p.rms_eps)
    w.add_rope_dimension_count(p.rope_dims)
    w.add_rope_freq_base(p.rope_theta)


def _write_tokenizer(w: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Tokenizer keys, GLM-4 special ids and the chat template."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(list(vocab.tokens))
    w.add_token_types(list(vocab.types))
    w.add_token_merges(list(vocab.merges))
    setters = {
        "bos": w.add_bos_token_id,
        "eos": w.add_eos_token_id,
        "eot": w.add_eot_token_id,
        "unk": w.add_unk_token_id,
        "pad": w.add_pad_token_id,
    }
    for role, token in SPECIAL_ROLES.items():
        setters[role](vocab.id_of(token))
    w.add_add_bos_token(False)
    w.add_chat_template(GLM4_CHAT_TEMPLATE)


# ------------------------------------------------------------------- build


def _write_file(path: Path, preset: Preset, seed: int) -> None:
    """Stream header, metadata, tensor infos and tensor data to ``path``."""
    vocab = build_vocab(preset)
    emit_mask = _emittable_mask(vocab)
    specs = tensor_specs(preset)
    writer = gguf.GGUFWriter(path, ARCH)
    _write_hparams(writer, preset, seed)
    _write_tokenizer(writer, vocab)
    for spec in specs:
        shape, nbytes = _nbytes(spec)
        dtype = np.float32 if spec.qtype == GGMLQuantizationType.F32 else np.uint8
        writer.add_tensor_info(spec.name, shape, np.dtype(dtype), nbytes, raw_dtype=spec.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for spec in specs:
        writer.write_tensor_data(make_tensor(spec, seed, emit_mask))
    writer.close()


def build_model(out_path: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a synthetic GLM-4 Q4_0 GGUF and return its path.

    Args:
        out_path: destination file; parent directories are created.  The file
            is written to ``<out_path>.tmp-<pid>`` and renamed atomically, so
            readers never see a partial model.  An existing file is replaced.
        preset: key of :data:`PRESETS` (``"tiny"`` or ``"bench"``).
        seed: weight seed; the same ``(preset, seed)`` gives identical bytes.

    Returns:
        ``out_path``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, PRESETS[preset], seed)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def ensure_model(out_path: Path, preset: str = "tiny", seed: int = 0, force: bool = False) -> tuple[Path, bool]:
    """Build the model unless ``out_path`` exists; return (path, built)."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        return out_path, False
    return build_model(out_path, preset, seed), True


def default_path(preset: str) -> Path:
    """Conventional output file for a preset, next to this script."""
    return DEFAULT_DIR / f"{preset}-glm4-q4_0.gguf"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="default: models/<preset>-glm4-q4_0.gguf")
    ap.add_argument("--force", action="store_true", help="rebuild if the file exists")
    args = ap.parse_args(argv)
    out = args.out or default_path(args.preset)
    path, built = ensure_model(out, args.preset, args.seed, args.force)
    verb = "built" if built else "exists, skipped (use --force to rebuild)"
    print(f"{path}: {verb}, {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
