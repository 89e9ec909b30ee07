"""Fixtures of the security suite: a test PKI, mosquitto with an authenticated TLS listener, and the
environment that points an agent at it (every agent key can be set by an `EDGE_AGENT_` variable)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.security.pki import CertFiles, TestCA
from tests.support.broker import Broker, TlsListener


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def broker_cert(pki: TestCA) -> CertFiles:
    return pki.issue("broker", server=True)


@pytest.fixture(scope="session")
def mtls_broker(tmp_path_factory: pytest.TempPathFactory, pki: TestCA, broker_cert: CertFiles) -> Iterator[Broker]:
    """TLS listener with `require_certificate true`; the certificate's CN is the client's username."""
    listener = TlsListener(pki.ca_file, broker_cert.cert, broker_cert.key, use_identity_as_username=True)
    broker = Broker(tmp_path_factory.mktemp("mtls-broker"), tls=listener).start()
    yield broker
    broker.stop()


def tls_env(broker: Broker, ca_file: Path | None, client: CertFiles | None, **more: str) -> dict[str, str]:
    """`EDGE_AGENT_MQTT__*` variables that send an agent to the broker's TLS listener."""
    env = {"EDGE_AGENT_MQTT__PORT": str(broker.tls_port), "EDGE_AGENT_MQTT__TLS": "true"}
    if ca_file is not None:
        env["EDGE_AGENT_MQTT__TLS_CA_FILE"] = str(ca_file)
    if client is not None:
        env["EDGE_AGENT_MQTT__TLS_CERT_FILE"] = str(client.cert)
        env["EDGE_AGENT_MQTT__TLS_KEY_FILE"] = str(client.key)
    return {**env, **{f"EDGE_AGENT_{k.upper()}": v for k, v in more.items()}}


MAKE_ACL = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "make_acl.py"


def render_acl(folder: Path, fleet: str) -> Path:
    """The shipped ACL template rendered by the shipped `make_acl.py` for a fleet file's text."""
    (folder / "fleet.toml").write_text(fleet)
    result = subprocess.run([sys.executable, str(MAKE_ACL), str(folder / "fleet.toml")], capture_output=True,
                            text=True, check=True)
    acl = folder / "autoglm.acl"
    acl.write_text(result.stdout)
    return acl


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file made by `mosquitto_passwd -b` (hashed, as in production)."""
    path.write_text("")
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True, capture_output=True)
    return path


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate` every 50 ms until it holds; fail naming `what` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class RawClient:
    """A bare MQTT 5 client holding a real certificate: what a rogue device (or the bridge) can do
    with its credentials, outside the agent's code. Records reason codes of its publishes."""

    def __init__(self, port: int, ca_file: Path, identity: CertFiles, client_id: str) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from autoglm_wire.mqtt_session import TlsOptions

        self._lock = threading.Lock()
        self.received: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(TlsOptions(ca_file, identity.cert, identity.key).context())
        self.client.on_message = lambda c, u, m: self._record(self.received, (m.topic, m.payload))
        self.client.on_publish = lambda c, u, mid, reason, p: self._store(self.acks, mid, reason.value)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self._store(self.subacks, mid, [r.value for r in codes])
        self.disconnects: list[int] = []  # reason codes of every disconnection (0x8E: session taken over)
        self.client.on_disconnect = lambda c, u, flags, reason, p: self._record(self.disconnects, reason.value)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_until(self.client.is_connected, 20, f"{client_id} connected")

    def _record(self, into: list[tuple[str, bytes]], item: tuple[str, bytes]) -> None:
        with self._lock:
            into.append(item)

    def _store(self, into: dict, key: int, value: object) -> None:
        with self._lock:
            into[key] = value

    def subscribe(self, *topics: str) -> list[int]:
        """Subscribe at QoS 1; the SUBACK reason codes (mosquitto grants even what its ACL denies)."""
        _, mid = self.client.subscribe([(t, 1) for t in topics])
        wait_until(lambda: mid in self.subacks, 20, "SUBACK")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1; the PUBACK reason code (0 success, 0x10 no subscribers, 0x87 not authorized)."""
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.acks, 20, f"PUBACK for {topic}")
        return self.acks[info.mid]

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.received]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
