"""The agent end of the boundary fuzzer (issue #13): commands generated from the pydantic models
with every field at or past the edge of its type (`tests/faults/boundary.py`), sent over MQTT to a
real agent on the tiny GGUF. Invariant: exactly one terminal reply per command (by id; by count for
the payloads whose id cannot be read), a ping still answered afterwards, no reconnect, no traceback
in the agent's log.

CI sends 1,000 cases (well under a minute); `-m slow` or EDGE_AGENT_SLOW_TESTS=1 sends 10,000.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm_wire.errors import ProtocolError
from autoglm_wire.lifecycle import TERMINAL
from autoglm_wire.protocol import parse_command
from tests.faults.boundary import ID_VARIANTS, KINDS, commands, to_json, with_id
from tests.faults.harness import Rig, report
from tests.support.cloud import command

pytestmark = pytest.mark.integration

MAX_PAYLOAD = 256 * 1024
# Small enough that every generation is short and every prompt fits the model's n_ctx (4096):
# a value past these is answered `invalid_command` by the device's own limits.
LIMITS = {"EDGE_AGENT_LIMITS__MAX_TOKENS": "256", "EDGE_AGENT_LIMITS__MAX_PROMPT_CHARS": "2000"}


def expected_id(payload: bytes) -> str | None:
    """The command id the terminal reply must carry: the parser's reading of the payload."""
    try:
        return parse_command(payload, MAX_PAYLOAD).id
    except ProtocolError as exc:
        return exc.command_id


def terminal_seqs(rig: Rig) -> dict[str | None, set[int]]:
    """command id -> the distinct seqs of its terminal replies (a re-sent copy has the same seq)."""
    found: dict[str | None, set[int]] = {}
    for reply in rig.cloud.replies():
        if reply["status"] in TERMINAL:
            found.setdefault(reply["command_id"], set()).add(reply["seq"])
    return found


def connections(rig: Rig) -> int:
    return rig.agent.log_text().count("connected to 127.0.0.1")


def _fuzz(rig: Rig, cases: int) -> None:
    run = uuid.uuid4().hex[:6]
    ids: list[str] = []
    anonymous = 0
    kind_of: dict[str, str] = {}  # readable id -> the kind sent

    @settings(max_examples=cases, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(commands(), st.sampled_from(ID_VARIANTS))
    def send_one(cmd: dict, variant: str) -> None:
        nonlocal anonymous
        payload = to_json(with_id(cmd, f"{run}-{len(ids) + anonymous:05d}", variant))
        command_id = expected_id(payload)
        if command_id is None:
            anonymous += 1
        else:
            ids.append(command_id)
            kind_of[command_id] = cmd["kind"] if cmd["kind"] in KINDS else "unknown"
        rig.cloud.send(rig.device_id, payload)

    send_one()
    assert len(set(ids)) == len(ids), "every readable id is unique"
    sent = len(ids) + anonymous

    def all_answered() -> bool:
        found = terminal_seqs(rig)
        return all(found.get(i) for i in ids) and len(found.get(None, ())) >= anonymous

    rig.cloud.wait_for(all_answered, 600, f"a terminal reply for each of {sent} commands")
    ping = command("ping")
    rig.cloud.send(rig.device_id, ping)
    assert rig.cloud.wait_terminal(ping["id"], timeout=60)["status"] == "succeeded"
    found = terminal_seqs(rig)  # after the ping's reply: any late duplicate of a fuzz reply is in
    assert [i for i in ids if len(found[i]) != 1] == [], "exactly one terminal reply per command id"
    assert len(found.get(None, ())) == anonymous, "exactly one terminal reply per payload without a readable id"
    outcomes = Counter(f"{kind_of.get(r['command_id'], 'unreadable id')} {r['status']}"
                       + (f":{r['error']['code']}" if r.get("error") else "")
                       for r in rig.cloud.unique_replies().values()
                       if r["status"] in TERMINAL and r["command_id"] != ping["id"])
    log = rig.agent.log_text()
    report("boundary_fuzz", cases=sent, unreadable_ids=anonymous, outcomes=dict(sorted(outcomes.items())),
           connections=connections(rig), tracebacks=log.count("Traceback"))
    assert connections(rig) == 1, "no reconnect"
    assert "Traceback" not in log
    assert rig.agent.alive


def test_boundary_values_from_the_models_each_get_one_terminal_reply_and_the_agent_keeps_serving(make_rig) -> None:
    _fuzz(make_rig(**LIMITS), cases=1000)


@pytest.mark.slow
def test_ten_thousand_boundary_cases_each_get_one_terminal_reply_and_the_agent_keeps_serving(make_rig) -> None:
    _fuzz(make_rig(**LIMITS), cases=10_000)
