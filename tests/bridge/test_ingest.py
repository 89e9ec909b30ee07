"""Device messages into the registry: routing by topic, validation, and bad payloads."""

from __future__ import annotations

import pytest

from autoglm_wire.protocol import Event, Telemetry, format_ts, to_bytes
from cloud_bridge.ingest import Inbound, Ingestor, Outcome

from .factories import T0, at, chunk, command, offline, online, reply

P = "autoglm"


@pytest.fixture
def ingestor(registry):
    return Ingestor(registry, P)


def test_a_status_on_the_status_topic_registers_the_device(ingestor, registry):
    assert ingestor.handle(Inbound(f"{P}/dev-1/status", to_bytes(online()), retained=True), at(1)) is Outcome.STORED
    assert registry.devices.get("dev-1").state == "online"


def test_the_last_will_marks_the_device_offline(ingestor, registry):
    ingestor.handle(Inbound(f"{P}/dev-1/status", to_bytes(online())), at(1))
    ingestor.handle(Inbound(f"{P}/dev-1/status", to_bytes(offline())), at(2))
    assert registry.devices.get("dev-1").state == "offline"


def test_a_duplicate_reply_is_reported_as_such(ingestor, registry):
    registry.commands.add(command(), "dev-1", T0)
    message = Inbound(f"{P}/dev-1/reply", to_bytes(reply(1, "accepted")))
    assert ingestor.handle(message, at(1)) is Outcome.STORED
    assert ingestor.handle(message, at(2)) is Outcome.DUPLICATE


def test_stream_chunks_come_from_the_stream_topic(ingestor, registry):
    assert ingestor.handle(Inbound(f"{P}/dev-1/stream/c1", to_bytes(chunk(0, "Hi"))), at(1)) is Outcome.STORED
    assert ingestor.handle(Inbound(f"{P}/dev-1/stream/c1", to_bytes(chunk(0, "Hi"))), at(1)) is Outcome.DUPLICATE
    assert [c.delta for c in registry.chunks.of_command("c1")] == ["Hi"]


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        (f"{P}/dev-1/reply", b"not json"),
        (f"{P}/dev-1/reply", b"[1, 2]"),
        (f"{P}/dev-1/reply", b'{"v": 1, "status": "accepted"}'),
        (f"{P}/dev-1/reply", b"\xff\xfe"),
        (f"{P}/dev-1/reply", b'{"v": 1, "output": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        (f"{P}/dev-1/status", b'{"v": 1, "device_id": "dev-1", "state": "asleep"}'),
        (f"{P}/dev-1/event", b'{"v": 2}'),
        (f"{P}/dev-1/telemetry", b"{}"),
    ],
)
def test_a_bad_payload_is_dead_lettered_as_received_and_counted(ingestor, registry, topic, payload):
    assert ingestor.handle(Inbound(topic, payload), at(1)) is Outcome.DEAD_LETTERED
    assert registry.counters.all()["dead_letters"] == 1
    (letter,) = registry.dead_letters.recent()
    assert (letter.topic, letter.device_id, letter.payload, letter.size) == (topic, "dev-1", payload, len(payload))


def test_a_payload_naming_another_device_than_its_topic_is_bad(ingestor, registry):
    message = Inbound(f"{P}/dev-2/reply", to_bytes(reply(1, "accepted", device_id="dev-1")))
    assert ingestor.handle(message, at(1)) is Outcome.DEAD_LETTERED
    assert registry.feeds.replies(0) == []


def test_a_chunk_naming_another_command_than_its_topic_is_bad(ingestor):
    assert ingestor.handle(Inbound(f"{P}/dev-1/stream/c2", to_bytes(chunk(0, "x"))), at(1)) is Outcome.DEAD_LETTERED


def test_a_cleared_retained_status_is_ignored(ingestor, registry):
    assert ingestor.handle(Inbound(f"{P}/dev-1/status", b"", retained=True), at(1)) is Outcome.IGNORED
    assert registry.devices.all() == []


def test_topics_outside_the_prefix_are_ignored_and_others_under_it_dead_lettered(ingestor, registry):
    assert ingestor.handle(Inbound("other/dev-1/reply", b"{}"), at(1)) is Outcome.IGNORED
    assert ingestor.handle(Inbound(f"{P}/dev-1/cmd", b"{}"), at(1)) is Outcome.DEAD_LETTERED
    assert ingestor.handle(Inbound(f"{P}/group/reply", b"{}"), at(1)) is Outcome.DEAD_LETTERED
    assert [d.device_id for d in registry.dead_letters.recent()] == [None, None]


def test_a_batch_is_stored_in_one_go(ingestor, registry):
    registry.commands.add(command(), "dev-1", T0)
    outcomes = ingestor.handle_batch([
        Inbound(f"{P}/dev-1/status", to_bytes(online())),
        Inbound(f"{P}/dev-1/reply", to_bytes(reply(1, "accepted"))),
        Inbound(f"{P}/dev-1/reply", b"garbage"),
        Inbound(f"{P}/dev-1/reply", to_bytes(reply(2, "succeeded", output={"pong": True}))),
    ], at(1))
    assert outcomes == [Outcome.STORED, Outcome.STORED, Outcome.DEAD_LETTERED, Outcome.STORED]
    assert registry.commands.get("c1").state == "succeeded"


def _on(channel: str, message, device_id: str = "dev-1") -> Inbound:
    return Inbound(f"{P}/{device_id}/{channel}", to_bytes(message))


def test_a_batch_moves_each_command_through_all_its_replies_as_if_one_by_one(ingestor, registry):
    """Bulk advance in rounds: three commands, each answered accepted, running and its terminal
    reply in the same batch (interleaved), plus a lifecycle-illegal `rejected` after `accepted`."""
    for cid in ("c1", "c2", "c3"):
        registry.commands.add(command(cid), "dev-1", T0)
    batch, seq = [], 0
    for status in ("accepted", "running"):
        for cid in ("c1", "c2", "c3"):
            seq += 1
            batch.append(_on("reply", reply(seq, status, cid)))
    batch.append(_on("reply", reply(seq + 1, "rejected", "c2", error={"code": "busy", "message": "late"})))
    batch.append(_on("reply", reply(seq + 2, "succeeded", "c1", output={"pong": True})))
    batch.append(_on("reply", reply(seq + 3, "failed", "c3", error={"code": "internal", "message": "boom"})))
    outcomes = ingestor.handle_batch(batch, at(1))
    assert outcomes == [Outcome.STORED] * len(batch)
    states = {cid: registry.commands.get(cid) for cid in ("c1", "c2", "c3")}
    assert {cid: row.state for cid, row in states.items()} == {"c1": "succeeded", "c2": "running", "c3": "failed"}
    assert states["c1"].reply["output"] == {"pong": True} and states["c3"].error["code"] == "internal"
    assert registry.counters.all()["illegal_transitions"] == 1


def test_a_reply_twice_in_one_batch_is_stored_once_and_the_copy_is_a_duplicate(ingestor, registry):
    registry.commands.add(command(), "dev-1", T0)
    copy = _on("reply", reply(1, "accepted"))
    outcomes = ingestor.handle_batch([copy, _on("reply", reply(2, "running")), copy], at(1))
    assert outcomes == [Outcome.STORED, Outcome.STORED, Outcome.DUPLICATE]
    assert registry.replies.count() == 2 and registry.counters.all()["duplicate_replies"] == 1
    assert registry.commands.get("c1").state == "running"


def _telemetry(device_id: str, queue_depth: int) -> Telemetry:
    return Telemetry(device_id=device_id, ts=format_ts(T0), queue_depth=queue_depth, outbox_depth=0, outbox_bytes=0,
                     tokens_per_s_ewma=None, rss_mb=100.0, gpu_layers=0, uptime_s=1.0)


def test_a_batch_of_chunks_telemetry_and_events_from_many_devices_is_stored_in_order(ingestor, registry):
    devices = [f"dev-{i}" for i in range(5)]
    batch = []
    for i, device_id in enumerate(devices):
        for depth in (1, 2 + i):  # the last telemetry of a device wins
            batch.append(_on("telemetry", _telemetry(device_id, depth), device_id))
        batch.append(_on("event", Event(device_id=device_id, ts=format_ts(T0), level="info", code="tick",
                                        message="m"), device_id))
        batch.append(Inbound(f"{P}/{device_id}/stream/c1", to_bytes(chunk(0, "hi"))))
    batch.append(batch[2])  # the first device's event again: a redelivery
    outcomes = ingestor.handle_batch(batch, at(1))
    assert outcomes == [Outcome.STORED] * (len(batch) - 1) + [Outcome.DUPLICATE]
    for i, device_id in enumerate(devices):
        row = registry.devices.get(device_id)
        assert row.last_telemetry["queue_depth"] == 2 + i and row.last_seen == format_ts(at(1))
    assert len(registry.events.recent(limit=100)) == 5 and len(registry.feeds.chunks(0)) == 5
    assert registry.counters.all()["duplicate_events"] == 1
