"""A command a real agent minted for its local API (`[http]`) is recorded by a real bridge with origin
`local` (docs/protocol.md, "Local commands") and listed by `cloud-bridge commands`."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from cloud_bridge.store.registry import Registry
from tests.support.agent_proc import AgentProcess, write_agent_config
from tests.support.broker import free_port, wait_for_port

from .conftest import BridgeProcess, wait_until

pytestmark = pytest.mark.integration

TOKEN = "bridge-local-origin-token-0123"


def test_a_local_api_command_is_recorded_with_origin_local(bridge: BridgeProcess, mosquitto, tmp_path: Path,
                                                           tiny_model: Path) -> None:
    port = free_port()
    (tmp_path / "token").write_text(TOKEN)
    config = write_agent_config(tmp_path / "gw.toml", "gw-local-1", mosquitto.port, tiny_model, tmp_path / "gw.db",
                                tail=f'[http]\nenabled = true\nport = {port}\ntoken_file = "token"\n')
    agent = AgentProcess(config, tmp_path / "gw.log", env={"EDGE_AGENT_MQTT__TOPIC_PREFIX": bridge.prefix}).start()
    try:
        wait_for_port(port, timeout=120)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0, timeout=120)
        answer = api.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=6, temperature=0)
        command_id = answer.id.removeprefix("chatcmpl-")
        registry = Registry.open(bridge.registry_path, create=False)
        try:
            row = wait_until(lambda: next((c for c in registry.commands.recent() if c.id == command_id), None),
                             timeout_s=60, what="the local command on the bridge")
        finally:
            registry.close()
        assert (row.device_id, row.kind, row.state) == ("gw-local-1", "chat", "succeeded")
        assert row.payload["origin"] == "local"
        assert row.reply["output"]["text"] == answer.choices[0].message.content
        listed = json.loads(bridge.cli("commands", "--json").stdout)
        assert [c["payload"]["origin"] for c in listed if c["id"] == command_id] == ["local"]
    finally:
        agent.stop_quietly()
