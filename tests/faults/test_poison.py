"""Poison messages against a real agent (issue #13): a command that is valid JSON and nearly valid
schema but broke code further in used to leave the agent unacknowledged and reconnecting every 5 s
for ever. Now each gets one terminal reply and is acknowledged: `invalid_command` when the payload
cannot be interpreted, `internal` for a bug (logged once with its id), and the device keeps serving
without a reconnect. (A store that cannot write is the one thing left unacknowledged:
test_disk_full.py.)"""

from __future__ import annotations

import json

import pytest

from tests.faults.harness import Rig
from tests.support.cloud import chat, command

pytestmark = pytest.mark.integration


def _connections(rig: Rig) -> int:
    return rig.agent.log_text().count("connected to 127.0.0.1")


def _still_serves_without_a_reconnect(rig: Rig) -> None:
    ping = command("ping")
    rig.cloud.send(rig.device_id, ping)
    assert rig.cloud.wait_terminal(ping["id"], timeout=60)["status"] == "succeeded"
    assert _connections(rig) == 1, "no reconnect"
    assert rig.agent.alive


def test_the_issues_reproductions_are_answered_invalid_command_and_acknowledged(make_rig) -> None:
    rig: Rig = make_rig()
    no_offset = command("ping", expires_at="0001-01-01")  # knocked a device off the broker for good
    naive_created = command("ping", created_at="2026-11-21T10:00:00")  # TypeError in signing, before
    surrogate = command("chat", chat("a\ud800b", max_tokens=4))  # UnicodeEncodeError in the engine, before
    for cmd in (no_offset, naive_created, surrogate):
        rig.cloud.send(rig.device_id, json.dumps(cmd).encode())  # json.dumps writes the surrogate as \ud800
    for cmd in (no_offset, naive_created, surrogate):
        reply = rig.cloud.wait_terminal(cmd["id"], timeout=30)
        assert (reply["status"], reply["error"]["code"]) == ("rejected", "invalid_command"), reply
    _still_serves_without_a_reconnect(rig)
    assert "Traceback" not in rig.agent.log_text()


def test_a_bug_met_in_intake_is_answered_internal_logged_once_and_the_device_serves_on(make_rig) -> None:
    rig: Rig = make_rig(start=False)
    rig.agent.start(intake_bug="bug-")
    rig.cloud.wait_online(rig.device_id)
    poison = command("ping", command_id="bug-1")
    rig.cloud.send(rig.device_id, poison)
    reply = rig.cloud.wait_terminal("bug-1", timeout=30)
    assert (reply["status"], reply["error"]["code"]) == ("rejected", "internal")
    _still_serves_without_a_reconnect(rig)
    log = rig.agent.log_text()
    assert log.count("Traceback") == 1 and "intake failed on command bug-1" in log
    assert len([r for r in rig.cloud.replies("bug-1") if r["status"] == "rejected"]) == 1, "not redelivered"
