"""`/api/stats` and `cloud-bridge stats` on both stores: known replies, exact percentile_cont values,
the device failure rate leaving out rejections, expiries and replies outside the window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud_bridge.cli import EXIT_USAGE, main
from cloud_bridge.config import BridgeConfig
from cloud_bridge.errors import InvalidRequest
from cloud_bridge.http.app import create_app
from cloud_bridge.stats import fleet_stats, window_seconds
from cloud_bridge.store.registry import Registry

from .factories import at, command, online, reply

TOKEN = "test-token-0123456789abcdef"
NOW = at(3600)
FAILED = {"code": "model_error", "message": "llama.cpp failed"}


def _history(registry: Registry) -> None:
    """dev-1: five chats (total 100..500 ms) and one failure; dev-2: two pings (queue 10, 30 ms), one
    rejection, one expiry; one chat before the window."""
    for device_id in ("dev-1", "dev-2"):
        registry.devices.record_status(online(device_id), at(0))
    seq = 0
    for i, total_ms in enumerate((300.0, 100.0, 500.0, 200.0, 400.0)):
        registry.commands.add(command(f"chat-{i}", kind="chat", params={"prompt": "hi"}), "dev-1", at(0))
        seq += 1
        registry.replies.record(reply(seq, "succeeded", command_id=f"chat-{i}", output={"text": "x"},
                                      metrics={"total_ms": total_ms, "ttft_ms": total_ms / 10,
                                               "tokens_per_s": 10.0 + i}), at(10 + i))
    registry.commands.add(command("chat-fail", kind="chat", params={"prompt": "hi"}), "dev-1", at(0))
    registry.replies.record(reply(seq + 1, "failed", command_id="chat-fail", error=FAILED), at(20))
    registry.commands.add(command("chat-old", kind="chat", params={"prompt": "hi"}), "dev-1", at(-100))
    registry.replies.record(reply(seq + 2, "failed", command_id="chat-old", error=FAILED,
                                  metrics={"total_ms": 99999.0}), at(-10))
    for i, queue_ms in enumerate((30.0, 10.0), start=1):
        registry.commands.add(command(f"ping-{i}", device_id="dev-2"), "dev-2", at(0))
        registry.replies.record(reply(i, "succeeded", command_id=f"ping-{i}", device_id="dev-2",
                                      output={"pong": True}, metrics={"queue_ms": queue_ms}), at(30))
    registry.commands.add(command("ping-bad", device_id="dev-2"), "dev-2", at(0))
    registry.replies.record(reply(3, "rejected", command_id="ping-bad", device_id="dev-2",
                                  error={"code": "invalid_command", "message": "no"}), at(31))
    registry.commands.add(command("ping-late", device_id="dev-2"), "dev-2", at(0))
    registry.commands.mark_expired("ping-late", "no accepted before expires_at", at(40))


def test_percentiles_are_percentile_cont_on_both_databases_by_device(registry):
    _history(registry)
    result = fleet_stats(registry, "1h", "device", NOW)
    dev1, dev2 = result.groups
    assert (dev1.group, dev1.count, dev1.failed) == ("dev-1", 6, 1)
    assert dev1.error_rate == pytest.approx(1 / 6)
    assert dev1.total_ms.p50 == pytest.approx(300.0)
    assert dev1.total_ms.p95 == pytest.approx(480.0)  # rank 3.8: 400 + 0.8 * 100
    assert dev1.total_ms.p99 == pytest.approx(496.0)
    assert dev1.ttft_ms.p95 == pytest.approx(48.0)
    assert dev1.tokens_per_s.p50 == pytest.approx(12.0)
    assert dev1.queue_ms.p50 is None
    assert (dev2.group, dev2.count, dev2.failed, dev2.error_rate) == ("dev-2", 2, 0, 0.0)
    assert (dev2.queue_ms.p50, dev2.queue_ms.p95, dev2.queue_ms.p99) == pytest.approx((20.0, 29.0, 29.8))


def test_by_kind_and_by_model(registry):
    _history(registry)
    by_kind = {g.group: g for g in fleet_stats(registry, "1h", "kind", NOW).groups}
    assert {name: g.count for name, g in by_kind.items()} == {"chat": 6, "ping": 2}
    (model,) = fleet_stats(registry, "1h", "model", NOW).groups
    assert (model.group, model.count, model.failed) == ("glm-4-tiny", 8, 1)
    assert model.total_ms.p50 == pytest.approx(300.0)


def test_a_window_before_the_replies_is_empty_and_a_bad_window_says_the_format(registry):
    _history(registry)
    assert fleet_stats(registry, "10m", "device", at(7200)).groups == []
    assert window_seconds("1.5h") == 5400
    with pytest.raises(InvalidRequest, match="15m, 1h, 7d"):
        window_seconds("an hour")


def test_api_stats_answers_json_and_400_for_a_bad_window(registry):
    _history(registry)
    app = create_app(registry, BridgeConfig(), TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        body = client.get("/api/stats", params={"window": "3650d", "group_by": "kind"}).json()
        assert body["group_by"] == "kind" and [g["group"] for g in body["groups"]] == ["chat", "ping"]
        assert body["groups"][0]["count"] == 7  # the reply before the 1h window is inside 10 years
        bad = client.get("/api/stats", params={"window": "soon"})
        assert bad.status_code == 400 and "15m, 1h, 7d" in bad.json()["error"]["message"]
        assert client.get("/api/stats", params={"group_by": "colour"}).status_code == 400


def test_cli_stats_prints_a_table_and_json(tmp_path: Path, capsys):
    registry = Registry.open(tmp_path / "registry.db")
    _history(registry)
    registry.close()
    config = tmp_path / "bridge.toml"
    config.write_text('[store]\npath = "registry.db"\n')
    assert main(["stats", "--config", str(config), "--window", "3650d", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert [(g["group"], g["count"]) for g in groups] == [("dev-1", 7), ("dev-2", 2)]
    assert main(["stats", "--config", str(config), "--window", "3650d", "--group-by", "kind"]) == 0
    table = capsys.readouterr().out
    assert "ping" in table and "20/29/30" in table  # queue ms p50/95/99 of the pings
    assert main(["stats", "--config", str(config), "--window", "soon"]) == EXIT_USAGE
    assert "15m, 1h, 7d" in capsys.readouterr().err
