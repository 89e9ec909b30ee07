"""Scenario 4b: the disk holding the store fills up (a 4 MiB tmpfs), then space returns.

While full: the agent keeps running, says why in its log, leaves new commands unacknowledged (so
the broker keeps them; `redelivery_backoff` Event, Telemetry `redelivery`) and holds a finished
command's terminal reply in memory, retrying. When space returns: the link's next redelivery
reconnect (backed off) has the broker redeliver, everything ends exactly once, and a
`store_recovered` Event reports how many writes failed, `redelivery_recovered` the reconnects.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.faults.harness import Rig, audit, outbox_depth, wait_all_terminal
from tests.support.cloud import chat, command

pytestmark = pytest.mark.integration


def fill(disk: Path) -> Path:
    """Write a filler file until the filesystem refuses another byte."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for block in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_loses_nothing_crashes_nothing_and_recovers_when_space_returns(
        make_rig, small_disk: Path) -> None:
    rig: Rig = make_rig(store=small_disk / "agent.db", EDGE_AGENT_TELEMETRY_INTERVAL_S="1")
    long_chat = command("chat", chat("fill the disk", max_tokens=3000, seed=1))
    rig.cloud.send(rig.device_id, long_chat)
    rig.cloud.wait_for(lambda: rig.agent.ledger().get(long_chat["id"]) == "running", 30, "the chat running")
    filler = fill(small_disk)

    pings = [command("ping") for _ in range(3)]
    for ping in pings:
        rig.cloud.send(rig.device_id, ping)
    rig.cloud.wait_for(lambda: "could not store a command" in rig.agent.log_text(), 60, "intake failing")
    rig.cloud.wait_for(lambda: f"cannot store the succeeded reply of {long_chat['id']}" in rig.agent.log_text(),
                       60, "the terminal reply held back")
    assert rig.agent.alive
    assert "disk holding" in rig.agent.log_text() and "is full" in rig.agent.log_text()
    ledger = rig.agent.ledger()
    assert ledger[long_chat["id"]] == "running" and not any(p["id"] in ledger for p in pings)
    rig.cloud.wait_for(lambda: any(t["dropped"].get("store_full_writes", 0) > 0 for t in rig.cloud.on("/telemetry")),
                       30, "telemetry counting failed writes")
    rig.cloud.wait_for(lambda: any(t["redelivery"]["unacked"] > 0 for t in rig.cloud.on("/telemetry")),
                       30, "telemetry counting the commands left unacknowledged")
    assert [e["code"] for e in rig.cloud.on("/event") if e["code"].startswith("redelivery")] == ["redelivery_backoff"]

    filler.unlink()
    ids = [long_chat["id"]] + [p["id"] for p in pings]
    wait_all_terminal(rig.cloud, ids, timeout=90)
    result = audit(rig.cloud, rig.device_id, ids)
    result.assert_clean()
    assert result.outcomes["succeeded"] == 4
    rig.cloud.wait_for(lambda: any(e["code"] == "store_recovered" for e in rig.cloud.on("/event")), 30,
                       "store_recovered event")
    rig.cloud.wait_for(lambda: any(e["code"] == "redelivery_recovered" for e in rig.cloud.on("/event")), 30,
                       "redelivery_recovered event")
    recovered = next(e for e in rig.cloud.on("/event") if e["code"] == "redelivery_recovered")
    assert recovered["data"]["attempts"] >= 1 and recovered["data"]["failed_deliveries"] >= 3, recovered
    # rows acked while the disk was full (their delete failed) are deleted once it can write again
    rig.cloud.wait_for(lambda: outbox_depth(rig.agent.store)[0] == 0, 60, "outbox drained")
    assert rig.agent.alive
