"""Scenario 6: thousands of hostile payloads over MQTT (hypothesis): wrong types, huge strings,
deep JSON, invalid UTF-8, wrong `v`, ids with illegal characters, topic injection in fields. Every
payload is sent, also the few the parser accepts (a `target` elsewhere, a number as `created_at`).
The agent never crashes, every payload gets exactly one terminal reply (a rejected one also a
`command_rejected` Event), and a valid ping afterwards succeeds. The size cap is enforced before
parsing.

CI sends 2,000 payloads; `-m slow` sends 10,000.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm_wire.errors import ProtocolError
from autoglm_wire.lifecycle import TERMINAL
from autoglm_wire.protocol import parse_command
from tests.faults.harness import Rig, report
from tests.support.cloud import command

pytestmark = pytest.mark.integration

MAX_PAYLOAD = 256 * 1024
BATCH = 200

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)
illegal_ids = st.sampled_from(["", "a/b", "+", "#", "x" * 129, "id with space", "\x00", "é", "autoglm/gw/cmd",
                               "../../etc", 7, None, ["id"], {"id": 1}])
injections = st.sampled_from(["autoglm/other/cmd", "#", "+/+/cmd", "\u0000", "$SYS/broker", "../reply",
                              "group/../../x", "\ud7ff" * 3])


@st.composite
def broken_commands(draw: st.DrawFn) -> bytes:
    """A command with one thing changed (nearly always something wrong), serialised as JSON; its id
    is unique, so a payload that parses is a new command."""
    cmd = {"v": 1, "id": f"fuzz-{uuid.uuid4().hex}", "kind": "ping", "params": {},
           "created_at": "2026-11-21T10:00:00Z"}
    mutation = draw(st.sampled_from(["v", "id", "kind", "params", "extra", "target", "created_at", "priority",
                                     "expires_at", "huge", "drop"]))
    if mutation == "v":
        cmd["v"] = draw(st.sampled_from([True, 1.0, 2, "1", None, [1], 0]))
    elif mutation == "id":
        cmd["id"] = draw(illegal_ids)
    elif mutation == "kind":
        cmd["kind"] = draw(injections | st.text(min_size=1, max_size=20).filter(
            lambda k: k not in {"ping", "chat", "complete", "cancel", "onnx", "config"}))
    elif mutation == "params":
        cmd["params"] = draw(st.dictionaries(st.text(min_size=1, max_size=8), json_values, min_size=1, max_size=4)
                             | st.sampled_from([[], "x", 1, None]))
    elif mutation == "extra":
        cmd[draw(st.sampled_from(["topic", "reply_to", "__proto__", "cmd"]))] = draw(injections)
    elif mutation == "target":
        cmd["target"] = draw(injections)
    elif mutation == "created_at":
        cmd["created_at"] = draw(st.sampled_from(["yesterday", 12, None, "2026-13-45T99:00:00Z", ""]))
    elif mutation == "priority":
        cmd["priority"] = draw(st.sampled_from([10**9, -10**9, "high", 1.5, None]))
    elif mutation == "expires_at":
        cmd["expires_at"] = draw(st.sampled_from(["never", 5, [], "2026-99-01T00:00:00Z"]))
    elif mutation == "huge":
        cmd["params"] = {"pad": "x" * draw(st.integers(MAX_PAYLOAD, MAX_PAYLOAD + 4096))}
    else:
        del cmd[draw(st.sampled_from(["v", "id", "kind", "created_at"]))]
    return json.dumps(cmd).encode()


def _deep(depth: int, kind: str) -> bytes:
    return (("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)).encode()


hostile = st.one_of(
    broken_commands(),
    st.binary(max_size=300),  # mostly not JSON, often not UTF-8
    st.binary(min_size=1, max_size=64).map(lambda b: b"\xff\xfe" + b),  # never valid UTF-8
    json_values.map(lambda v: json.dumps(v).encode()),  # JSON, but not a command object
    st.builds(_deep, st.integers(100, 50_000), st.sampled_from(["list", "dict"])),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


def _parses(payload: bytes) -> bool:
    try:
        parse_command(payload, MAX_PAYLOAD)
    except ProtocolError:
        return False
    return True


def _storm(rig: Rig, batches: int) -> Counter[str]:
    sent: list[bytes] = []

    @settings(max_examples=batches, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile, min_size=BATCH, max_size=BATCH))
    def send_batch(batch: list[bytes]) -> None:
        for payload in batch:
            rig.cloud.send(rig.device_id, payload)
            sent.append(payload)

    send_batch()
    rig.cloud.wait_for(lambda: _terminals(rig) >= len(sent), 300, f"{len(sent)} terminal replies")
    rejected = _rejections(rig)
    rig.cloud.wait_for(lambda: _rejection_events(rig) >= rejected, 60, "one command_rejected Event per rejection")
    _still_serves(rig)  # its reply comes after any late copy of a storm reply
    assert _terminals(rig) == len(sent) + 1, "exactly one terminal reply per payload (and the ping's)"
    events = [e for e in rig.cloud.on("/event") if e["code"] == "command_rejected"]
    assert len(events) == rejected
    codes = Counter(e["data"]["error_code"] for e in events)
    report("hostile_input", payloads=len(sent), parsed=sum(map(_parses, sent)), rejected_replies=rejected,
           events=len(events), by_code=dict(codes))
    return codes


def _terminals(rig: Rig) -> int:
    return len({r["seq"] for r in rig.cloud.replies() if r["status"] in TERMINAL})


def _rejections(rig: Rig) -> int:
    return len({r["seq"] for r in rig.cloud.replies() if r["status"] == "rejected"})


def _rejection_events(rig: Rig) -> int:
    return len([e for e in rig.cloud.on("/event") if e["code"] == "command_rejected"])


def _still_serves(rig: Rig) -> None:
    ping = command("ping")
    rig.cloud.send(rig.device_id, ping)
    assert rig.cloud.wait_terminal(ping["id"], timeout=60)["status"] == "succeeded"
    assert rig.agent.alive
    assert "Traceback" not in rig.agent.log_text()


def test_two_thousand_hostile_payloads_each_get_one_terminal_reply_and_the_agent_keeps_serving(make_rig) -> None:
    rig = make_rig()
    codes = _storm(rig, batches=10)
    assert {"bad_json", "invalid_command", "payload_too_large"} <= set(codes), codes


@pytest.mark.slow
def test_ten_thousand_hostile_payloads_each_get_one_terminal_reply_and_the_agent_keeps_serving(make_rig) -> None:
    rig = make_rig()
    _storm(rig, batches=50)


def test_an_oversized_payload_is_rejected_before_parsing(make_rig) -> None:
    rig = make_rig()
    rig.cloud.send(rig.device_id, b"{" * (MAX_PAYLOAD + 1))  # would be deep JSON if it were parsed
    rig.cloud.wait_for(lambda: _rejections(rig) == 1, 60, "the rejection")
    (reply,) = [r for r in rig.cloud.replies() if r["status"] == "rejected"]
    assert reply["error"]["code"] == "payload_too_large" and reply["command_id"] is None
    _still_serves(rig)
