"""Tuned profiles, templates and ONNX models in the agent config."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm_wire.errors import ConfigError
from edge_agent.config import load_config

BASE = 'device_id = "gw-1"\n[model]\npath = "m.gguf"\n'


def write(folder: Path, text: str) -> Path:
    path = folder / "agent.toml"
    path.write_text(text)
    return path


def test_a_profile_fills_the_model_keys_the_config_does_not_set(tmp_path: Path) -> None:
    (tmp_path / "tuned.toml").write_text('[model]\nn_threads = 2\nn_batch = 128\nflash_attn = true\n'
                                         'type_k = "q8_0"\n[tuned]\ntarget = "tokens_per_s"\n')
    config = load_config(write(tmp_path, BASE + 'profile = "tuned.toml"\nn_batch = 64\n'))
    assert (config.model.n_threads, config.model.flash_attn, config.model.type_k) == (2, True, "q8_0")
    assert config.model.n_batch == 64, "a key set in the config wins over the profile"


def test_a_missing_profile_is_a_config_error_that_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="edge-agent tune"):
        load_config(write(tmp_path, BASE + 'profile = "absent.toml"\n'))


def test_a_profile_with_an_unknown_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "tuned.toml").write_text("[model]\nn_thread = 2\n")
    with pytest.raises(ConfigError, match="not a valid profile"):
        load_config(write(tmp_path, BASE + 'profile = "tuned.toml"\n'))


def test_templates_and_onnx_models_load_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    text = BASE + ('[templates.triage]\nuser = "Reading {r}"\nvariables = ["r"]\n'
                   '[onnx.models.sensor]\npath = "models/sensor.onnx"\n')
    config = load_config(write(tmp_path, text))
    assert config.templates["triage"].variables == ["r"]
    assert config.onnx.models["sensor"].path == (tmp_path / "models" / "sensor.onnx").resolve()


def test_a_template_with_an_undeclared_placeholder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="declared variables"):
        load_config(write(tmp_path, BASE + '[templates.t]\nuser = "Reading {r}"\n'))


def test_an_onnx_profile_fills_the_onnx_model_keys_the_config_does_not_set(tmp_path: Path) -> None:
    (tmp_path / "sensor.toml").write_text('[onnx]\nintra_op_threads = 1\ngraph_optimization = "basic"\n')
    text = BASE + '[onnx.models.sensor]\npath = "s.onnx"\nprofile = "sensor.toml"\nintra_op_threads = 2\n'
    sensor = load_config(write(tmp_path, text)).onnx.models["sensor"]
    assert (sensor.intra_op_threads, sensor.graph_optimization) == (2, "basic")


def test_a_gguf_profile_given_to_an_onnx_model_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "tuned.toml").write_text("[model]\nn_threads = 2\n")
    text = BASE + '[onnx.models.sensor]\npath = "s.onnx"\nprofile = "tuned.toml"\n'
    with pytest.raises(ConfigError, match="no \\[onnx\\] table"):
        load_config(write(tmp_path, text))
