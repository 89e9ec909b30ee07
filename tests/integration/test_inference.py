"""Inference features end to end: JSON-schema output, prompt templates, stop strings, context
overflow and the stall watchdog, on the real tiny GLM GGUF in llama.cpp behind a real mosquitto."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tests.support.agent_proc import AgentProcess, write_agent_config
from tests.support.broker import Broker
from tests.support.cloud import CloudClient, chat, command

pytestmark = pytest.mark.integration

TEMPLATES = """
[templates.triage]
system = "You watch {site}. Reply with one word."
user = "Reading: {reading}"
variables = ["site", "reading"]
"""

SCHEMA = {
    "type": "object",
    "properties": {
        "level": {"type": "string", "enum": ["ok", "warn", "alarm"]},
        "note": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["pump", "valve"]}, "maxItems": 3},
        "hot": {"type": "boolean"},
    },
    "required": ["level", "note", "hot"],
    "additionalProperties": False,
}


def start_device(folder: Path, broker: Broker, model: Path, name: str, tail: str) -> AgentProcess:
    config = write_agent_config(folder / f"{name}.toml", name, broker.port, model, folder / f"{name}.db", tail=tail)
    return AgentProcess(config, folder / f"{name}.log").start()


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, session_broker: Broker, tiny_model: Path) -> Iterator[str]:
    """One agent for the module, with a prompt template configured."""
    agent = start_device(tmp_path_factory.mktemp("inference"), session_broker, tiny_model, "gw-inference", TEMPLATES)
    watcher = CloudClient(session_broker.port)
    try:
        watcher.wait_online("gw-inference")
    finally:
        watcher.close()
    yield "gw-inference"
    assert agent.terminate() == 0, agent.log_text()


def run(cloud: CloudClient, device: str, kind: str, params: dict) -> dict:
    cmd = command(kind, params)
    cloud.send(device, cmd)
    return cloud.wait_terminal(cmd["id"], timeout=120)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_response_format_json_schema_output_validates_against_the_schema(
        device: str, cloud: CloudClient, seed: int) -> None:
    params = chat("Status of the pump as JSON", max_tokens=400, seed=seed,
                  response_format={"type": "json_schema", "schema": SCHEMA})
    reply = run(cloud, device, "chat", params)
    assert reply["status"] == "succeeded", reply
    assert reply["output"]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(reply["output"]["text"]), SCHEMA)


def test_an_invalid_json_schema_is_an_invalid_command(device: str, cloud: CloudClient) -> None:
    params = chat("x", response_format={"type": "json_schema", "schema": {"type": "nonsense"}})
    reply = run(cloud, device, "chat", params)
    assert reply["status"] == "failed"
    assert reply["error"]["code"] == "invalid_command"
    assert "not a valid JSON Schema" in reply["error"]["message"]


def test_a_named_template_with_its_variables_formats_the_prompt(device: str, cloud: CloudClient) -> None:
    base = {"template": "triage", "variables": {"site": "pump 4", "reading": "91 C"}, "max_tokens": 4, "seed": 1}
    bare = run(cloud, device, "chat", {**base, "messages": []})
    with_context = run(cloud, device, "chat", {**base, "messages": [{"role": "user", "content": "more context"}]})
    assert bare["status"] == with_context["status"] == "succeeded", (bare, with_context)
    # the template's messages are in the prompt: more tokens than the bare user turn would make
    plain = run(cloud, device, "chat", chat("Reading: 91 C", max_tokens=4, seed=1))
    assert bare["output"]["usage"]["prompt_tokens"] > plain["output"]["usage"]["prompt_tokens"]
    assert with_context["output"]["usage"]["prompt_tokens"] > bare["output"]["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("template", "variables", "expected"), [
    ("triage", {"site": "pump 4"}, "missing: ['reading']"),
    ("triage", {"site": "a", "reading": "b", "colour": "c"}, "not declared: ['colour']"),
    ("unknown", {}, "'unknown' is not defined on this device (templates: triage)"),
])
def test_a_wrong_template_or_wrong_variables_fail_with_invalid_command_saying_what_is_wrong(
        device: str, cloud: CloudClient, template: str, variables: dict, expected: str) -> None:
    reply = run(cloud, device, "chat", {"template": template, "variables": variables, "max_tokens": 4})
    assert reply["status"] == "failed"
    assert reply["error"]["code"] == "invalid_command"
    assert expected in reply["error"]["message"]


def test_a_stop_string_ends_the_text_before_it(device: str, cloud: CloudClient) -> None:
    first = run(cloud, device, "complete", {"prompt": "Once", "max_tokens": 40, "seed": 5, "temperature": 0})
    text = first["output"]["text"]
    stop = text[10:13]
    assert len(stop) == 3 and text.find(stop) == 10, "the seeded text must contain a stop string to cut at"
    second = run(cloud, device, "complete", {"prompt": "Once", "max_tokens": 40, "seed": 5, "temperature": 0,
                                             "stop": [stop]})
    assert second["output"]["text"] == text[:10]
    assert second["output"]["finish_reason"] == "stop"


def test_a_prompt_longer_than_the_context_is_an_invalid_command_and_the_agent_keeps_serving(
        device: str, cloud: CloudClient) -> None:
    reply = run(cloud, device, "complete", {"prompt": "gateway sensor " * 600, "max_tokens": 8})
    assert reply["status"] == "failed"
    assert reply["error"]["code"] == "invalid_command"
    assert "n_ctx" in reply["error"]["message"]
    assert run(cloud, device, "ping", {})["status"] == "succeeded"


def test_a_generation_with_no_token_within_the_stall_timeout_fails_with_timeout(
        tmp_path: Path, session_broker: Broker, tiny_model: Path, cloud: CloudClient) -> None:
    # 1 ms is far shorter than evaluating a 1400-token prompt: the watchdog fires during it
    agent = start_device(tmp_path, session_broker, tiny_model, "gw-stall", "stall_timeout_s = 0.001\n")
    try:
        cloud.wait_online("gw-stall")
        reply = run(cloud, "gw-stall", "complete", {"prompt": "gateway sensor " * 180, "max_tokens": 8})
        assert reply["status"] == "failed", reply
        assert reply["error"]["code"] == "timeout"
        assert "stall_timeout_s" in reply["error"]["message"]
    finally:
        assert agent.terminate() == 0, agent.log_text()


def test_a_stream_interval_of_zero_sends_a_chunk_per_token(
        tmp_path: Path, session_broker: Broker, tiny_model: Path, cloud: CloudClient) -> None:
    # the default 50 ms gathers this whole generation (~2,000 tokens/s) into two or three chunks
    config = write_agent_config(tmp_path / "gw-tokens.toml", "gw-tokens", session_broker.port, tiny_model,
                                tmp_path / "gw-tokens.db")
    agent = AgentProcess(config, tmp_path / "gw-tokens.log", env={"EDGE_AGENT_MQTT__STREAM_INTERVAL_MS": "0"}).start()
    try:
        cloud.wait_online("gw-tokens")
        cmd = command("complete", {"prompt": "Count the valves", "max_tokens": 32, "seed": 1, "stream": True})
        cloud.send("gw-tokens", cmd)
        reply = cloud.wait_terminal(cmd["id"], timeout=120)
        cloud.wait_for(lambda: any(c["done"] for c in cloud.on(f"/stream/{cmd['id']}")), 10, "final chunk")
        chunks = cloud.on(f"/stream/{cmd['id']}")
        assert "".join(c["delta"] for c in chunks) == reply["output"]["text"]
        tokens = reply["output"]["usage"]["completion_tokens"]
        assert tokens >= 8, reply
        assert len(chunks) - 1 >= tokens // 2, f"{len(chunks) - 1} chunks for {tokens} tokens"
    finally:
        assert agent.terminate() == 0, agent.log_text()
