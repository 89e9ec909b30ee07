"""`edge-agent tune` on the real tiny GGUF: bounded by its budget, prints its table, writes a
profile the agent's config loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import load_config

pytestmark = pytest.mark.integration


def test_tune_prints_its_trials_and_writes_a_profile_the_agent_loads(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "profile.toml"
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "tune", "--model", str(tiny_model), "--budget-s", "8",
         "--max-tokens", "8", "--target", "ttft", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "WINNER" in result.stdout and "threads" in result.stdout
    assert "[" in result.stderr and "s left" in result.stderr  # the progress bar
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "gw"\n[model]\npath = "{tiny_model}"\nprofile = "profile.toml"\n')
    model = load_config(config).model
    assert model.n_ubatch is not None and model.type_k in {"f16", "q8_0", "q4_0"}


def test_tune_on_an_onnx_model_writes_a_profile_its_onnx_section_loads(tmp_path: Path, tiny_model: Path) -> None:
    from tests.integration.test_onnx import build_linear_anomaly_model

    model = build_linear_anomaly_model(tmp_path / "sensor.onnx")
    out = tmp_path / "sensor-profile.toml"
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "tune", "--model", str(model), "--budget-s", "3",
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "WINNER" in result.stdout and "CPUExecutionProvider" in result.stdout
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "gw"\n[model]\npath = "{tiny_model}"\n'
                      f'[onnx.models.sensor]\npath = "sensor.onnx"\nprofile = "sensor-profile.toml"\n')
    sensor = load_config(config).onnx.models["sensor"]
    assert sensor.intra_op_threads is not None
