"""The `onnx` command kind: named ONNX models from `[onnx.models.NAME]`, run with ONNX Runtime.

Execution providers: the configured list, else the best of what this onnxruntime build offers
(`choose_providers`, pure). Inputs are checked against the model's own signature (names, rank,
fixed dimensions, element type) before anything runs, so a mismatch is an `invalid_command` that
says what the model expects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from autoglm_wire.errors import InvalidCommand, ModelError
from autoglm_wire.protocol import OnnxParams
from edge_agent.engine.settings import OnnxModelConfig

log = logging.getLogger(__name__)

# Best first; anything else the build offers comes after these, CPU always last.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CoreMLExecutionProvider",
                       "OpenVINOExecutionProvider", "DmlExecutionProvider")
CPU = "CPUExecutionProvider"
DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def choose_providers(requested: list[str] | None, available: list[str]) -> list[str]:
    """The configured providers (each must be available), else the preferred available ones + CPU."""
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ModelError(f"ONNX providers {missing} are not in this onnxruntime build (it has {available}); "
                             "fix [onnx.models.*] providers or install the matching onnxruntime package")
        return list(requested)
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen + [CPU]


def session_options(intra_op_threads: int | None, graph_optimization: str, parallel_execution: bool) -> Any:
    """ONNX Runtime session options from the `[onnx.models.NAME]` keys (shared with the tuner)."""
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = levels[graph_optimization]
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel_execution else ort.ExecutionMode.ORT_SEQUENTIAL
    return options


class OnnxModel:
    """One ONNX Runtime session and the signature its inputs must match."""

    def __init__(self, name: str, config: OnnxModelConfig) -> None:
        import onnxruntime as ort

        if not config.path.is_file():
            raise ModelError(f"ONNX model {name!r}: file {config.path} does not exist; fix [onnx.models.{name}] path")
        options = session_options(config.intra_op_threads, config.graph_optimization, config.parallel_execution)
        self.providers = choose_providers(config.providers, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(config.path), options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"ONNX Runtime could not load {name!r} from {config.path}: {exc}") from exc
        self.name = name
        self.inputs = {i.name: (i.type, i.shape) for i in self._session.get_inputs()}
        log.info("ONNX model %s loaded from %s on %s", name, config.path, self.providers)

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        feeds = self._feeds(inputs)
        names = [o.name for o in self._session.get_outputs()]
        try:
            results = self._session.run(names, feeds)
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed running {self.name!r}: {exc}") from exc
        return {name: np.asarray(value).tolist() for name, value in zip(names, results, strict=True)}

    def _feeds(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        expected, given = set(self.inputs), set(inputs)
        if expected != given:
            raise InvalidCommand(f"ONNX model {self.name!r} takes inputs {sorted(expected)}; missing: "
                                 f"{sorted(expected - given)}, unknown: {sorted(given - expected)}")
        return {name: self._array(name, value) for name, value in inputs.items()}

    def _array(self, name: str, value: Any) -> np.ndarray:
        type_name, shape = self.inputs[name]
        dtype = DTYPES.get(type_name)
        if dtype is None:
            raise InvalidCommand(f"input {name!r} has type {type_name}, which the onnx command cannot send")
        try:
            array = np.asarray(value, dtype=dtype)
        except (ValueError, TypeError) as exc:
            raise InvalidCommand(f"input {name!r} must be a rectangular nested list of {type_name}: {exc}") from exc
        if dtype is not np.float32 and dtype is not np.float64 and dtype is not np.float16 \
                and not np.array_equal(array, np.asarray(value, dtype=np.float64)):
            raise InvalidCommand(f"input {name!r} is {type_name}: send whole numbers")
        if array.ndim != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(shape, array.shape,
                                                                                          strict=True)):
            wanted = [d if isinstance(d, int) else "any" for d in shape]
            raise InvalidCommand(f"input {name!r} has shape {list(array.shape)}; the model expects {wanted}")
        return array


class OnnxModels:
    """Every configured ONNX model, loaded at start so a bad file fails the agent, not a command."""

    def __init__(self, configs: Mapping[str, OnnxModelConfig]) -> None:
        self._models = {name: OnnxModel(name, config) for name, config in configs.items()}
        self._lock = threading.Lock()

    def run(self, params: OnnxParams) -> dict[str, Any]:
        model = self._models.get(params.model)
        if model is None:
            raise InvalidCommand(f"no ONNX model {params.model!r} on this device (it has {sorted(self._models)})")
        with self._lock:
            return {"outputs": model.run(params.inputs)}
