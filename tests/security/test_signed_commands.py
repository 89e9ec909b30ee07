"""Signed commands, reply-topic confinement and input limits, against a real agent on mosquitto:
every rejection is `rejected` with its code, and the command never runs. Then the real bridge
signs what it dispatches, over mTLS under the shipped ACL, and a real agent that requires
signatures runs it."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm_wire.protocol import Command, Reply
from autoglm_wire.signing import CommandSigner
from cloud_bridge.store.registry import Registry
from tests.security.conftest import render_acl, tls_env
from tests.security.pki import CertFiles, TestCA, public_key_base64
from tests.support.agent_proc import AgentProcess, read_ledger, write_agent_config
from tests.support.broker import Broker, TlsListener
from tests.support.cloud import CloudClient, chat

pytestmark = pytest.mark.integration

DEVICE = "gw-signed"
OLD_KEY, NEW_KEY, ROGUE_KEY = (CommandSigner(k, Ed25519PrivateKey.generate()) for k in ("2026-a", "2026-b", "rogue"))


def now_iso(shift: timedelta = timedelta(0)) -> str:
    return (datetime.now(UTC) + shift).isoformat().replace("+00:00", "Z")


def fresh(kind: str = "ping", params: dict | None = None, shift: timedelta = timedelta(0), **envelope: object) -> dict:
    return {"v": 1, "id": uuid.uuid4().hex, "kind": kind, "params": params or {}, "created_at": now_iso(shift),
            "target": DEVICE, **envelope}


@pytest.fixture(scope="module")
def signed_device(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
                  session_broker: Broker) -> Iterator[tuple[AgentProcess, Path]]:
    """One agent for the module: requires signatures from 2026-a or 2026-b; small limits."""
    tmp = tmp_path_factory.mktemp("signed-agent")
    store = tmp / "agent.db"
    config = write_agent_config(tmp / "agent.toml", DEVICE, session_broker.port, tiny_model, store)
    trusted = {k.key_id: public_key_base64(k.private_key.public_key()) for k in (OLD_KEY, NEW_KEY)}
    env = {"EDGE_AGENT_SECURITY__REQUIRE_SIGNED_COMMANDS": "true",
           "EDGE_AGENT_SECURITY__TRUSTED_KEYS": json.dumps(trusted),
           "EDGE_AGENT_SECURITY__REPLAY_WINDOW_S": "600", "EDGE_AGENT_SECURITY__MAX_CLOCK_SKEW_S": "30",
           "EDGE_AGENT_LIMITS__MAX_TOKENS": "64", "EDGE_AGENT_LIMITS__MAX_PROMPT_CHARS": "200"}
    agent = AgentProcess(config, tmp / "agent.log", env=env).start()
    watcher = CloudClient(session_broker.port)
    watcher.wait_online(DEVICE)
    watcher.close()
    yield agent, store
    assert agent.terminate() == 0, agent.log_text()


def outcome(cloud: CloudClient, device: str, payload: dict | bytes, **send: object) -> dict:
    cloud.send(device, payload, **send)  # type: ignore[arg-type]
    command_id = payload["id"] if isinstance(payload, dict) else json.loads(payload)["id"]
    return cloud.wait_terminal(command_id, timeout=60)


def test_a_command_signed_with_a_trusted_key_runs(signed_device, cloud: CloudClient) -> None:
    for signer in (OLD_KEY, NEW_KEY):  # two trusted keys: rotation without downtime
        reply = outcome(cloud, DEVICE, signer.sign(fresh()))
        assert reply["status"] == "succeeded", reply


def _tamper(command: dict) -> dict:
    signed = OLD_KEY.sign(command)
    signed["params"] = {"prompt": "do something else", "max_tokens": 8}
    signed["kind"] = "complete"
    return signed


def _unsigned_target(command: dict) -> dict:
    return OLD_KEY.sign({k: v for k, v in command.items() if k != "target"})


REJECTIONS = {
    "unsigned": (lambda c: c, "not signed"),
    "tampered": (_tamper, "does not match"),
    "signed by an untrusted key": (ROGUE_KEY.sign, "does not trust"),
    "signed for another device": (lambda c: OLD_KEY.sign({**c, "target": "gw-other"}), "not this device"),
    "signed without a target": (_unsigned_target, "must carry `target`"),
    "older than the replay window": (lambda c: OLD_KEY.sign({**c, "created_at": now_iso(-timedelta(hours=2))}),
                                     "older than the replay window"),
    "created in the future": (lambda c: OLD_KEY.sign({**c, "created_at": now_iso(timedelta(minutes=10))}),
                              "in the future"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_a_command_that_is_not_properly_signed_is_unauthorized_and_never_runs(
        case: str, signed_device, cloud: CloudClient) -> None:
    _, store = signed_device
    make, reason = REJECTIONS[case]
    command = make(fresh())
    reply = outcome(cloud, DEVICE, command)
    assert reply["status"] == "rejected" and reply["error"]["code"] == "unauthorized", reply
    assert reason in reply["error"]["message"]
    assert {r["status"] for r in cloud.replies(command["id"])} == {"rejected"}
    assert command["id"] not in read_ledger(store)


def test_a_replayed_signed_command_is_not_run_again(signed_device, cloud: CloudClient) -> None:
    _, store = signed_device
    command = OLD_KEY.sign(fresh())
    first = outcome(cloud, DEVICE, command)
    cloud.send(DEVICE, command)  # the same bytes again, as an eavesdropper would replay them
    cloud.wait_for(lambda: len(cloud.terminal(command["id"])) + len(cloud.replies(command["id"])) > 4, 30,
                   "the stored reply re-sent")
    assert cloud.terminal(command["id"]) == [first]  # same seq: the stored reply, not a second run
    assert read_ledger(store)[command["id"]] == "succeeded"


def test_a_response_topic_outside_the_devices_reply_tree_is_refused_and_gets_nothing(
        signed_device, cloud: CloudClient) -> None:
    command = OLD_KEY.sign(fresh())
    reply = outcome(cloud, DEVICE, command, response_topic="autoglm/gw-other/reply")
    assert reply["status"] == "rejected" and reply["error"]["code"] == "unauthorized"
    assert "ResponseTopic" in reply["error"]["message"]
    assert not cloud.on("gw-other/reply")
    allowed = OLD_KEY.sign(fresh())
    assert outcome(cloud, DEVICE, allowed, response_topic=f"autoglm/{DEVICE}/reply/ops")["status"] == "succeeded"


@pytest.mark.parametrize(("params", "limit"), [
    (chat("hi", max_tokens=65), "limits.max_tokens"),
    (chat("x" * 201, max_tokens=8), "limits.max_prompt_chars"),
])
def test_a_command_over_the_devices_limits_is_rejected(params: dict, limit: str, signed_device,
                                                      cloud: CloudClient) -> None:
    reply = outcome(cloud, DEVICE, OLD_KEY.sign(fresh("chat", params)))
    assert reply["status"] == "rejected" and reply["error"]["code"] == "invalid_command"
    assert limit in reply["error"]["message"]


def test_the_bridge_signs_over_mtls_and_a_signature_requiring_agent_under_the_shipped_acl_runs_it(
        tmp_path: Path, pki: TestCA, broker_cert: CertFiles, start_agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """The production path end to end: bridge and gateway each with a certificate (CN = ACL user),
    the shipped ACL, the bridge signing with its key, the gateway requiring that signature."""
    from tests.bridge.conftest import BridgeProcess, launch_bridge, stop_process, write_bridge_config

    prefix = "t" + os.urandom(3).hex()
    listener = TlsListener(pki.ca_file, broker_cert.cert, broker_cert.key, use_identity_as_username=True,
                           acl_file=render_acl(tmp_path, f'prefix = "{prefix}"\n'))
    broker = Broker(tmp_path / "broker", tls=listener).start()
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "fleet-signing.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    env = tls_env(broker, pki.ca_file, pki.issue("gw-e2e"), mqtt__topic_prefix=prefix,
                  security__require_signed_commands="true",
                  security__trusted_keys=json.dumps({"fleet-1": public_key_base64(key.public_key())}))
    agent, device, _ = start_agent(broker, device_id="gw-e2e", env=env)
    bridge_cert = pki.issue("cloud-bridge")
    for name, value in {"PORT": str(broker.tls_port), "TLS_CA_FILE": str(pki.ca_file),
                        "TLS_CERT_FILE": str(bridge_cert.cert), "TLS_KEY_FILE": str(bridge_cert.key)}.items():
        monkeypatch.setenv(f"CLOUD_BRIDGE_MQTT__{name}", value)  # the bridge subprocess inherits them
    folder = tmp_path / "bridge"
    config = write_bridge_config(folder, broker.tls_port, prefix,
                                 extra=f'\n[security]\nsigning_key_file = "{key_file}"\nkey_id = "fleet-1"\n')
    log = folder / "bridge.log"
    observer = CloudClient(broker.port, prefix=prefix)  # plain local listener: the test's eye
    bridge = BridgeProcess(config, folder / "registry.db", prefix, launch_bridge(config, log), log)
    try:
        observer.wait_online(device)
        out = bridge.cli("send", device, "ping", "--timeout", "60", timeout_s=90)
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{bridge.log()}\n{agent.log_text()}"
        assert "pong" in out.stdout
        sent = [json.loads(b) for t, b in observer.messages if t == f"{prefix}/{device}/cmd"]
        assert sent and sent[0]["sig"]["key_id"] == "fleet-1" and sent[0]["target"] == device
        unsigned = {**fresh(), "target": device}
        observer.send(device, unsigned)
        assert observer.wait_terminal(unsigned["id"])["error"]["code"] == "unauthorized"
    finally:
        observer.close()
        assert stop_process(bridge.process) == 0, log.read_text()
        assert agent.terminate() == 0
        broker.stop()


def test_an_unsigned_copy_of_an_accepted_commands_id_cannot_change_its_record(
        signed_device, cloud: CloudClient, tmp_path: Path) -> None:
    """Issue 19, attack 4: whoever can publish on the cmd topic reads the accepted command's id and
    publishes an unsigned command under it. The device answers that payload with `command_id` null,
    and a registry fed every reply (plus the `rejected` an older device would have sent under the
    id) still records `succeeded`, counting the forged transition."""
    _, store = signed_device
    command = OLD_KEY.sign(fresh())
    assert outcome(cloud, DEVICE, command)["status"] == "succeeded"
    forged = {key: value for key, value in command.items() if key != "sig"}
    cloud.send(DEVICE, forged)
    cloud.wait_for(lambda: any(r["command_id"] is None and r["status"] == "rejected" for r in cloud.replies()), 30,
                   "the rejection of the unsigned copy")
    assert [r["status"] for r in cloud.terminal(command["id"])] == ["succeeded"]
    assert read_ledger(store)[command["id"]] == "succeeded"

    registry = Registry.open(tmp_path / "registry.db")
    try:
        registry.commands.add(Command.model_validate(command), DEVICE)
        older_device = {**cloud.terminal(command["id"])[0], "status": "rejected", "seq": 10**9, "output": None,
                        "error": {"code": "unauthorized", "message": "unsigned"}}
        for reply in [*cloud.replies(command["id"]), older_device]:
            registry.replies.record(Reply.model_validate(reply))
        assert registry.commands.get(command["id"]).state == "succeeded"
        assert registry.counters.all()["illegal_transitions"] == 1
    finally:
        registry.close()


def test_commands_signed_by_node_and_by_python_both_run_on_the_device(signed_device, cloud: CloudClient,
                                                                       tmp_path: Path) -> None:
    """The same command (a number JCS and Python's json write differently: 1e-7 / 1e-07, and
    non-ASCII text) signed by the JavaScript signer of tests/security/jcs_sign.mjs and by Python."""
    pem = tmp_path / "2026-a.pem"
    pem.write_bytes(OLD_KEY.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    params = {"prompt": "Grüße 😀", "max_tokens": 2, "temperature": 1e-7}
    by_node = subprocess.run(["node", str(Path(__file__).with_name("jcs_sign.mjs")), "sign", str(pem), OLD_KEY.key_id],
                             input=json.dumps(fresh("complete", params)), capture_output=True, text=True, check=True,
                             timeout=60).stdout.encode()
    for payload in (by_node, OLD_KEY.sign(fresh("complete", params))):
        reply = outcome(cloud, DEVICE, payload)
        assert reply["status"] == "succeeded", reply
