"""Retention: what `prune` deletes, in batches, and what it keeps."""

from __future__ import annotations

import pytest

from autoglm_wire.protocol import Event, format_ts
from cloud_bridge.errors import UnknownCommand
from cloud_bridge.store.rollouts import RolloutRow, UnknownRollout

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
                       "alert_deliveries": 1, "rollout_devices": 0, "rollouts": 0}
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


def _rollout(registry, rollout_id: str, state: str, devices: list[str], seconds: float,
             settled_at: float | None = None) -> None:
    """A rollout in `state` since at(`seconds`), its devices settled `activated` at(`settled_at`) (None: not yet)."""
    ts = format_ts(at(seconds))
    registry.rollouts.create(RolloutRow(id=rollout_id, model_name="glm", model_sha256="0" * 64, target="group/lab",
                                        waves=[100], max_failures=0, canary=None, state=state, wave=0, reason=None,
                                        created_at=ts, updated_at=ts), [devices], at(seconds))
    for device_id in devices if settled_at is not None else []:
        registry.rollouts.settle(rollout_id, device_id, "activated", None, None, at(settled_at))


def test_prune_deletes_finished_rollouts_and_keeps_those_still_at_work(registry):
    _rollout(registry, "old-done", "completed", ["dev-1", "dev-2"], 0, settled_at=0)
    _rollout(registry, "old-running", "running", ["dev-1"], 0, settled_at=0)
    _rollout(registry, "old-aborted-under-way", "aborted", ["dev-1"], 0)  # its device's deploy not settled
    _rollout(registry, "old-settled-late", "completed", ["dev-1"], 0, settled_at=80)
    _rollout(registry, "old-rolling-back", "rolled_back", ["dev-1", "dev-2"], 0, settled_at=0)
    registry.rollouts.want_rollback("old-rolling-back", now=at(1))
    for device_id in ("dev-1", "dev-2"):  # one rollback went out, the other is still to come back
        registry.rollouts.mark_rollback("old-rolling-back", device_id, "wanted", "queued", now=at(2))
    registry.rollouts.mark_rollback("old-rolling-back", "dev-1", "queued", "done", now=at(3))
    _rollout(registry, "new-done", "completed", ["dev-1"], 100, settled_at=100)

    deleted = registry.retention.prune(before=at(50), chunks_before=None, batch=1)

    assert (deleted["rollout_devices"], deleted["rollouts"]) == (2, 1)
    with pytest.raises(UnknownRollout):
        registry.rollouts.get("old-done")
    assert registry.rollouts.devices("old-done") == []
    for kept in ("old-running", "old-aborted-under-way", "old-settled-late", "old-rolling-back", "new-done"):
        assert registry.rollouts.devices(kept), kept
        assert registry.rollouts.get(kept).id == kept
    registry.rollouts.mark_rollback("old-rolling-back", "dev-2", "queued", "done", now=at(4))
    assert registry.retention.prune(before=at(50), chunks_before=None)["rollouts"] == 1, "its rollbacks ended"


def test_prune_works_in_batches_until_nothing_old_is_left(registry):
    for n in range(7):
        registry.events.record(_event(n), at(n))
    assert registry.retention.prune(before=at(5), chunks_before=None, batch=2) == {
        "commands": 0, "replies": 0, "events": 5, "alerts": 0, "device_states": 0,
        "alert_deliveries": 0, "rollout_devices": 0, "rollouts": 0}
    assert [e.message for e in registry.feeds.events(0)] == ["tick 5", "tick 6"]


def test_prune_with_no_cutoffs_deletes_nothing(registry):
    registry.events.record(_event(0), at(0))
    assert registry.retention.prune(before=None, chunks_before=None) == {}
    assert len(registry.feeds.events(0)) == 1
