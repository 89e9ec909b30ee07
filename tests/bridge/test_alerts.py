"""Abnormal-device alerts: raised when a condition starts, cleared when it ends, on a real registry."""

from __future__ import annotations

import random
import statistics

from autoglm_wire.protocol import Telemetry, format_ts
from cloud_bridge.alerts import Facts, Progress, check_fleet, tokens_per_s_drop
from cloud_bridge.config import AlertConfig
from cloud_bridge.store.rows import DeviceRow

from .factories import T0, at, command, offline, online, reply

CONFIG = AlertConfig(offline_after_s=60, error_window=4, error_rate=0.5, outbox_depth_max=10, speed_window=5,
                     speed_recent=3, speed_min_samples=5)
DEVICE = DeviceRow(device_id="dev-1", state="online", since=None, last_seen=None, agent_version=None,
                   model_name=None, model_sha256=None, n_gpu_layers=None, groups=[], kinds=[], last_telemetry=None)


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
    _finish(registry, 6, "succeeded", tokens_per_s=40.0)
    _finish(registry, 1, "succeeded", tokens_per_s=10.0, start=6)
    assert check_fleet(registry, CONFIG, at(1)) == []  # one slow generation: the median of 3 is still 40
    _finish(registry, 1, "succeeded", tokens_per_s=10.0, start=7)
    assert check_fleet(registry, CONFIG, at(2)) == [("dev-1", "tokens_per_s_drop", True)]
    assert "10.0 tokens/s" in registry.alerts.recent()[0].message
    _finish(registry, 3, "succeeded", tokens_per_s=39.0, start=8)
    assert check_fleet(registry, CONFIG, at(3)) == [("dev-1", "tokens_per_s_drop", False)]


def test_the_speed_alert_waits_for_speed_min_samples_of_baseline():
    assert tokens_per_s_drop(Facts(DEVICE, [], [5.0] * 3 + [40.0] * 4), T0, CONFIG) is None  # 4 < 5 before them
    assert tokens_per_s_drop(Facts(DEVICE, [], [5.0] * 3 + [40.0] * 5), T0, CONFIG) is not None
    assert tokens_per_s_drop(Facts(DEVICE, [], [5.0] * 2 + [40.0] * 5), T0, CONFIG) is None  # 2 < speed_recent


def test_the_speed_alert_has_hysteresis_raise_below_half_clear_above_three_quarters():
    between = [25.0] * 3 + [40.0] * 5  # 25 tokens/s against 40: above the raise line (20), below the clear line (30)
    assert tokens_per_s_drop(Facts(DEVICE, [], between), T0, CONFIG) is None
    assert tokens_per_s_drop(Facts(DEVICE, [], between, frozenset({"tokens_per_s_drop"})), T0, CONFIG) is not None
    back = [31.0] * 3 + [40.0] * 5
    assert tokens_per_s_drop(Facts(DEVICE, [], back, frozenset({"tokens_per_s_drop"})), T0, CONFIG) is None


def test_a_noisy_but_healthy_device_never_raises_the_speed_alert(registry):
    """200 generations at 40 tokens/s +-30 %, one in ten a lone outlier at 15: no alert, no flapping."""
    noise = random.Random(7)
    registry.devices.record_status(online(), T0)
    speeds = [15.0 if i % 10 == 9 else 40.0 * (1 + noise.uniform(-0.3, 0.3)) for i in range(200)]
    changes = []
    for i, speed in enumerate(speeds):
        _finish(registry, 1, "succeeded", tokens_per_s=speed, start=i)
        changes += [c for c in check_fleet(registry, CONFIG, at(i)) if c[1] == "tokens_per_s_drop"]
    assert changes == []
    # the data would trip a rule on the latest generation alone (below half the median of the 10 before it)
    assert any(speeds[i] < 0.5 * statistics.median(speeds[i - 10:i]) for i in range(10, 200))


def test_the_error_rate_counts_device_failures_not_expiries_rejections_or_cancellations(registry):
    registry.devices.record_status(online(), T0)
    _finish(registry, 1, "failed")
    _finish(registry, 1, "succeeded", start=1)
    for i in range(2, 5):
        registry.commands.add(command(f"c{i}"), "dev-1", T0)
        registry.commands.mark_expired(f"c{i}", "no accepted before expires_at", at(1))
    for i in range(5, 7):  # a client's retry with a used id, rejected by the device
        registry.commands.add(command(f"c{i}"), "dev-1", T0)
        registry.replies.record(reply(i + 1, "rejected", f"c{i}", error={"code": "invalid_command",
                                                                         "message": "duplicate id"}), T0)
    assert [c for c in check_fleet(registry, CONFIG, at(2)) if c[1] == "error_rate"] == []
    _finish(registry, 2, "failed", start=7)
    assert ("dev-1", "error_rate", True) in check_fleet(registry, CONFIG, at(3))
    assert "3 of its last 4 finished commands failed" in registry.alerts.recent()[0].message


def test_with_progress_a_check_reads_the_replies_of_the_devices_that_answered_since_and_alerts_as_in_full(
        registry, monkeypatch):
    for device_id in ("dev-1", "dev-2"):
        registry.devices.record_status(online(device_id), T0)
    asked: list[list[str]] = []
    outcomes_of = registry.commands.outcomes_of
    monkeypatch.setattr(registry.commands, "outcomes_of", lambda ids, n: asked.append(ids) or outcomes_of(ids, n))
    progress = Progress()
    assert check_fleet(registry, CONFIG, at(1), progress) == [] and asked[-1] == ["dev-1", "dev-2"]  # the first: all
    assert check_fleet(registry, CONFIG, at(2), progress) == [] and asked[-1] == []
    _finish(registry, 3, "failed")
    _finish(registry, 1, "succeeded", start=3)
    assert check_fleet(registry, CONFIG, at(3), progress) == [("dev-1", "error_rate", True)]
    assert asked[-1] == ["dev-1"]
    assert check_fleet(registry, CONFIG, at(4), progress) == [] and asked[-1] == ["dev-1"]  # one check of overlap
    assert check_fleet(registry, CONFIG, at(5), progress) == [] and asked[-1] == []
    _finish(registry, 3, "succeeded", start=4)
    assert check_fleet(registry, CONFIG, at(6), progress) == [("dev-1", "error_rate", False)]
    registry.devices.record_status(offline("dev-2"), at(6))
    assert check_fleet(registry, CONFIG, at(100), progress) == [("dev-2", "offline", True)]  # row checks: every device
