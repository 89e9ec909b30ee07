"""Devices in the registry: status, last will, retained replays, telemetry and events."""

from __future__ import annotations

import pytest

from autoglm_wire.protocol import Event, Status, Telemetry, format_ts
from cloud_bridge.store.devices import DeviceQuery

from .factories import T0, at, offline, online


def test_an_online_status_records_the_device_identity(registry):
    assert registry.devices.record_status(online(groups=["lab"]), at(1))
    device = registry.devices.get("dev-1")
    assert (device.state, device.since, device.last_seen) == ("online", format_ts(at(1)), format_ts(at(1)))
    assert (device.model_name, device.model_sha256, device.n_gpu_layers) == ("glm-4-tiny", "ab" * 32, 0)
    assert device.claimed_groups == ["lab"] and "chat" in device.kinds and device.agent_version == "0.1.0"
    assert device.groups == [] and device.routable_groups == []  # membership is the registry's, not the claim


def test_the_last_will_marks_the_device_offline_and_keeps_its_identity(registry):
    registry.devices.record_status(online(), at(1))
    assert registry.devices.record_status(offline(), at(5))
    device = registry.devices.get("dev-1")
    assert (device.state, device.since, device.model_name) == ("offline", format_ts(at(5)), "glm-4-tiny")
    assert device.last_seen == format_ts(at(1))


def test_a_repeated_status_is_not_a_state_change(registry):
    registry.devices.record_status(online(), at(1))
    assert not registry.devices.record_status(online(), at(2))
    assert registry.devices.get("dev-1").since == format_ts(at(1))
    assert [c.state for c in registry.feeds.device_states(0)] == ["online"]


def test_a_retained_status_replay_is_not_counted_as_seeing_the_device(registry):
    registry.devices.record_status(online(), at(100), retained=True)
    device = registry.devices.get("dev-1")
    assert device.last_seen is None and device.since == format_ts(T0)


def test_telemetry_and_events_are_kept(registry):
    telemetry = Telemetry(device_id="dev-1", ts=format_ts(T0), queue_depth=1, outbox_depth=0, outbox_bytes=0,
                          tokens_per_s_ewma=12.5, rss_mb=300.0, gpu_layers=0, uptime_s=5.0)
    registry.devices.record_telemetry(telemetry, at(1))
    registry.events.record(Event(device_id="dev-1", ts=format_ts(T0), level="warning", code="disk_low",
                                message="5% free", data={"free": 5}), at(1))
    assert registry.devices.get("dev-1").last_telemetry["tokens_per_s_ewma"] == 12.5
    assert [(e.code, e.data) for e in registry.feeds.events(0)] == [("disk_low", {"free": 5})]


def _status(state: str, seconds: float, model_name: str = "glm-4-tiny") -> Status:
    status = online() if state == "online" else offline()
    return status.model_copy(update={"ts": format_ts(at(seconds)),
                                     "model": status.model and status.model.model_copy(update={"name": model_name})})


def test_a_status_older_than_the_one_applied_is_a_replay_and_changes_nothing(registry):
    """Issue #13: a lagging or restarted replica replays old statuses; they must not flap the device."""
    assert registry.devices.record_status(_status("online", 10, "glm-new"), at(10))
    assert not registry.devices.record_status(_status("offline", 5), at(11))
    assert not registry.devices.record_status(_status("online", 1, "glm-old"), at(12), retained=True)
    device = registry.devices.get("dev-1")
    assert (device.state, device.model_name, device.status_ts) == ("online", "glm-new", format_ts(at(10)))
    assert [c.state for c in registry.feeds.device_states(0)] == ["online"]
    assert registry.devices.record_status(_status("offline", 20), at(21)), "a newer status still applies"
    assert registry.devices.get("dev-1").state == "offline"


def test_a_status_without_ts_cannot_be_ordered_and_applies_as_it_comes(registry):
    registry.devices.record_status(_status("online", 10), at(10))
    assert registry.devices.record_status(offline(), at(11))  # the last will carries no ts
    assert registry.devices.record_status(_status("online", 12), at(12))
    assert [c.state for c in registry.feeds.device_states(0)] == ["online", "offline", "online"]


def test_a_redelivered_event_is_stored_once(registry):
    """Issue #13: events get a dedupe key; a broker redelivery (or a second replica) stores it once."""
    event = Event(device_id="dev-1", ts=format_ts(T0), level="info", code="tick", message="once", data={"n": 1})
    assert registry.events.record(event, at(1))
    assert not registry.events.record(event, at(2))
    assert registry.events.record(event.model_copy(update={"data": {"n": 2}}), at(3)), "another payload, another event"
    assert [e.data for e in registry.feeds.events(0)] == [{"n": 1}, {"n": 2}]
    assert registry.counters.all()["duplicate_events"] == 1


def _numbered_fleet(registry, n: int) -> None:
    for i in range(n):
        status = online(f"gw-{i:03d}").model_copy(update={"groups": ["lab" if i % 2 else "Lab"]})
        if i % 3 == 0:
            status = status.model_copy(update={"model": status.model.model_copy(update={"name": "glm-big",
                                                                                         "sha256": "cd" * 32})})
        registry.devices.record_status(status, T0)
        registry.groups.add(status.device_id, status.groups[0], T0)  # assigned as announced
    for i in range(0, n, 5):
        registry.devices.record_status(offline(f"gw-{i:03d}"), T0)


def test_a_page_of_devices_is_filtered_and_counted_in_sql(registry):
    _numbered_fleet(registry, 30)
    rows, total = registry.devices.page(DeviceQuery(limit=10, offset=25))
    assert total == 30 and [d.device_id for d in rows] == [f"gw-{i:03d}" for i in range(25, 30)]
    rows, total = registry.devices.page(DeviceQuery(state="offline"))
    assert total == 6 and all(d.state == "offline" for d in rows)
    rows, total = registry.devices.page(DeviceQuery(group="lab"))  # case-sensitive on both backends
    assert total == 15 and all(int(d.device_id[3:]) % 2 and d.groups == ["lab"] for d in rows)
    assert registry.devices.page(DeviceQuery(model="glm-big"))[1] == 10
    assert registry.devices.page(DeviceQuery(model="cdcd"))[1] == 10  # a sha256 prefix
    assert registry.devices.page(DeviceQuery(model="glm-4-tiny", state="online", group="Lab"))[1] == 8
    rows, total = registry.devices.page(DeviceQuery(q="W-01"))
    assert total == 10 and rows[0].device_id == "gw-010"


def test_a_device_query_takes_like_wildcards_literally(registry):
    registry.devices.record_status(online("gw_1"), T0)
    registry.devices.record_status(online("gwx1"), T0)
    assert [d.device_id for d in registry.devices.page(DeviceQuery(q="w_"))[0]] == ["gw_1"]
    assert registry.devices.page(DeviceQuery(q="%"))[1] == 0
    with pytest.raises(ValueError, match="limit must be"):
        registry.devices.page(DeviceQuery(limit=1001))
