"""The link's intake ordering, without a broker: a command is stored, then synced to disk, then
acknowledged; a failure anywhere before the PUBACK leaves it unacknowledged for redelivery."""

from __future__ import annotations

from dataclasses import dataclass

from autoglm_wire.mqtt_session import BrokerOptions
from autoglm_wire.topics import DeviceTopics
from edge_agent.link import DELETE_BATCH_ROWS, InboundMessage, Link, LinkOptions
from edge_agent.outbox import MemoryOutbox

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


class AckRecorder:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def ack(self, mid: int, qos: int) -> None:
        self.calls.append(f"ack {mid}")


def make_link(calls: list[str], sync_fails: bool = False) -> Link:
    def on_command(message: InboundMessage) -> None:
        calls.append(f"store {message.payload.decode()}")

    def sync_to_disk() -> None:
        if sync_fails:
            raise OSError(5, "Input/output error")
        calls.append("sync")

    return Link(options=LinkOptions(broker=BROKER, will_delay_s=5, inflight_window=20),
                subscriptions=["autoglm/d1/cmd"], outbox=RecordingOutbox(calls), sync_to_disk=sync_to_disk,
                on_command=on_command, status_topic="autoglm/d1/status", status_payload=lambda: b"{}",
                offline_payload=b"{}")


def test_a_command_is_stored_then_synced_then_acknowledged() -> None:
    calls: list[str] = []
    link = make_link(calls)
    link._on_message(AckRecorder(calls), None, Delivery())  # type: ignore[arg-type]
    assert calls == ["store {}", "sync", "ack 7"]


def test_a_failed_sync_leaves_the_command_unacknowledged() -> None:
    calls: list[str] = []
    link = make_link(calls, sync_fails=True)
    link._on_message(AckRecorder(calls), None, Delivery())  # type: ignore[arg-type]
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
