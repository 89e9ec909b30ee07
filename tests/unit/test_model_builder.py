"""Tests for models/build_gguf.py, the synthetic GLM-4 GGUF builder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

gguf = pytest.importorskip("gguf")

BUILDER_PATH = Path(__file__).resolve().parents[2] / "models" / "build_gguf.py"


def _load_builder() -> Any:
    spec = importlib.util.spec_from_file_location("build_gguf", BUILDER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builder.build_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "tiny", 0)


@pytest.fixture(scope="module")
def reader(tiny_path: Path) -> Any:
    return gguf.GGUFReader(tiny_path)


def _value(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def test_the_same_seed_gives_a_byte_identical_file(tmp_path: Path, tiny_path: Path) -> None:
    again = builder.build_model(tmp_path / "again.gguf", "tiny", 0)
    assert again.read_bytes() == tiny_path.read_bytes()


def test_a_different_seed_gives_different_weights(tmp_path: Path, tiny_path: Path) -> None:
    other = builder.build_model(tmp_path / "other.gguf", "tiny", 1)
    assert other.stat().st_size == tiny_path.stat().st_size
    assert other.read_bytes() != tiny_path.read_bytes()


def test_the_tiny_model_is_well_under_five_megabytes(tiny_path: Path) -> None:
    assert tiny_path.stat().st_size < 5_000_000


def test_the_metadata_declares_the_glm4_architecture(reader: Any) -> None:
    preset = builder.PRESETS["tiny"]
    assert _value(reader, "general.architecture") == "glm4"
    assert _value(reader, "glm4.block_count") == preset.n_layer
    assert _value(reader, "glm4.embedding_length") == preset.n_embd
    assert _value(reader, "glm4.context_length") == 2048
    assert _value(reader, "glm4.attention.head_count_kv") < _value(reader, "glm4.attention.head_count")
    assert "glm4.attention.layer_norm_rms_epsilon" in reader.fields


def test_rope_rotates_half_of_each_head_like_glm(reader: Any) -> None:
    head_dim = _value(reader, "glm4.embedding_length") // _value(reader, "glm4.attention.head_count")
    assert _value(reader, "glm4.rope.dimension_count") == head_dim // 2


def test_weight_matrices_are_q4_0_and_norms_and_biases_are_f32(reader: Any) -> None:
    for tensor in reader.tensors:
        expected = "F32" if tensor.name.endswith(("norm.weight", ".bias")) else "Q4_0"
        assert tensor.tensor_type.name == expected, tensor.name
    assert _value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0


def test_every_block_has_fused_ffn_up_and_post_norms(reader: Any) -> None:
    preset = builder.PRESETS["tiny"]
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    for i in range(preset.n_layer):
        assert shapes[f"blk.{i}.ffn_up.weight"] == [preset.n_embd, 2 * preset.n_ff]
        assert f"blk.{i}.post_attention_norm.weight" in shapes
        assert f"blk.{i}.post_ffw_norm.weight" in shapes
        assert f"blk.{i}.attn_q.bias" in shapes
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= shapes.keys()


def test_the_tokenizer_is_byte_level_bpe_with_the_glm4_pre_tokenizer(reader: Any) -> None:
    assert _value(reader, "tokenizer.ggml.model") == "gpt2"
    assert _value(reader, "tokenizer.ggml.pre") == "glm4"
    tokens = _value(reader, "tokenizer.ggml.tokens")
    assert set(builder.bytes_to_unicode().values()) <= set(tokens)
    assert len(tokens) == len(set(tokens)) == _value(reader, "glm4.vocab_size")


def test_every_merge_joins_two_tokens_into_a_token_of_the_vocab(reader: Any) -> None:
    tokens = set(_value(reader, "tokenizer.ggml.tokens"))
    merges = _value(reader, "tokenizer.ggml.merges")
    assert len(merges) >= 100
    for merge in merges:
        left, right = merge.split(" ")
        assert {left, right, left + right} <= tokens, merge


def test_glm4_special_tokens_are_control_tokens(reader: Any) -> None:
    tokens = _value(reader, "tokenizer.ggml.tokens")
    types = _value(reader, "tokenizer.ggml.token_type")
    for special in builder.SPECIAL_TOKENS:
        assert types[tokens.index(special)] == gguf.TokenType.CONTROL, special


def test_special_token_ids_follow_the_glm4_converter(reader: Any) -> None:
    tokens = _value(reader, "tokenizer.ggml.tokens")
    assert tokens[_value(reader, "tokenizer.ggml.eos_token_id")] == "<|endoftext|>"
    assert tokens[_value(reader, "tokenizer.ggml.bos_token_id")] == "<|endoftext|>"
    assert tokens[_value(reader, "tokenizer.ggml.eot_token_id")] == "<|user|>"
    assert tokens[_value(reader, "tokenizer.ggml.unknown_token_id")] == "<|endoftext|>"
    assert _value(reader, "tokenizer.ggml.add_bos_token") is False


def test_the_chat_template_is_glm4s(reader: Any) -> None:
    template = _value(reader, "tokenizer.chat_template")
    assert template == builder.GLM4_CHAT_TEMPLATE
    assert template.startswith("[gMASK]<sop>{% for item in messages %}")


def test_the_chat_template_renders_a_glm4_prompt() -> None:
    jinja2 = pytest.importorskip("jinja2.sandbox")
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "observation", "content": '{"temp": 21}'},
    ]
    prompt = env.from_string(builder.GLM4_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert prompt == (
        '[gMASK]<sop><|system|>\nBe brief.<|user|>\nhi<|assistant|>\nhello<|observation|>\n{"temp": 21}<|assistant|>'
    )


def test_the_bench_vocab_has_glm4s_size_and_special_ids() -> None:
    vocab = builder.build_vocab(builder.PRESETS["bench"])
    assert len(vocab.tokens) == len(set(vocab.tokens)) == 151552
    ids = vocab.special_ids()
    assert ids["<|endoftext|>"] == 151329
    assert ids["[gMASK]"] == 151331
    assert ids["<sop>"] == 151333
    assert ids["<|user|>"] == 151336
    assert ids["<|observation|>"] == 151338


def test_the_output_head_never_favours_special_tokens(reader: Any) -> None:
    output = next(t for t in reader.tensors if t.name == "output.weight")
    rows = gguf.quants.dequantize(output.data, output.tensor_type)
    tokens = _value(reader, "tokenizer.ggml.tokens")
    for special in builder.SPECIAL_TOKENS:
        assert not rows[tokens.index(special)].any(), special


def test_the_cli_skips_an_existing_file_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    out.write_bytes(b"placeholder")
    assert builder.main(["--preset", "tiny", "--out", str(out)]) == 0
    assert out.read_bytes() == b"placeholder"
    assert "skipped" in capsys.readouterr().out
    assert builder.main(["--preset", "tiny", "--out", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert list(tmp_path.iterdir()) == [out]


def test_an_unknown_preset_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        builder.build_model(tmp_path / "x.gguf", "huge")
    assert not list(tmp_path.iterdir())
