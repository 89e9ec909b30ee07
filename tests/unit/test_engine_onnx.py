"""ONNX execution providers: configured ones must exist; otherwise the best available, CPU last."""

from __future__ import annotations

import pytest

from autoglm_wire.errors import ModelError
from edge_agent.engine.onnx import choose_providers


def test_without_a_configured_list_the_best_available_providers_come_first_and_cpu_last() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider"]
    assert choose_providers(None, available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_a_cpu_only_build_runs_on_cpu() -> None:
    assert choose_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_configured_providers_are_used_as_given() -> None:
    assert choose_providers(["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]


def test_a_configured_provider_the_build_lacks_is_an_error_that_lists_what_it_has() -> None:
    with pytest.raises(ModelError, match="CUDAExecutionProvider.*not in this onnxruntime build"):
        choose_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"])
