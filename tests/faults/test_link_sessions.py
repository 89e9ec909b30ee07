"""The link on its own (no agent process, an in-memory outbox) against a real broker behind the
chaos proxy: what happens across its sessions.

- A command that cannot be stored stays unacknowledged; the others are served meanwhile; the link
  reconnects, the broker redelivers it (dup), and once it is stored the spell ends.
- Rows in flight when the link is cut are re-sent by paho after the next CONNACK; newer rows must
  not overtake them (the cloud sees every seq, in order).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from autoglm_wire.mqtt_session import BrokerOptions
from autoglm_wire.topics import DeviceTopics
from edge_agent import link as link_module
from edge_agent.link import InboundMessage, Link, LinkOptions
from edge_agent.outbox import MemoryOutbox, ReplyDraft
from edge_agent.sqlite_file import StoreFull
from tests.faults.chaos import ChaosProxy
from tests.support.broker import Broker
from tests.support.cloud import CloudClient

pytestmark = pytest.mark.integration

RESEND_DELAY_S = 0.5


class SlowToResendLink(Link):
    """paho re-sends the rows in flight after `on_connect` returns, on the network thread; a pump
    woken by `on_connect` races it. Sleeping at the end of `on_connect` (on reconnects) makes the
    pump win that race every time instead of now and then."""

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        super()._on_connect(client, *args)
        if self.stats.connects > 1:
            time.sleep(RESEND_DELAY_S)


@pytest.fixture
def cloud(fault_broker: Broker) -> Iterator[CloudClient]:
    client = CloudClient(fault_broker.port, client_id=f"cloud-{uuid.uuid4().hex[:8]}")
    yield client
    client.close()


def make_link(proxy: ChaosProxy, device_id: str, on_command: Any, link_class: type[Link] = Link) -> Link:
    topics = DeviceTopics("autoglm", device_id)
    broker = BrokerOptions(host="127.0.0.1", port=proxy.port, client_id=device_id, keepalive=5, session_expiry_s=3600,
                           backoff_initial_s=0.2, backoff_multiplier=2.0, backoff_max_s=1.0)
    return link_class(options=LinkOptions(broker=broker, will_delay_s=5, inflight_window=20),
                      subscriptions=[topics.cmd], outbox=MemoryOutbox(topics), sync_to_disk=lambda: None,
                      on_command=on_command, status_topic=topics.status, status_payload=lambda: b'{"state":"online"}',
                      offline_payload=b'{"state":"offline"}', event_topic=topics.event,
                      event_payload=lambda level, code, message, data: f'{{"code":"{code}"}}'.encode())


def test_an_unstorable_command_is_redelivered_after_a_reconnect_while_the_others_are_served(
        proxy: ChaosProxy, cloud: CloudClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "REDELIVERY_INITIAL_S", 1.0)
    device = f"gw-{uuid.uuid4().hex[:8]}"
    stored: list[tuple[bytes, bool]] = []
    tries = {"unstorable": 0}
    lock = threading.Lock()

    def on_command(message: InboundMessage) -> None:
        with lock:
            if message.payload == b"unstorable":
                tries["unstorable"] += 1
                if tries["unstorable"] <= 2:
                    raise StoreFull("the disk holding edge.db is full")
            stored.append((message.payload, message.duplicate_delivery))

    link = make_link(proxy, device, on_command)
    link.start()
    try:
        assert link.wait_connected(10)
        cloud.wait_for(lambda: cloud.count("status") > 0, 10, "the link online")
        cloud.client.publish(f"autoglm/{device}/cmd", b"unstorable", qos=1)
        for n in range(5):
            cloud.client.publish(f"autoglm/{device}/cmd", f"ok {n}".encode(), qos=1)
        cloud.wait_for(lambda: len(stored) >= 5, 10, "the storable commands served")
        assert [p for p, _ in stored[:5]] == [f"ok {n}".encode() for n in range(5)]
        cloud.wait_for(lambda: (b"unstorable", True) in stored, 30, "the unstorable one redelivered and stored")
        assert tries["unstorable"] == 3
        assert link.stats.connects == 3, "one reconnect per failed delivery"
        assert [p for p, _ in stored].count(b"ok 0") == 1, "acknowledged commands are not redelivered"
        assert link.redelivery.counters() == {"unacked": 0, "attempts": 0, "failed_deliveries": 2}
        cloud.wait_for(lambda: [e["code"] for e in cloud.on("/event")] == ["redelivery_backoff",
                                                                          "redelivery_recovered"], 10, "both Events")
    finally:
        link.stop(drain_timeout_s=1.0)


@pytest.mark.parametrize("link_class", [Link, SlowToResendLink])
def test_rows_in_flight_at_a_cut_reach_the_cloud_before_any_newer_row(
        proxy: ChaosProxy, cloud: CloudClient, link_class: type[Link]) -> None:
    device = f"gw-{uuid.uuid4().hex[:8]}"
    link = make_link(proxy, device, lambda message: None, link_class)
    outbox = link._outbox
    assert isinstance(outbox, MemoryOutbox)

    def add(count: int) -> None:
        for _ in range(count):
            outbox.add_reply("c", ReplyDraft(status="succeeded"), None, None)
        link.kick()

    def seqs() -> list[int]:
        return [r["seq"] for r in cloud.replies() if r.get("device_id") == device]

    link.start()
    try:
        assert link.wait_connected(10)
        add(5)
        cloud.wait_for(lambda: len(seqs()) == 5, 10, "the first rows")
        time.sleep(1.2)  # a session shorter than MIN_SESSION_S is backed off: reconnect at once instead
        proxy.blackhole(True)  # what the link sends now is held by the proxy, then lost with the cut
        add(10)
        cloud.wait_for(lambda: link.inflight_count() == 10, 10, "ten rows in flight")
        proxy.cut()
        proxy.heal()
        add(10)  # newer rows, pending when the link reconnects
        cloud.wait_for(lambda: len(set(seqs())) == 25, 30, "every row")
        first_arrivals = list(dict.fromkeys(seqs()))
        assert first_arrivals == list(range(1, 26)), first_arrivals
        assert link.stats.connects == 2
    finally:
        link.stop(drain_timeout_s=1.0)
