"""Abnormal-device alerts: raised when a condition starts, cleared when it ends, on a real registry."""

from __future__ import annotations

from autoglm_wire.protocol import Telemetry, format_ts
from cloud_bridge.alerts import check_fleet
from cloud_bridge.config import AlertConfig

from .factories import T0, at, command, offline, online, reply

CONFIG = AlertConfig(offline_after_s=60, error_window=4, error_rate=0.5, outbox_depth_max=10, speed_window=3)


def _telemetry(outbox_depth: int) -> Telemetry:
    return Telemetry(device_id="dev-1", ts=format_ts(T0), queue_depth=0, outbox_depth=outbox_depth, outbox_bytes=0,
                     tokens_per_s_ewma=None, rss_mb=1.0, gpu_layers=0, uptime_s=1.0)


def _finish(registry, n: int, status: str, tokens_per_s: float = 10.0, start: int = 0) -> None:
    for i in range(start, start + n):
        registry.commands.add(command(f"c{i}"), "dev-1", T0)
        error = None if status == "succeeded" else {"code": "model_error", "message": "boom"}
        registry.replies.record(reply(i + 1, status, f"c{i}", error=error, metrics={"tokens_per_s": tokens_per_s}), T0)


def test_a_device_offline_longer_than_the_threshold_raises_an_alert_cleared_when_it_returns(registry):
    registry.devices.record_status(offline(), T0)
    assert check_fleet(registry, CONFIG, at(30)) == []
    assert check_fleet(registry, CONFIG, at(61)) == [("dev-1", "offline", True)]
    assert check_fleet(registry, CONFIG, at(120)) == []  # one open alert per condition
    assert "offline for" in registry.alerts.recent()[0].message
    registry.devices.record_status(online(), at(130))
    assert check_fleet(registry, CONFIG, at(131)) == [("dev-1", "offline", False)]
    assert registry.alerts.recent() == [] and registry.alerts.recent(open_only=False)[0].cleared_at is not None


def test_an_error_rate_over_the_threshold_raises_an_alert_until_successes_bring_it_down(registry):
    registry.devices.record_status(online(), T0)
    _finish(registry, 3, "failed")
    _finish(registry, 1, "succeeded", start=3)
    assert ("dev-1", "error_rate", True) in check_fleet(registry, CONFIG, at(1))
    _finish(registry, 3, "succeeded", start=4)
    assert ("dev-1", "error_rate", False) in check_fleet(registry, CONFIG, at(2))


def test_an_outbox_that_keeps_growing_while_online_raises_an_alert(registry):
    registry.devices.record_status(online(), T0)
    registry.devices.record_telemetry(_telemetry(50), T0)
    assert check_fleet(registry, CONFIG, at(1)) == [("dev-1", "outbox_growing", True)]
    registry.devices.record_telemetry(_telemetry(0), T0)
    assert check_fleet(registry, CONFIG, at(2)) == [("dev-1", "outbox_growing", False)]


def test_a_drop_in_decode_speed_raises_an_alert_that_clears_when_speed_recovers(registry):
    registry.devices.record_status(online(), T0)
    _finish(registry, 3, "succeeded", tokens_per_s=40.0)
    _finish(registry, 1, "succeeded", tokens_per_s=10.0, start=3)
    assert check_fleet(registry, CONFIG, at(1)) == [("dev-1", "tokens_per_s_drop", True)]
    assert "10.0 tokens/s" in registry.alerts.recent()[0].message
    _finish(registry, 1, "succeeded", tokens_per_s=39.0, start=4)
    assert check_fleet(registry, CONFIG, at(2)) == [("dev-1", "tokens_per_s_drop", False)]
