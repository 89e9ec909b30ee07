"""Transport security: TLS 1.2+ with the broker verified, mTLS with a certificate per device, the
broker password from a file or a systemd credential. Real mosquitto, real certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.conftest import password_file, tls_env, wait_until
from tests.security.pki import CertFiles, TestCA
from tests.support.broker import Broker, TlsListener
from tests.support.cloud import CloudClient, command

pytestmark = pytest.mark.integration


def test_an_agent_with_its_device_certificate_connects_over_mtls_and_answers_a_ping(
        mtls_broker: Broker, pki: TestCA, start_agent) -> None:
    cloud = CloudClient(mtls_broker.port)  # the observer sits on the broker's plain local listener
    try:
        agent, device, _ = start_agent(mtls_broker, device_id="gw-mtls",
                                       env=tls_env(mtls_broker, pki.ca_file, pki.issue("gw-mtls")))
        cloud.wait_online(device)
        ping = command("ping")
        cloud.send(device, ping)
        assert cloud.wait_terminal(ping["id"])["status"] == "succeeded"
        assert agent.terminate() == 0, agent.log_text()
    finally:
        cloud.close()


def test_an_agent_that_trusts_another_ca_logs_why_it_cannot_connect_and_keeps_retrying(
        mtls_broker: Broker, pki: TestCA, tmp_path: Path, start_agent) -> None:
    stranger = TestCA(tmp_path / "stranger", "some other CA")
    agent, _, _ = start_agent(mtls_broker, env=tls_env(mtls_broker, stranger.ca_file, pki.issue("gw-wrong-ca")))
    wait_until(lambda: agent.log_text().count("CERTIFICATE_VERIFY_FAILED") >= 2, 60, "two failed attempts logged")
    log = agent.log_text()
    assert "is mqtt.tls_ca_file the CA that signed the broker's certificate?" in log
    assert "retrying in" in log
    assert agent.process is not None and agent.process.poll() is None, "the agent must keep running"
    assert agent.terminate() == 0, log


def test_an_agent_without_a_client_certificate_is_refused_and_keeps_retrying(
        mtls_broker: Broker, pki: TestCA, start_agent) -> None:
    agent, _, _ = start_agent(mtls_broker, env=tls_env(mtls_broker, pki.ca_file, None))
    hint = "was our client certificate refused?"
    wait_until(lambda: agent.log_text().count(hint) >= 2, 60, "two refused attempts logged")
    assert "peer did not return a certificate" in mtls_broker.log.read_text()
    assert agent.process is not None and agent.process.poll() is None, "the agent must keep running"
    assert agent.terminate() == 0, agent.log_text()


def test_a_certificate_from_another_ca_is_refused_by_the_broker(
        mtls_broker: Broker, pki: TestCA, tmp_path: Path, start_agent) -> None:
    forger = TestCA(tmp_path / "forger", "forger CA")
    agent, _, _ = start_agent(mtls_broker, env=tls_env(mtls_broker, pki.ca_file, forger.issue("gw-forged")))
    wait_until(lambda: agent.log_text().count("retrying in") >= 2, 60, "two refused attempts logged")
    assert "Success" not in agent.log_text() and "connected to" not in agent.log_text()
    assert agent.terminate() == 0, agent.log_text()


def test_a_wrong_password_is_refused_with_a_reason_that_names_the_credentials(
        tmp_path: Path, pki: TestCA, broker_cert: CertFiles, start_agent) -> None:
    passwords = password_file(tmp_path / "passwd", {"gw-badpass": "the-right-one"})
    listener = TlsListener(pki.ca_file, broker_cert.cert, broker_cert.key, password_file=passwords)
    broker = Broker(tmp_path / "broker", tls=listener).start()
    (tmp_path / "wrong").write_text("not-the-right-one\n")
    try:
        env = tls_env(broker, pki.ca_file, pki.issue("gw-badpass"), mqtt__username="gw-badpass",
                      mqtt__password_file=str(tmp_path / "wrong"))
        agent, _, _ = start_agent(broker, device_id="gw-badpass", env=env)
        wait_until(lambda: agent.log_text().count("broker refused the connection") >= 2, 60, "refusals logged")
        assert "check credentials" in agent.log_text()
        assert "not-the-right-one" not in agent.log_text()
        assert agent.terminate() == 0
    finally:
        broker.stop()
