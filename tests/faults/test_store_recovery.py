"""Scenarios 5 and 7: a corrupt or truncated SQLite file at start; expiry, cancellation and a
command found `running` after a crash, end to end."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.faults.harness import Rig, audit, resend_until_accepted, wait_all_terminal
from tests.support.cloud import chat, command

pytestmark = pytest.mark.integration


def _garble(store: Path) -> None:
    """Overwrite the middle of the file (the b-tree pages, not the header) with noise."""
    data = bytearray(store.read_bytes())
    for i in range(4096, min(len(data), 4096 * 6)):
        data[i] = (i * 131) % 251
    store.write_bytes(bytes(data))


def _truncate(store: Path) -> None:
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 3])


def _used_store(rig: Rig) -> None:
    """Give the store some pages, then stop the agent cleanly (WAL checkpointed into the file)."""
    jobs = [command("chat", chat(f"warm {i}", max_tokens=8)) for i in range(20)]
    for job in jobs:
        rig.cloud.send(rig.device_id, job)
    wait_all_terminal(rig.cloud, [j["id"] for j in jobs], timeout=60)
    assert rig.agent.terminate() == 0
    conn = sqlite3.connect(rig.agent.store)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


@pytest.mark.parametrize("damage", [_garble, _truncate], ids=["garbled", "truncated"])
def test_a_corrupt_store_is_quarantined_with_a_timestamped_name_and_the_agent_runs_on_a_fresh_one(
        make_rig, damage) -> None:
    rig: Rig = make_rig()
    _used_store(rig)
    seq_before = max(r["seq"] for r in rig.cloud.replies())
    damage(rig.agent.store)
    rig.agent.start()
    rig.cloud.wait_for(lambda: any(e["code"] == "store_quarantined" for e in rig.cloud.on("/event")), 60,
                       "store_quarantined Event")
    (event,) = [e for e in rig.cloud.on("/event") if e["code"] == "store_quarantined"]
    moved = Path(event["data"]["quarantined_as"])
    assert moved.exists() and moved.name.startswith(f"{rig.agent.store.name}.corrupt-")
    ping = command("ping")
    rig.cloud.send(rig.device_id, ping)
    reply = rig.cloud.wait_terminal(ping["id"], timeout=60)
    assert reply["status"] == "succeeded"
    assert reply["seq"] > seq_before, "seq stays increasing across the rebuilt store"
    with sqlite3.connect(rig.agent.store) as conn:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"


def test_expired_commands_queued_behind_a_long_one_are_never_run(make_rig) -> None:
    rig: Rig = make_rig()
    long_chat = command("chat", chat("long", max_tokens=2500, seed=3))
    rig.cloud.send(rig.device_id, long_chat)
    rig.cloud.wait_for(lambda: rig.agent.ledger().get(long_chat["id"]) == "running", 30, "the chat running")
    soon = [command("ping", expires_at="2020-01-01T00:00:00Z") for _ in range(3)]
    for cmd in soon:
        rig.cloud.send(rig.device_id, cmd)
    ids = [long_chat["id"]] + [c["id"] for c in soon]
    wait_all_terminal(rig.cloud, ids, timeout=60)
    result = audit(rig.cloud, rig.device_id, ids)
    result.assert_clean()
    assert result.outcomes["expired:expired"] == 3
    assert not [r for c in soon for r in rig.cloud.replies(c["id"]) if r["status"] == "running"]


def test_cancel_stops_a_running_generation_and_a_redelivery_does_not_rerun_it(make_rig) -> None:
    rig: Rig = make_rig()
    long_run = command("complete", {"prompt": "Long", "max_tokens": 4000, "stream": True})
    rig.cloud.send(rig.device_id, long_run)
    rig.cloud.wait_for(lambda: rig.cloud.on(f"/stream/{long_run['id']}"), 30, "first token")
    cancel = command("cancel", {"target": long_run["id"]})
    rig.cloud.send(rig.device_id, cancel)
    reply = rig.cloud.wait_terminal(long_run["id"])
    assert reply["status"] == "cancelled" and reply["output"]["finish_reason"] == "cancelled"
    assert reply["output"]["usage"]["completion_tokens"] < 4000  # llama.cpp checks the stop every token
    rig.cloud.send(rig.device_id, long_run)  # a duplicate of the cancelled command: not run again
    rig.cloud.wait_for(lambda: len(rig.cloud.replies(long_run["id"])) > 3, 30, "the re-sent reply")
    audit(rig.cloud, rig.device_id, [long_run["id"], cancel["id"]]).assert_clean()


def test_a_command_running_when_the_agent_dies_gets_failed_internal_after_restart_and_is_not_rerun(
        make_rig) -> None:
    rig: Rig = make_rig(fault_point="command_running")
    job = command("chat", chat("interrupted", max_tokens=32))
    rig.cloud.send(rig.device_id, job)
    rig.agent.wait_fault_kill()
    assert rig.agent.ledger()[job["id"]] == "running"
    rig.agent.start()
    resend_until_accepted(rig.cloud, rig.device_id, [job], timeout=60)
    reply = rig.cloud.wait_terminal(job["id"], timeout=60)
    assert reply["status"] == "failed" and reply["error"]["code"] == "internal"
    assert "new id to retry" in reply["error"]["message"]
    rig.cloud.send(rig.device_id, job)  # redelivered again later: still not run
    rig.cloud.wait_for(lambda: len([r for r in rig.cloud.replies(job["id"]) if r["status"] == "failed"]) > 1,
                       30, "the stored failed reply re-sent")
    audit(rig.cloud, rig.device_id, [job["id"]]).assert_clean()
    started = [e for e in rig.cloud.on("/event") if e["code"] == "agent_started"]
    assert started[-1]["data"]["recovered_running"] == 1
