"""The `onnx` command kind on a real ONNX model (built here with the `onnx` package) through a real
mosquitto and the agent: numeric outputs and input validation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.agent_proc import AgentProcess, write_agent_config
from tests.support.broker import Broker
from tests.support.cloud import CloudClient, command

onnx = pytest.importorskip("onnx")
helper, numpy_helper = onnx.helper, onnx.numpy_helper

pytestmark = pytest.mark.integration

W = np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype=np.float32)
B = np.array([0.1, -0.2], dtype=np.float32)


def build_linear_anomaly_model(path: Path) -> Path:
    """y = x @ W + b (a linear layer) and score = sum((x - mean)^2) per row (an anomaly score)."""
    mean = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("Sub", ["x", "mean"], ["d"]), helper.make_node("Mul", ["d", "d"], ["d2"]),
         helper.make_node("ReduceSum", ["d2", "axes"], ["score"], keepdims=0)],
        "linear_anomaly",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b"), numpy_helper.from_array(mean, "mean"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, session_broker: Broker, tiny_model: Path) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("onnx")
    model = build_linear_anomaly_model(folder / "linear.onnx")
    tail = f'[onnx.models.sensor]\npath = "{model}"\n'
    config = write_agent_config(folder / "gw-onnx.toml", "gw-onnx", session_broker.port, tiny_model,
                                folder / "gw-onnx.db", tail=tail)
    agent = AgentProcess(config, folder / "gw-onnx.log").start()
    watcher = CloudClient(session_broker.port)
    try:
        assert "onnx" in watcher.wait_online("gw-onnx")["kinds"]
    finally:
        watcher.close()
    yield "gw-onnx"
    assert agent.terminate() == 0, agent.log_text()


def run(cloud: CloudClient, params: dict) -> dict:
    cmd = command("onnx", params)
    cloud.send("gw-onnx", cmd)
    return cloud.wait_terminal(cmd["id"])


def test_an_onnx_model_computes_the_linear_layer_and_the_anomaly_score(device: str, cloud: CloudClient) -> None:
    x = np.array([[1.0, 2.0, 3.0], [4.0, -1.0, 0.5]], dtype=np.float32)
    reply = run(cloud, {"model": "sensor", "inputs": {"x": x.tolist()}})
    assert reply["status"] == "succeeded", reply
    outputs = reply["output"]["outputs"]
    np.testing.assert_allclose(outputs["y"], x @ W + B, rtol=1e-6)
    np.testing.assert_allclose(outputs["score"], [0.0, 9.0 + 9.0 + 6.25], rtol=1e-6)


@pytest.mark.parametrize(("params", "expected"), [
    ({"model": "nope", "inputs": {}}, "no ONNX model 'nope' on this device (it has ['sensor'])"),
    ({"model": "sensor", "inputs": {"z": [[1, 2, 3]]}}, "missing: ['x'], unknown: ['z']"),
    ({"model": "sensor", "inputs": {"x": [[1, 2]]}}, "shape [1, 2]; the model expects ['any', 3]"),
    ({"model": "sensor", "inputs": {"x": [1, 2, 3]}}, "shape [3]; the model expects ['any', 3]"),
    ({"model": "sensor", "inputs": {"x": [[1, 2, 3], [4]]}}, "rectangular nested list of tensor(float)"),
    ({"model": "sensor", "inputs": {"x": [["a", "b", "c"]]}}, "rectangular nested list of tensor(float)"),
])
def test_inputs_that_do_not_match_the_model_fail_with_invalid_command(
        device: str, cloud: CloudClient, params: dict, expected: str) -> None:
    reply = run(cloud, params)
    assert reply["status"] == "failed"
    assert reply["error"]["code"] == "invalid_command"
    assert expected in reply["error"]["message"]
