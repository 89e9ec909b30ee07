"""Authorization with the shipped ACL (deploy/mosquitto/acl.template rendered by make_acl.py): a
gateway reads only its own and its groups' command topics and writes only its own device -> cloud
topics; the bridge has the cloud side. Real mosquitto, mTLS identities (CN = username)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from cloud_bridge.store.registry import Registry
from tests.security.conftest import MAKE_ACL, RawClient, render_acl, tls_env, wait_until
from tests.security.pki import CertFiles, TestCA
from tests.support.agent_proc import outbox_rows
from tests.support.broker import Broker, TlsListener
from tests.support.cloud import CloudClient, command

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NOT_AUTHORIZED = 0x87
FLEET = 'prefix = "autoglm"\nbridge_user = "cloud-bridge"\n[groups]\nsite-a = ["gw-a"]\nsite-b = ["gw-b"]\n'


def registry_acl(folder: Path) -> Path:
    """The ACL as shipped for a fleet whose groups are assigned in the bridge's registry:
    `cloud-bridge group add`, `group list --toml`, `make_acl.py fleet.toml --groups`."""
    (folder / "bridge.toml").write_text('[store]\npath = "registry.db"\n')
    Registry.open(folder / "registry.db").close()

    def bridge_cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "cloud_bridge.cli", "group", args[0], "--config",
                               str(folder / "bridge.toml"), *args[1:]], capture_output=True, text=True,
                              check=True, cwd=ROOT).stdout

    bridge_cli("add", "gw-a", "site-a")
    bridge_cli("add", "gw-b", "site-b")
    (folder / "groups.toml").write_text(bridge_cli("list", "--toml"))
    (folder / "fleet.toml").write_text('prefix = "autoglm"\nbridge_user = "cloud-bridge"\n')
    acl = subprocess.run([sys.executable, str(MAKE_ACL), str(folder / "fleet.toml"), "--groups",
                          str(folder / "groups.toml")], capture_output=True, text=True, check=True).stdout
    (folder / "autoglm.acl").write_text(acl)
    return folder / "autoglm.acl"


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory, pki: TestCA, broker_cert: CertFiles) -> Iterator[Broker]:
    tmp = tmp_path_factory.mktemp("acl-broker")
    listener = TlsListener(pki.ca_file, broker_cert.cert, broker_cert.key, use_identity_as_username=True,
                           acl_file=registry_acl(tmp))
    broker = Broker(tmp / "broker", tls=listener).start()
    yield broker
    broker.stop()


@pytest.fixture
def observer(acl_broker: Broker) -> Iterator[CloudClient]:
    """Sees everything, from the broker's plain local listener (no ACL there: it is the test's eye)."""
    with closing(CloudClient(acl_broker.port)) as client:
        yield client


@pytest.fixture
def rogue_a(acl_broker: Broker, pki: TestCA) -> Iterator[RawClient]:
    """Gateway A's certificate in the hands of a client that is not the agent."""
    client = RawClient(acl_broker.tls_port, pki.ca_file, pki.issue("gw-a"), client_id="rogue-with-a-cert")
    yield client
    client.close()


def test_a_gateway_serves_its_own_and_its_groups_commands_under_the_shipped_acl(
        acl_broker: Broker, pki: TestCA, observer: CloudClient, start_agent) -> None:
    env = tls_env(acl_broker, pki.ca_file, pki.issue("gw-a"), mqtt__groups='["site-a"]')
    agent, device, _ = start_agent(acl_broker, device_id="gw-a", env=env)
    observer.wait_online(device)
    direct, to_group = command("ping"), command("ping")
    observer.send(device, direct)
    observer.client.publish("autoglm/group/site-a/cmd", json.dumps(to_group).encode(), qos=1)
    assert observer.wait_terminal(direct["id"])["status"] == "succeeded"
    assert observer.wait_terminal(to_group["id"])["status"] == "succeeded"
    assert "refused" not in agent.log_text()
    assert agent.terminate() == 0


def test_device_a_cannot_read_device_b_or_another_groups_commands(
        rogue_a: RawClient, observer: CloudClient) -> None:
    rogue_a.subscribe("autoglm/gw-b/cmd", "autoglm/group/site-b/cmd", "autoglm/+/reply", "autoglm/gw-a/cmd")
    observer.client.publish("autoglm/gw-b/cmd", b'{"for": "b"}', qos=1)
    observer.client.publish("autoglm/group/site-b/cmd", b'{"for": "site-b"}', qos=1)
    observer.client.publish("autoglm/gw-b/reply", b'{"from": "b"}', qos=1)
    observer.client.publish("autoglm/gw-a/cmd", b'{"for": "a"}', qos=1)  # published last: a barrier
    wait_until(lambda: "autoglm/gw-a/cmd" in rogue_a.topics(), 20, "A's own command")
    assert rogue_a.topics() == ["autoglm/gw-a/cmd"]


def test_device_a_cannot_publish_b_replies_nor_any_command(rogue_a: RawClient, observer: CloudClient) -> None:
    forged = json.dumps({"v": 1, "command_id": "x", "device_id": "gw-b", "status": "succeeded", "seq": 1,
                         "ts": "2026-11-21T10:00:00.000Z"}).encode()
    assert rogue_a.publish("autoglm/gw-b/reply", forged) == NOT_AUTHORIZED
    assert rogue_a.publish("autoglm/gw-b/status", b"{}") == NOT_AUTHORIZED
    assert rogue_a.publish("autoglm/gw-b/cmd", b"{}") == NOT_AUTHORIZED
    assert rogue_a.publish("autoglm/gw-a/cmd", b"{}") == NOT_AUTHORIZED  # not even to itself
    assert rogue_a.publish("autoglm/group/site-a/cmd", b"{}") == NOT_AUTHORIZED
    assert rogue_a.publish("autoglm/gw-a/event", b'{"barrier": true}') == 0
    observer.wait_for(lambda: observer.on("gw-a/event"), 20, "A's own event")
    assert not [t for t, _ in observer.messages if t.startswith("autoglm/gw-b/") or t.endswith("/cmd")]


def test_the_bridge_identity_sends_commands_and_reads_replies_but_cannot_forge_them(
        acl_broker: Broker, pki: TestCA, observer: CloudClient, start_agent) -> None:
    agent, device, _ = start_agent(acl_broker, device_id="gw-b",
                                   env=tls_env(acl_broker, pki.ca_file, pki.issue("gw-b")))
    observer.wait_online(device)
    bridge = RawClient(acl_broker.tls_port, pki.ca_file, pki.issue("cloud-bridge"), client_id="bridge-test")
    try:
        bridge.subscribe("autoglm/+/reply")
        ping = command("ping", target="gw-b")
        assert bridge.publish("autoglm/gw-b/cmd", json.dumps(ping).encode()) == 0
        wait_until(lambda: "autoglm/gw-b/reply" in bridge.topics(), 30, "the reply, read by the bridge")
        assert observer.wait_terminal(ping["id"])["status"] == "succeeded"
        assert bridge.publish("autoglm/gw-b/reply", b"{}") == NOT_AUTHORIZED
    finally:
        bridge.close()
    assert agent.terminate() == 0


def test_an_agent_using_another_devices_certificate_is_refused_and_keeps_its_replies_stored(
        acl_broker: Broker, pki: TestCA, observer: CloudClient, start_agent) -> None:
    # device id gw-c, but the certificate says gw-a: every publish to gw-c's topics is refused
    agent, device, store = start_agent(acl_broker, device_id="gw-c",
                                       env=tls_env(acl_broker, pki.ca_file, pki.issue("gw-a")))
    wait_until(lambda: "broker refused outbox row" in agent.log_text(), 60, "the refusal logged")
    assert outbox_rows(store) >= 1, "a refused reply/event stays in the outbox"
    assert not [t for t, _ in observer.messages if t.startswith(f"autoglm/{device}/")]
    assert agent.terminate() == 0


DEBIAN_MOSQUITTO_CONF = """\
pid_file {tmp}/mosquitto.pid
persistence true
persistence_location {tmp}/
log_dest file {tmp}/mosquitto.log
include_dir {tmp}/conf.d
"""


@contextmanager
def shipped_broker(tmp_path: Path, pki: TestCA, broker_cert: CertFiles, fleet: str = FLEET) -> Iterator[int]:
    """mosquitto running the shipped snippet (deploy/mosquitto/autoglm.conf) from Debian's conf.d,
    with the fleet's ACL rendered by make_acl.py; yields the TLS port."""
    from tests.support.broker import MOSQUITTO, free_port, wait_for_port

    port = free_port()
    text = (ROOT / "deploy" / "mosquitto" / "autoglm.conf").read_text()
    for old, new in {"/etc/mosquitto/autoglm.acl": str(render_acl(tmp_path, fleet)),
                     "listener 8883": f"listener {port} 127.0.0.1",
                     "/etc/mosquitto/certs/fleet-ca.crt": str(pki.ca_file),
                     "/etc/mosquitto/certs/broker.crt": str(broker_cert.cert),
                     "/etc/mosquitto/certs/broker.key": str(broker_cert.key)}.items():
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "autoglm.conf").write_text(text)
    config = tmp_path / "mosquitto.conf"  # Debian's main file, which includes conf.d
    config.write_text(DEBIAN_MOSQUITTO_CONF.format(tmp=tmp_path) + ("user root\n" if _root() else ""))
    process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_shipped_broker_snippet_starts_in_debians_conf_d_and_admits_only_fleet_certificates(
        tmp_path: Path, pki: TestCA, broker_cert: CertFiles) -> None:
    with shipped_broker(tmp_path, pki, broker_cert) as port:
        device = RawClient(port, pki.ca_file, pki.issue("gw-a"), client_id="gw-a")
        try:
            assert device.publish("autoglm/gw-a/event", b"{}") in (0, 0x10)  # no subscriber: 0x10
            assert device.publish("autoglm/gw-b/event", b"{}") == NOT_AUTHORIZED
        finally:
            device.close()


REPLICAS = 'bridge_users = ["cloud-bridge-1", "cloud-bridge-2"]\n[groups]\nsite-a = ["gw-a"]\nsite-b = ["gw-b"]\n'


def test_a_gateway_certificate_cannot_take_over_the_bridges_or_another_gateways_session(
        tmp_path: Path, pki: TestCA, broker_cert: CertFiles) -> None:
    """Issue 19, attack 1: gw-a's certificate asks for the client id of a bridge replica, then of
    gw-b. The shipped config makes the client id the certificate's CN, so the victims keep their
    sessions (no "session taken over" disconnection) and the thief has gw-a's rights only."""
    with shipped_broker(tmp_path, pki, broker_cert, REPLICAS) as port:
        replicas = [RawClient(port, pki.ca_file, pki.issue(cn), client_id=cn)
                    for cn in ("cloud-bridge-1", "cloud-bridge-2")]
        gw_b = RawClient(port, pki.ca_file, pki.issue("gw-b"), client_id="gw-b")
        clients = [*replicas, gw_b]
        try:
            for replica in replicas:
                replica.subscribe("autoglm/+/event")
            for victim in ("cloud-bridge-1", "cloud-bridge-2", "gw-b"):
                thief = RawClient(port, pki.ca_file, pki.issue("gw-a"), client_id=victim)
                clients.append(thief)
                assert thief.publish("autoglm/gw-b/event", b"forged") == NOT_AUTHORIZED
                assert thief.publish("autoglm/gw-a/event", b"from the thief") == 0
            assert gw_b.publish("autoglm/gw-b/event", b"still connected") == 0
            for replica in replicas:  # after this message, on the same connection: any kick came first
                wait_until(lambda r=replica: (("autoglm/gw-b/event", b"still connected") in r.received), 20,
                           "gw-b's event at the bridge replica")
            assert [client.disconnects for client in (*replicas, gw_b)] == [[], [], []]
        finally:
            for client in clients:
                client.close()


def _root() -> bool:
    return os.geteuid() == 0


def test_make_acl_refuses_a_device_named_like_the_bridge(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text('[groups]\nsite = ["cloud-bridge"]\n')
    result = subprocess.run([sys.executable, str(MAKE_ACL), str(tmp_path / "fleet.toml")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "reserved" in result.stderr


def test_the_acl_from_the_registry_grants_each_gateway_only_its_assigned_groups(tmp_path: Path) -> None:
    acl = registry_acl(tmp_path).read_text()
    assert "user gw-a\ntopic read autoglm/group/site-a/cmd\n" in acl
    assert "user gw-b\ntopic read autoglm/group/site-b/cmd\n" in acl
    assert acl.count("group/site-b/cmd") == 1  # gw-b's grant only (the bridge writes group/+/cmd)


def test_make_acl_renders_one_user_block_per_grouped_gateway(tmp_path: Path) -> None:
    acl = render_acl(tmp_path, '[groups]\nsite-a = ["gw-1", "gw-2"]\nlab = ["gw-1"]\n').read_text()
    assert "user gw-1\ntopic read autoglm/group/lab/cmd\ntopic read autoglm/group/site-a/cmd\n" in acl
    assert "user gw-2\ntopic read autoglm/group/site-a/cmd\n" in acl
    assert "pattern read autoglm/%u/cmd" in acl and "%c" not in acl  # the client id is not an identity
