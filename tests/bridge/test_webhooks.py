"""Alert notifications against a real local HTTP receiver that fails, then recovers: queued with the
alert change, retried in rounds with backoff, delivered at least once, logged, given up on at last."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from autoglm_wire.protocol import Status
from cloud_bridge.alerts import check_fleet
from cloud_bridge.cli import main
from cloud_bridge.config import AlertConfig, BridgeConfig
from cloud_bridge.http.app import create_app
from cloud_bridge.store.registry import Registry
from cloud_bridge.webhooks import deliver_due

from .conftest import free_port
from .factories import T0, at, online
from .http_receiver import Receiver

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
def receiver(request) -> Iterator[Receiver]:
    server = Receiver(getattr(request, "param", 0))
    yield server
    server.close()


def _config(*urls_formats: tuple[str, str], attempts: int = 2) -> AlertConfig:
    return AlertConfig(offline_after_s=60, webhooks=[{"url": u, "format": f} for u, f in urls_formats],
                       webhook_attempts=attempts, webhook_backoff_s=0.001, webhook_backoff_max_s=0.002,
                       webhook_retry_after_s=30, webhook_give_up_after_s=3600)


def _go_offline(registry: Registry, config: AlertConfig) -> None:
    registry.devices.record_status(online("dev-1"), T0)
    registry.devices.record_status(Status(device_id="dev-1", state="offline"), at(1))
    assert check_fleet(registry, config, at(100)) == [("dev-1", "offline", True)]


@pytest.mark.parametrize("receiver", [3], indirect=True)
def test_a_failing_receiver_gets_the_alert_once_it_recovers_and_the_log_says_how(registry, receiver):
    config = _config((receiver.url, "alertmanager"))
    _go_offline(registry, config)
    assert deliver_due(registry, config, at(100)) == 0  # round 1: two 500s
    (row,) = registry.deliveries.recent()
    assert (row.state, row.attempts, row.event) == ("pending", 2, "raised")
    assert "500" in row.last_error
    assert deliver_due(registry, config, at(110)) == 0  # not due before webhook_retry_after_s
    assert receiver.posts == 2
    assert deliver_due(registry, config, at(130)) == 1  # round 2: a 500, then accepted
    (row,) = registry.deliveries.recent()
    assert (row.state, row.attempts, row.last_error) == ("delivered", 4, None)
    (body,) = receiver.accepted
    assert body["version"] == "4" and body["status"] == "firing"
    (alert,) = body["alerts"]
    assert alert["labels"] == {"alertname": "offline", "device": "dev-1", "service": "cloud-bridge"}
    assert alert["endsAt"] == "0001-01-01T00:00:00Z" and "offline for" in alert["annotations"]["summary"]
    assert deliver_due(registry, config, at(200)) == 0  # delivered once, not again


def test_raised_and_cleared_go_to_every_webhook_in_its_format(registry, receiver):
    config = _config((receiver.url, "alertmanager"), (receiver.url + "?generic", "json"))
    _go_offline(registry, config)
    registry.devices.record_status(online("dev-1"), at(150))
    assert check_fleet(registry, config, at(160)) == [("dev-1", "offline", False)]
    assert deliver_due(registry, config, at(160)) == 4
    firing, generic_raised, resolved, generic_cleared = receiver.accepted
    assert firing["status"] == "firing" and resolved["status"] == "resolved"
    assert resolved["alerts"][0]["endsAt"] == registry.alerts.latest("dev-1", "offline").cleared_at
    assert generic_raised["event"] == "raised" and generic_cleared["event"] == "cleared"
    assert generic_cleared["alert"]["kind"] == "offline" and generic_cleared["alert"]["cleared_at"]


def test_an_unreachable_receiver_stays_pending_until_give_up_then_failed(registry):
    config = _config((f"http://127.0.0.1:{free_port()}/nobody", "json"))
    _go_offline(registry, config)
    assert deliver_due(registry, config, at(100)) == 0
    assert registry.deliveries.recent()[0].state == "pending"
    assert "URLError" in registry.deliveries.recent()[0].last_error
    assert deliver_due(registry, config, at(100) + timedelta(hours=2)) == 0
    (row,) = registry.deliveries.recent()
    assert (row.state, row.attempts) == ("failed", 4)


def test_a_claimed_delivery_is_not_sent_by_a_second_replica(registry, receiver):
    config = _config((receiver.url, "json"))
    _go_offline(registry, config)
    (row,) = registry.deliveries.due(at(100))
    assert registry.deliveries.claim(row, at(130))
    assert not registry.deliveries.claim(row, at(130))  # the other replica read the same row
    assert deliver_due(registry, config, at(100)) == 0 and receiver.posts == 0


def test_the_delivery_log_is_in_the_api_and_the_cli(tmp_path: Path, receiver, capsys):
    registry = Registry.open(tmp_path / "registry.db")
    config = _config((receiver.url, "json"))
    _go_offline(registry, config)
    deliver_due(registry, config, at(100))
    with TestClient(create_app(registry, BridgeConfig(), TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        (row,) = c.get("/api/alert-deliveries").json()
    assert (row["state"], row["webhook"], row["event"]) == ("delivered", receiver.url, "raised")
    registry.close()
    path = tmp_path / "bridge.toml"
    path.write_text('[store]\npath = "registry.db"\n')
    assert main(["alerts", "--config", str(path), "--deliveries"]) == 0
    out = capsys.readouterr().out
    assert "delivered" in out and receiver.url in out
