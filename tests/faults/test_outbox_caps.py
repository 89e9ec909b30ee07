"""Scenario 4a: the outbox cap and its policy, on a real SQLite file and end to end.

Policy: at or above `store.max_outbox_rows` / `store.max_outbox_bytes`, new Events are dropped
(counted in `dropped.events`, one `outbox_full` Event stored anyway), new commands are refused
(`dropped.commands_refused`; their `busy` rejection is itself past the cap: dropped, counted in
`dropped.rejections`, and the cloud's resend brings the command back), rejections and the re-sent
replies of duplicates are dropped (`dropped.rejections`, `dropped.duplicate_replies`), and replies of
commands already accepted are always stored. When the backlog drains below the caps an
`outbox_recovered` Event reports the counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoglm_wire.errors import Busy
from autoglm_wire.lifecycle import State
from autoglm_wire.protocol import Event
from autoglm_wire.topics import DeviceTopics
from edge_agent.outbox import OutboxLimits, ReplyDraft
from tests.faults.harness import (
    Rig,
    audit,
    outbox_depth,
    report,
    resend_until_accepted,
    seed_outbox,
    wait_all_terminal,
)
from tests.support.cloud import command
from tests.support.store import OpenStore, open_store

TOPICS = DeviceTopics("autoglm", "gw-cap")


def _event(n: int) -> Event:
    return Event(device_id="gw-cap", ts="2026-11-22T00:00:00.000Z", level="info", code="test", message=f"e{n}")


def _event_codes(store: OpenStore) -> list[str]:
    rows = store.outbox.pending(0, 10_000)
    return [json.loads(r.payload)["code"] for r in rows if r.topic == TOPICS.event]


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[OpenStore]:
    store = open_store(tmp_path / "cap.db", TOPICS, "normal", OutboxLimits(max_rows=10, max_bytes=1 << 20))
    yield store
    store.close()


def test_events_beyond_the_row_cap_are_dropped_counted_and_announced_once(capped: OpenStore) -> None:
    stored = [capped.outbox.enqueue_event(_event(i)) for i in range(15)]
    assert stored == [True] * 10 + [False] * 5
    assert capped.outbox.dropped["events"] == 5
    assert _event_codes(capped).count("outbox_full") == 1


def test_a_new_command_is_refused_with_busy_when_the_outbox_is_full(capped: OpenStore) -> None:
    for i in range(10):
        capped.outbox.enqueue_event(_event(i))
    with pytest.raises(Busy) as refused:
        capped.inbox.accept("c1", "ping", "{}", 0, None)
    assert "resend the command later" in refused.value.message
    assert capped.inbox.get("c1") is None, "a refused command is not in the ledger"
    assert capped.outbox.dropped["commands_refused"] == 1


def test_replies_of_accepted_commands_are_stored_even_above_the_cap(capped: OpenStore) -> None:
    capped.inbox.accept("c1", "ping", "{}", 0, None)
    for i in range(20):
        capped.outbox.enqueue_event(_event(i))
    assert capped.inbox.transition("c1", State.RUNNING, ReplyDraft(status="running"))
    assert capped.inbox.transition("c1", State.SUCCEEDED, ReplyDraft(status="succeeded"))
    statuses = [json.loads(r.payload).get("status") for r in capped.outbox.pending(0, 100)
                if r.topic == TOPICS.reply]
    assert statuses == ["accepted", "running", "succeeded"]


def test_a_duplicate_past_the_cap_is_recognised_but_its_reply_is_not_queued_again(capped: OpenStore) -> None:
    capped.inbox.accept("c1", "ping", "{}", 0, None)
    for i in range(20):
        capped.outbox.enqueue_event(_event(i))
    depth = capped.outbox.depth()
    for _ in range(50):  # a redelivery storm
        assert capped.inbox.accept("c1", "ping", "{}", 0, None).duplicate
    assert capped.outbox.depth() == depth, "re-sent replies past the cap do not grow the outbox"
    assert capped.outbox.dropped["duplicate_replies"] == 50


def test_a_duplicate_below_the_cap_gets_its_last_reply_again(capped: OpenStore) -> None:
    capped.inbox.accept("c1", "ping", "{}", 0, None)
    assert capped.inbox.accept("c1", "ping", "{}", 0, None).duplicate
    first, again = [r.payload for r in capped.outbox.pending(0, 100) if r.topic == TOPICS.reply]
    assert first == again and capped.outbox.dropped.get("duplicate_replies", 0) == 0


def test_rejections_past_the_cap_are_dropped_and_counted_with_their_events(capped: OpenStore) -> None:
    for i in range(10):
        capped.outbox.enqueue_event(_event(i))
    depth = capped.outbox.depth()
    for n in range(100):  # a flood of bad payloads
        capped.outbox.reject(None, ReplyDraft.failure("rejected", Busy("bad")), _event(n))
    assert capped.outbox.depth()[0] == depth[0] + 1, "only the one outbox_full notice was stored"
    assert _event_codes(capped).count("outbox_full") == 1
    assert (capped.outbox.dropped["rejections"], capped.outbox.dropped["events"]) == (100, 100)


def test_the_byte_cap_counts_too(tmp_path: Path) -> None:
    store = open_store(tmp_path / "bytes.db", TOPICS, "normal", OutboxLimits(max_rows=1000, max_bytes=2000))
    stored = [store.outbox.enqueue_event(_event(i)) for i in range(40)]
    assert 0 < stored.count(True) < 40
    assert store.outbox.depth()[1] < 2000 + 1000  # one Event of slack at most, plus the notice


def test_draining_below_the_cap_publishes_outbox_recovered_with_the_counts(capped: OpenStore) -> None:
    for i in range(12):
        capped.outbox.enqueue_event(_event(i))
    capped.outbox.delete([r.id for r in capped.outbox.pending(0, 100)])
    (row,) = capped.outbox.pending(0, 100)
    recovered = json.loads(row.payload)
    assert recovered["code"] == "outbox_recovered"
    assert recovered["data"]["events"] == 2


def test_the_outbox_recovered_event_of_an_unsynced_delete_is_synced_before_the_pump_publishes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path / "full.db", TOPICS, "full", OutboxLimits(max_rows=10, max_bytes=1 << 20))
    try:
        for i in range(12):
            store.outbox.enqueue_event(_event(i))
        synced: list[int] = []
        monkeypatch.setattr(os, "fsync", synced.append)
        store.outbox.delete([store.outbox.pending(0, 1)[0].id])  # still at the cap (10 of 10 rows)
        store.file.sync()
        assert synced == [], "a delete alone leaves nothing to sync"
        store.outbox.delete([r.id for r in store.outbox.pending(0, 100)])  # below the cap: outbox_recovered is stored
        assert _event_codes(store) == ["outbox_recovered"]
        store.file.sync()
        assert len(synced) == 1, "the Event row of that commit is fsynced before it can be published"
    finally:
        store.close()


def test_the_caps_are_config_keys_with_bounds(tmp_path: Path) -> None:
    from edge_agent.config import StoreConfig

    assert StoreConfig(max_outbox_rows=10).max_outbox_rows == 10
    with pytest.raises(ValueError):
        StoreConfig(max_outbox_rows=1)


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_an_agent_with_a_full_outbox_refuses_new_commands_counts_drops_and_serves_them_when_resent(make_rig) -> None:
    rig: Rig = make_rig(start=False, EDGE_AGENT_STORE__MAX_OUTBOX_ROWS="500", EDGE_AGENT_TELEMETRY_INTERVAL_S="1")
    seed_outbox(rig.agent.store, rig.device_id, 1500)
    rig.proxy.latency(0.05)  # a slow uplink: the backlog stays above the cap for a while
    rig.agent.start()
    rig.cloud.wait_online(rig.device_id)
    pings = [command("ping") for _ in range(5)]
    for ping in pings:
        rig.cloud.send(rig.device_id, ping)
    ids = [p["id"] for p in pings]
    # refused past the cap: not stored, and their `busy` rejections (and Events) dropped, counted
    refused = {"commands_refused": 5, "rejections": 5, "events": 6}  # events: the 5 rejections' + agent_started
    rig.cloud.wait_for(lambda: any(all(t["dropped"].get(k) == n for k, n in refused.items())
                                   for t in rig.cloud.on("/telemetry")), 60, f"telemetry reporting {refused}")
    assert not [r for r in rig.cloud.replies() if r.get("command_id") in ids], "nothing stored for them"
    assert not set(ids) & set(rig.agent.ledger())
    rig.proxy.heal()
    rig.cloud.wait_for(lambda: outbox_depth(rig.agent.store)[0] == 0, 120, "backlog drained")
    rig.cloud.wait_for(lambda: rig.cloud.count("event") >= 1500 + 2, 60, "the backlog and the notices received")
    codes = [e["code"] for e in rig.cloud.on("/event")]
    assert codes.count("outbox_full") == 1 and codes.count("outbox_recovered") == 1
    assert codes.count("backlog") == 1500, "nothing queued before the cap was dropped"
    resends = resend_until_accepted(rig.cloud, rig.device_id, pings, timeout=60)  # as the bridge does
    wait_all_terminal(rig.cloud, ids, timeout=60)
    result = audit(rig.cloud, rig.device_id, ids)
    result.assert_clean()
    assert result.outcomes["succeeded"] == 5
    report("outbox_cap", cap_rows=500, backlog_rows=1500, backlog_delivered=codes.count("backlog"),
           resends=resends, **{f"dropped_{k}": n for k, n in refused.items()})
    assert rig.agent.alive
