"""One dispatch pass over the registry with a fake publisher: what gets published, and when."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cloud_bridge.config import BridgeConfig
from cloud_bridge.link import PublishResult
from cloud_bridge.service import Dispatch

from .factories import T0, at, command, offline, online, reply


@dataclass
class FakePublisher:
    connected: bool = True
    sent: list[tuple[str, dict, int, int | None]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, qos: int, expiry_s: int | None = None) -> int | None:
        if not self.connected:
            return None
        self.sent.append((topic, json.loads(payload), qos, expiry_s))
        return len(self.sent)


def make(registry, qos: int = 1):
    config = BridgeConfig(mqtt={"topic_prefix": "P"}, dispatch={"resend_interval_s": 5, "qos": qos})
    publisher = FakePublisher()
    return Dispatch(registry, publisher, config), publisher


def test_a_queued_command_is_published_to_the_device_cmd_topic_with_its_expiry(registry):
    dispatch, publisher = make(registry, qos=2)
    registry.commands.add(command(expires_in_s=60), "dev-1", T0)
    assert dispatch.run_once(at(0.1)) == 1
    topic, payload, qos, expiry = publisher.sent[0]
    assert (topic, payload["id"], qos, expiry) == ("P/dev-1/cmd", "c1", 2, 60)
    assert registry.commands.get("c1").state == "sent"


def test_resends_carry_the_same_id_until_the_device_accepts(registry):
    dispatch, publisher = make(registry)
    registry.commands.add(command(), "dev-1", T0)
    registry.devices.record_status(online(), T0)
    for second in (0, 1, 5, 6, 10):
        dispatch.run_once(at(second))
    assert [p[1]["id"] for p in publisher.sent] == ["c1", "c1", "c1"]
    registry.replies.record(reply(1, "accepted"), at(11))
    dispatch.run_once(at(30))
    assert len(publisher.sent) == 3 and registry.commands.get("c1").attempts == 3


def test_nothing_is_published_while_disconnected_but_expiry_still_happens(registry):
    dispatch, publisher = make(registry)
    publisher.connected = False
    registry.commands.add(command(expires_in_s=10), "dev-1", T0)
    dispatch.run_once(at(1))
    assert publisher.sent == [] and registry.commands.get("c1").state == "pending"
    dispatch.run_once(at(10))
    assert registry.commands.get("c1").state == "expired"


def test_an_offline_device_gets_one_copy_until_it_returns(registry):
    dispatch, publisher = make(registry)
    registry.devices.record_status(offline(), T0)
    registry.commands.add(command(), "dev-1", T0)
    for second in (0, 10, 20):
        dispatch.run_once(at(second))
    assert len(publisher.sent) == 1
    registry.devices.record_status(online(), at(21))
    dispatch.run_once(at(21))
    assert len(publisher.sent) == 2


def test_broker_refusals_are_counted(registry):
    dispatch, publisher = make(registry)
    registry.commands.add(command(), "dev-1", T0)
    dispatch.run_once(at(0))
    dispatch.settle([PublishResult(mid=1, reason=0x87)])
    assert dispatch.stats.refused == 1


def test_a_group_command_is_published_once_on_the_group_topic_and_resent_until_each_member_accepts(registry):
    from cloud_bridge.commands import CommandRequest, DeviceFilter, send_to_many

    dispatch, publisher = make(registry)
    for device_id in ("gw-a", "gw-b"):
        registry.devices.record_status(online(device_id, groups=["lab"]), T0)
        registry.groups.add(device_id, "lab")
    send_to_many(registry, CommandRequest(target="any", kind="ping", id="g1"), DeviceFilter(group="lab"), T0)
    assert dispatch.run_once(at(0)) == 1
    assert [(t, p["id"], p["target"]) for t, p, _, _ in publisher.sent] == [("P/group/lab/cmd", "g1", "group/lab")]
    assert {registry.commands.get(f"g1.{d}").attempts for d in ("gw-a", "gw-b")} == {1}
    registry.replies.record(reply(1, "accepted", "g1", "gw-a"), at(1))
    dispatch.run_once(at(6))
    assert len(publisher.sent) == 2  # resent for gw-b, which has not accepted yet
    assert (registry.commands.get("g1.gw-a").attempts, registry.commands.get("g1.gw-b").attempts) == (1, 2)
    registry.replies.record(reply(1, "accepted", "g1", "gw-b"), at(7))
    dispatch.run_once(at(20))
    assert len(publisher.sent) == 2
