"""`/metrics`, `/healthz` and `/readyz` in process (FastAPI's TestClient) on a real registry, both stores:
known replies give exact bucket counts and sums, labels follow `[metrics]`, the token rule follows the host."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from autoglm_wire.protocol import Telemetry, format_ts
from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.app import create_app

from .factories import T0, at, command, mark_sent, offline, online, reply

TOKEN = "test-token-0123456789abcdef"


def _scrape(registry, config: BridgeConfig | None = None) -> dict[str, list]:
    """Samples by metric family name."""
    with TestClient(create_app(registry, config or BridgeConfig(), TOKEN)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def _value(samples: list, name: str, **labels: str) -> float:
    matching = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(matching) == 1, f"{name}{labels} in {samples}"
    return matching[0]


def _fleet(registry) -> None:
    """dev-1 online with three chats (total 40 ms, 400 ms, 4 s) and a ping; dev-2 offline; a dead letter."""
    registry.devices.record_status(online("dev-1"), T0)
    registry.devices.record_status(offline("dev-2"), T0)
    for i, total_ms in enumerate((40.0, 400.0, 4000.0), start=1):
        registry.commands.add(command(f"chat-{i}", kind="chat", params={"prompt": "hi"}), "dev-1", T0)
        registry.replies.record(reply(i, "succeeded", command_id=f"chat-{i}", output={"text": "x"},
                                      metrics={"queue_ms": 10.0 * i, "ttft_ms": 20.0, "total_ms": total_ms,
                                               "tokens_per_s": 15.0}), at(i))
    registry.commands.add(command("ping-1"), "dev-1", T0)
    registry.commands.add(command("ping-2"), "dev-1", T0)
    mark_sent(registry, "ping-2", at(1))
    mark_sent(registry, "ping-2", at(7))
    registry.devices.record_telemetry(Telemetry(device_id="dev-1", ts=format_ts(T0), queue_depth=2, outbox_depth=7,
                                                outbox_bytes=100, tokens_per_s_ewma=15.0, rss_mb=321.5,
                                                gpu_layers=0, uptime_s=5.0, reconnects=2, store_bytes=65536), at(5))
    registry.alerts.open("dev-2", "offline", "offline for 10 min", at(5))
    registry.dead_letters.record("devices/dev-1/reply", "dev-1", b"{", "not JSON", at(6))


def test_metrics_report_the_registry_with_exact_buckets_counts_and_sums(registry):
    _fleet(registry)
    metrics = _scrape(registry)
    total = metrics["cloud_bridge_total_seconds"]
    chat = {"device": "dev-1", "kind": "chat"}
    assert _value(total, "cloud_bridge_total_seconds_bucket", le="0.05", **chat) == 1
    assert _value(total, "cloud_bridge_total_seconds_bucket", le="0.5", **chat) == 2
    assert _value(total, "cloud_bridge_total_seconds_bucket", le="2.5", **chat) == 2
    assert _value(total, "cloud_bridge_total_seconds_bucket", le="5", **chat) == 3
    assert _value(total, "cloud_bridge_total_seconds_bucket", le="+Inf", **chat) == 3
    assert _value(total, "cloud_bridge_total_seconds_count", **chat) == 3
    assert _value(total, "cloud_bridge_total_seconds_sum", **chat) == pytest.approx(4.44)
    queue = metrics["cloud_bridge_queue_seconds"]
    assert _value(queue, "cloud_bridge_queue_seconds_sum", **chat) == pytest.approx(0.06)
    assert _value(metrics["cloud_bridge_decode_tokens_per_second"], "cloud_bridge_decode_tokens_per_second_bucket",
                  le="10", **chat) == 0
    assert _value(metrics["cloud_bridge_decode_tokens_per_second"], "cloud_bridge_decode_tokens_per_second_bucket",
                  le="20", **chat) == 3
    commands = metrics["cloud_bridge_commands"]
    assert _value(commands, "cloud_bridge_commands", kind="chat", state="succeeded") == 3
    assert _value(commands, "cloud_bridge_commands", kind="ping", state="pending") == 1
    assert _value(commands, "cloud_bridge_commands", kind="ping", state="sent") == 1
    assert _value(metrics["cloud_bridge_command_resends"], "cloud_bridge_command_resends_total", kind="ping") == 1
    assert _value(metrics["cloud_bridge_messages_stored"], "cloud_bridge_messages_stored", type="reply") == 3
    assert _value(metrics["cloud_bridge_devices"], "cloud_bridge_devices", state="online") == 1
    assert _value(metrics["cloud_bridge_devices"], "cloud_bridge_devices", state="offline") == 1
    assert _value(metrics["cloud_bridge_alerts_open"], "cloud_bridge_alerts_open", kind="offline") == 1
    assert _value(metrics["cloud_bridge_dead_letters"], "cloud_bridge_dead_letters_total") == 1
    assert _value(metrics["cloud_bridge_device_outbox_depth"], "cloud_bridge_device_outbox_depth", device="dev-1") == 7
    assert _value(metrics["cloud_bridge_device_rss_megabytes"], "cloud_bridge_device_rss_megabytes",
                  device="dev-1") == 321.5
    assert _value(metrics["cloud_bridge_device_reconnects"], "cloud_bridge_device_reconnects", device="dev-1") == 2
    assert _value(metrics["cloud_bridge_device_store_bytes"], "cloud_bridge_device_store_bytes",
                  device="dev-1") == 65536


def test_without_device_labels_histograms_are_by_kind_and_telemetry_is_the_fleets_highest(registry):
    _fleet(registry)
    metrics = _scrape(registry, BridgeConfig(metrics={"device_labels": False}))
    total = metrics["cloud_bridge_total_seconds"]
    assert _value(total, "cloud_bridge_total_seconds_count", kind="chat") == 3
    assert all("device" not in sample.labels for family in metrics.values() for sample in family)
    assert _value(metrics["cloud_bridge_device_outbox_depth"], "cloud_bridge_device_outbox_depth") == 7


@pytest.mark.parametrize(("host", "open_", "needs_token"), [
    ("127.0.0.1", None, False), ("localhost", None, False), ("0.0.0.0", None, True),
    ("10.0.0.5", None, True), ("127.0.0.1", False, True), ("0.0.0.0", True, False),
])
def test_metrics_need_the_token_unless_bound_to_localhost_or_configured(registry, host, open_, needs_token):
    config = BridgeConfig(http={"host": host}, metrics={"open": open_})
    with TestClient(create_app(registry, config, TOKEN)) as client:
        anonymous = client.get("/metrics")
        assert anonymous.status_code == (401 if needs_token else 200)
        if needs_token:
            assert "token_file" in anonymous.json()["error"]["message"]
        assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_healthz_and_readyz_need_no_token_and_readyz_names_a_lost_broker(registry):
    connected = [True]
    with TestClient(create_app(registry, BridgeConfig(http={"host": "0.0.0.0"}), TOKEN,
                               broker_connected=lambda: connected[0])) as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        assert client.get("/readyz").status_code == 200
        connected[0] = False
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["problems"] == ["broker not connected (see the bridge's log for the reconnect attempts)"]


def test_readyz_is_503_naming_the_database_when_it_cannot_be_queried(tmp_path):
    from cloud_bridge.store.registry import Registry

    registry = Registry.open(tmp_path / "registry.db")
    with TestClient(create_app(registry, BridgeConfig(), TOKEN)) as client:
        registry.close()
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["problems"][0].startswith("database unreachable")


def test_the_grafana_dashboard_is_json_and_queries_only_exported_metrics(registry):
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/autoglm-edge-fleet.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bcloud_bridge_[a-z_]+", target["expr"])}
    _fleet(registry)
    metrics = _scrape(registry)
    exported = {sample.name for samples in metrics.values() for sample in samples}
    assert queried and queried <= exported, f"queried but not exported: {sorted(queried - exported)}"
