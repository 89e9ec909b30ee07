"""The agent's own numbers on a real agent (tiny GGUF, real mosquitto): `GET /metrics` on the local
HTTP listener (Prometheus text, bearer token) and the same values in Telemetry; `/readyz` checks."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm_wire import __version__
from tests.integration.test_local_api import get
from tests.support.agent_proc import AgentProcess, write_agent_config
from tests.support.broker import Broker, free_port, wait_for_port
from tests.support.cloud import CloudClient, chat, command

pytestmark = pytest.mark.integration

TOKEN = "agent-metrics-test-token-0123456789"


def start(tmp_path: Path, tiny_model: Path, broker: Broker, device: str) -> tuple[AgentProcess, int]:
    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    config = write_agent_config(tmp_path / f"{device}.toml", device, broker.port, tiny_model, tmp_path / f"{device}.db",
                                tail=f'[http]\nenabled = true\nport = {port}\ntoken_file = "token"\n',
                                telemetry_interval_s="1")
    agent = AgentProcess(config, tmp_path / f"{device}.log").start()
    wait_for_port(port, timeout=120)
    return agent, port


def scrape(port: int, token: str | None = TOKEN) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`/metrics` as {(sample name, sorted labels): value}."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def test_metrics_and_telemetry_report_the_same_agent(tmp_path: Path, tiny_model: Path, own_broker: Broker) -> None:
    cloud = CloudClient(own_broker.port)
    agent, port = start(tmp_path, tiny_model, own_broker, "gw-metrics")
    try:
        cloud.wait_online("gw-metrics")
        cloud.send("gw-metrics", command("chat", chat("Pump 3 reads", max_tokens=8, temperature=0), "m-chat-1"))
        assert cloud.wait_terminal("m-chat-1")["status"] == "succeeded"
        samples = scrape(port)
        assert value(samples, "autoglm_agent_commands", kind="chat", state="succeeded") == 1
        assert value(samples, "autoglm_agent_decode_tokens_per_second") > 0
        assert value(samples, "autoglm_agent_model_load_seconds") > 0
        assert value(samples, "autoglm_agent_store_bytes") >= (tmp_path / "gw-metrics.db").stat().st_size
        assert value(samples, "autoglm_agent_resident_memory_bytes") > 10 * 1024 * 1024
        assert value(samples, "autoglm_agent_broker_connected") == 1
        assert value(samples, "autoglm_agent_reconnects_total") == 0
        [info] = [dict(labels) for name, labels in samples if name == "autoglm_agent_info"]
        assert info["device_id"] == "gw-metrics" and info["agent_version"] == __version__ and info["model"]

        def telemetry_with_the_chat() -> dict | None:
            found = [t for t in cloud.on("/gw-metrics/telemetry") if t.get("commands", {}).get("chat")]
            return found[-1] if found else None
        cloud.wait_for(telemetry_with_the_chat, 30, "telemetry counting the chat")
        telemetry = telemetry_with_the_chat()
        assert telemetry is not None
        assert telemetry["commands"]["chat"] == {"succeeded": 1}
        assert telemetry["model_load_s"] == pytest.approx(value(samples, "autoglm_agent_model_load_seconds"), abs=1e-3)
        assert telemetry["store_bytes"] > 0 and telemetry["reconnects"] == 0
        assert telemetry["max_tokens_limit"] == 4096  # limits.max_tokens by default

        # broker down: a local request is answered, its replies wait in the outbox; back up: they leave
        own_broker.stop()
        until(lambda: value(scrape(port), "autoglm_agent_broker_connected") == 0, "the broker's loss noticed")
        local = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0, timeout=120)
        assert local.completions.create(model="any", prompt="Valve 7 is", max_tokens=4, temperature=0).choices
        offline = scrape(port)
        assert value(offline, "autoglm_agent_outbox_rows") >= 3  # accepted, running, succeeded
        assert value(offline, "autoglm_agent_outbox_bytes") > 0
        assert value(offline, "autoglm_agent_commands", kind="complete", state="succeeded") == 1
        own_broker.start()
        until(lambda: value(scrape(port), "autoglm_agent_outbox_rows") == 0, "the outbox drained after the reconnect")
        assert value(scrape(port), "autoglm_agent_reconnects_total") == 1
    finally:
        agent.stop_quietly()
        cloud.close()


def test_metrics_need_the_token_health_does_not(tmp_path: Path, tiny_model: Path, session_broker: Broker) -> None:
    agent, port = start(tmp_path, tiny_model, session_broker, "gw-metrics-auth")
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            scrape(port, token=None)
        assert caught.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as wrong:
            scrape(port, token="wrong-token-wrong-token")
        assert wrong.value.code == 401
        assert get(port, "/healthz") == (200, {"status": "alive"})
        until(lambda: get(port, "/readyz")[0] == 200, "ready (the link connects after the listener opens)")
        assert get(port, "/readyz")[1] == {"status": "ready", "reason": None,
                        "checks": {"broker": "ok", "store": "ok", "model": "ok"}}
    finally:
        agent.stop_quietly()
