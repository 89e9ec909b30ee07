"""Retention: what `prune` deletes, in batches, and what it keeps."""

from __future__ import annotations

import pytest

from autoglm_wire.protocol import Event, format_ts
from cloud_bridge.errors import UnknownCommand

from .factories import T0, at, chunk, command, online, reply


def _event(n: int) -> Event:
    return Event(device_id="dev-1", ts=format_ts(T0), level="info", code="tick", message=f"tick {n}", data={})


def test_prune_deletes_what_is_finished_and_old_and_keeps_what_is_active_or_recent(registry):
    registry.devices.record_status(online(), at(0))
    registry.commands.add(command("old-done"), "dev-1", T0)
    registry.replies.record(reply(1, "accepted", "old-done"), at(1))
    registry.replies.record(reply(2, "succeeded", "old-done", output={"pong": True}), at(2))
    registry.commands.add(command("old-running"), "dev-1", T0)
    registry.replies.record(reply(3, "running", "old-running"), at(3))
    registry.chunks.record("dev-1", chunk(0, "partial", "old-running"), at(4))
    registry.events.record(_event(0), at(5))
    registry.alerts.open("dev-1", "offline", "gone", at(6))
    registry.alerts.clear("dev-1", "offline", at(7))
    registry.alerts.open("dev-1", "error_rate", "still failing", at(8))
    registry.deliveries.enqueue(1, "raised", "http://hook", "json", "{}", at(6))
    registry.deliveries.finish(1, 1, None, "delivered", at(6))
    registry.deliveries.enqueue(1, "cleared", "http://hook", "json", "{}", at(7))  # still pending: kept
    registry.commands.add(command("new-done"), "dev-1", at(100))
    registry.replies.record(reply(4, "succeeded", "new-done", output={"pong": True}), at(101))
    registry.chunks.record("dev-1", chunk(0, "fresh", "new-done"), at(101))

    deleted = registry.retention.prune(before=at(50), chunks_before=at(50))

    assert deleted == {"stream_chunks": 1, "commands": 1, "replies": 2, "events": 1, "alerts": 1, "device_states": 1,
                       "alert_deliveries": 1}
    assert [d.event for d in registry.deliveries.recent()] == ["cleared"]
    with pytest.raises(UnknownCommand):
        registry.commands.get("old-done")
    assert registry.commands.get("old-running").state == "running"
    assert [r.seq for r in registry.replies.of_command("old-running")] == [3], "an active command keeps its replies"
    assert registry.commands.get("new-done").state == "succeeded"
    assert [r.seq for r in registry.replies.of_command("new-done")] == [4]
    assert [c.delta for c in registry.chunks.of_command("new-done")] == ["fresh"]
    assert registry.devices.get("dev-1").state == "online", "the device's current state is not history"
    assert registry.retention.prune(before=at(50), chunks_before=at(50)) == dict.fromkeys(deleted, 0)


def test_prune_works_in_batches_until_nothing_old_is_left(registry):
    for n in range(7):
        registry.events.record(_event(n), at(n))
    assert registry.retention.prune(before=at(5), chunks_before=None, batch=2) == {
        "commands": 0, "replies": 0, "events": 5, "alerts": 0, "device_states": 0,
        "alert_deliveries": 0}
    assert [e.message for e in registry.feeds.events(0)] == ["tick 5", "tick 6"]


def test_prune_with_no_cutoffs_deletes_nothing(registry):
    registry.events.record(_event(0), at(0))
    assert registry.retention.prune(before=None, chunks_before=None) == {}
    assert len(registry.feeds.events(0)) == 1
