"""The link without a broker: a command is stored, then synced to disk, then acknowledged; a failure
anywhere before the PUBACK leaves it unacknowledged, and the link reconnects for its redelivery,
backing off, while other commands are served; after a reconnect no new row overtakes the ones paho
re-sends. (The same against a real broker: tests/faults/test_link_faults.py.)"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from paho.mqtt.enums import MQTTErrorCode

from autoglm_wire.backoff import ceiling
from autoglm_wire.mqtt_session import BrokerOptions
from autoglm_wire.topics import DeviceTopics
from edge_agent.link import (
    DELETE_BATCH_ROWS,
    REDELIVERY_INITIAL_S,
    REDELIVERY_MAX_S,
    InboundMessage,
    Link,
    LinkOptions,
)
from edge_agent.outbox import MemoryOutbox, ReplyDraft
from edge_agent.sqlite_file import StoreFull

BROKER = BrokerOptions(host="127.0.0.1", port=1, client_id="d1", keepalive=30, session_expiry_s=3600,
                       backoff_initial_s=1.0, backoff_multiplier=2.0, backoff_max_s=30.0)


class RecordingOutbox(MemoryOutbox):
    def __init__(self, calls: list[str]) -> None:
        super().__init__(DeviceTopics("autoglm", "d1"))
        self.calls = calls

    def delete(self, ids: list[int]) -> None:
        self.calls.append(f"delete {len(ids)}")
        super().delete(ids)


@dataclass
class Delivery:
    """The fields of a paho MQTTMessage that the link reads."""

    topic: str = "autoglm/d1/cmd"
    payload: bytes = b"{}"
    mid: int = 7
    qos: int = 1
    dup: bool = False
    properties: object = None


class FakeClient:
    """The paho calls the link makes, recorded."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.events: list[dict[str, object]] = []
        self._mid = 100

    def ack(self, mid: int, qos: int) -> None:
        self.calls.append(f"ack {mid}")

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                properties: object = None) -> SimpleNamespace:
        self._mid += 1
        if topic.endswith("/event"):
            self.events.append(json.loads(payload))
        elif topic.endswith("/reply"):
            self.calls.append(f"publish seq {json.loads(payload)['seq']}")
        return SimpleNamespace(rc=MQTTErrorCode.MQTT_ERR_SUCCESS, mid=self._mid)

    def subscribe(self, topics: object) -> None:
        pass

    def disconnect(self) -> None:
        self.calls.append("disconnect")


def make_link(calls: list[str], sync_fails: bool = False) -> Link:
    def on_command(message: InboundMessage) -> None:
        if message.payload == b"unstorable":
            raise StoreFull("the disk holding edge.db is full")
        calls.append(f"store {message.payload.decode()}")

    def sync_to_disk() -> None:
        if sync_fails:
            raise OSError(5, "Input/output error")
        calls.append("sync")

    return Link(options=LinkOptions(broker=BROKER, will_delay_s=5, inflight_window=20),
                subscriptions=["autoglm/d1/cmd"], outbox=RecordingOutbox(calls), sync_to_disk=sync_to_disk,
                on_command=on_command, status_topic="autoglm/d1/status", status_payload=lambda: b"{}",
                offline_payload=b"{}", event_topic="autoglm/d1/event",
                event_payload=lambda level, code, message, data: json.dumps({"code": code, "data": data}).encode())


def test_a_command_is_stored_then_synced_then_acknowledged() -> None:
    calls: list[str] = []
    link = make_link(calls)
    link._on_message(FakeClient(calls), None, Delivery())  # type: ignore[arg-type]
    assert calls == ["store {}", "sync", "ack 7"]


def test_a_failed_sync_leaves_the_command_unacknowledged() -> None:
    calls: list[str] = []
    link = make_link(calls, sync_fails=True)
    link._on_message(FakeClient(calls), None, Delivery())  # type: ignore[arg-type]
    assert calls == ["store {}"], "no PUBACK: the broker redelivers after the link reconnects"


def ack(link: Link, mids: range) -> None:
    for mid in mids:
        link._acks.put((mid, True))


def test_acked_rows_are_deleted_in_batches_while_others_are_in_flight_and_all_when_none_are() -> None:
    calls: list[str] = []
    link = make_link(calls)
    total = DELETE_BATCH_ROWS + 10
    link._inflight = {mid: 1000 + mid for mid in range(total)}
    ack(link, range(DELETE_BATCH_ROWS - 1))
    link._settle_acks()
    assert calls == [], "fewer than a batch acked and rows still in flight: no delete yet"
    ack(link, range(DELETE_BATCH_ROWS - 1, DELETE_BATCH_ROWS))
    link._settle_acks()
    assert calls == [f"delete {DELETE_BATCH_ROWS}"], "one transaction for the whole batch"
    ack(link, range(DELETE_BATCH_ROWS, total))
    link._settle_acks()
    assert calls == [f"delete {DELETE_BATCH_ROWS}", "delete 10"], "nothing in flight: the rest at once"
    assert link.stats.acked == total


# --- redelivery of a command that could not be stored ---------------------------------------------


def connect(link: Link, client: FakeClient) -> None:
    """What paho does on a (re)connection: `on_pre_connect` in reconnect(), `on_connect` at CONNACK."""
    link._on_pre_connect(client, None)  # type: ignore[arg-type]
    link._on_connect(client, None, SimpleNamespace(session_present=True),  # type: ignore[arg-type]
                     SimpleNamespace(is_failure=False), None)


def test_an_unstorable_command_stays_unacknowledged_while_the_next_ones_are_served() -> None:
    calls: list[str] = []
    link = make_link(calls)
    client = FakeClient(calls)
    link._on_message(client, None, Delivery(payload=b"unstorable", mid=1))  # type: ignore[arg-type]
    link._on_message(client, None, Delivery(payload=b"next", mid=2))  # type: ignore[arg-type]
    link._on_message(client, None, Delivery(payload=b"unstorable", mid=3))  # type: ignore[arg-type]
    assert calls == ["store next", "sync", "ack 2"], "served: the one that could be stored"
    assert link.redelivery.counters() == {"unacked": 2, "attempts": 0, "failed_deliveries": 2}
    assert 0 <= link.redelivery.due - time.monotonic() <= REDELIVERY_INITIAL_S  # type: ignore[operator]
    assert [e["code"] for e in client.events] == ["redelivery_backoff"], "one Event per failing spell"


def test_redelivery_reconnects_back_off_to_the_cap_then_recovery_is_announced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # the jitter's upper bound: the ceiling
    calls: list[str] = []
    link = make_link(calls)
    client = FakeClient(calls)
    link._client = client  # type: ignore[assignment]
    connect(link, client)
    waits = []
    for attempt in range(1, 8):
        link._on_message(client, None, Delivery(payload=b"unstorable", mid=attempt))  # type: ignore[arg-type]
        waits.append(round(link.redelivery.due - time.monotonic()))  # type: ignore[operator]
        link._reconnect_for_redelivery()
        assert "disconnect" not in calls, "not before the wait is over"
        link.redelivery.due = time.monotonic()
        link._reconnect_for_redelivery()
        assert calls.pop() == "disconnect" and link.redelivery.attempts == attempt
        connect(link, client)
        assert link.redelivery.unacked == 0, "the broker redelivers them on the new connection"
    assert waits == [ceiling(REDELIVERY_INITIAL_S, 2.0, REDELIVERY_MAX_S, n) for n in range(1, 8)]
    assert waits == [5, 10, 20, 40, 60, 60, 60]
    link._on_message(client, None, Delivery(payload=b"redelivered", mid=9))  # type: ignore[arg-type]
    assert calls == ["store redelivered", "sync", "ack 9"]
    assert [e["code"] for e in client.events] == ["redelivery_backoff", "redelivery_recovered"]
    assert client.events[1]["data"]["attempts"] == 7  # type: ignore[index]
    assert link.redelivery.counters() == {"unacked": 0, "attempts": 0, "failed_deliveries": 7}
    assert link.redelivery.failing_since is None and link.redelivery.due is None


def test_the_redelivery_reconnect_is_not_held_back_by_deletes_failing_on_the_same_full_disk() -> None:
    calls: list[str] = []
    link = make_link(calls)
    client = FakeClient(calls)
    link._client = client  # type: ignore[assignment]
    connect(link, client)

    def delete(ids: list[int]) -> None:
        raise StoreFull("the disk holding edge.db is full")

    link._outbox.delete = delete  # type: ignore[method-assign]
    link._unsettled = [1]  # acked rows waiting for their delete
    link._on_message(client, None, Delivery(payload=b"unstorable", mid=1))  # type: ignore[arg-type]
    link.redelivery.due = time.monotonic()
    with pytest.raises(StoreFull):
        link._pump_once()
    assert calls[-1] == "disconnect"


# --- after a reconnect, the rows paho re-sends go first ---------------------------------------------


def test_after_a_reconnect_no_new_row_is_published_before_the_rows_in_flight_are_acked() -> None:
    calls: list[str] = []
    link = make_link(calls)
    client = FakeClient(calls)
    link._client = client  # type: ignore[assignment]
    outbox = link._outbox
    assert isinstance(outbox, MemoryOutbox)
    for n in range(3):
        outbox.add_reply(f"c{n}", ReplyDraft(status="succeeded"), None, None)
    connect(link, client)
    link._fill_window()
    published = [c for c in calls if c.startswith("publish")]
    assert published == ["publish seq 1", "publish seq 2", "publish seq 3"]
    in_flight = dict(link._inflight)
    connect(link, client)  # the connection dropped with all three in flight: paho re-sends them
    outbox.add_reply("c3", ReplyDraft(status="succeeded"), None, None)
    calls.clear()
    link._fill_window()
    assert [c for c in calls if c.startswith("publish")] == [], "seq 4 waits for the re-sent 1-3"
    ack(link, range(min(in_flight), min(in_flight) + 2))
    link._settle_acks()
    link._fill_window()
    assert [c for c in calls if c.startswith("publish")] == [], "still one re-sent row unacked"
    ack(link, range(min(in_flight) + 2, min(in_flight) + 3))
    link._settle_acks()
    link._fill_window()
    assert [c for c in calls if c.startswith("publish")] == ["publish seq 4"]
