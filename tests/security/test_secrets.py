"""Secrets stay secret: a gateway configured with a broker password and a TLS key (both as systemd
credentials) never writes either into its log, its status, telemetry, events, replies or the
output of `check-config`; at the default log level no prompt and no generated text is logged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.security.conftest import password_file, tls_env
from tests.security.pki import CertFiles, TestCA
from tests.support.broker import Broker, TlsListener
from tests.support.cloud import CloudClient, chat, command

pytestmark = pytest.mark.integration

PASSWORD = "s3cr3t-Pa55word-7f1c"
PROMPT = "zebra-quartz-prompt-marker"


def test_no_secret_or_prompt_reaches_the_log_status_telemetry_replies_or_check_config(
        tmp_path: Path, pki: TestCA, broker_cert: CertFiles, start_agent) -> None:
    listener = TlsListener(pki.ca_file, broker_cert.cert, broker_cert.key,
                           password_file=password_file(tmp_path / "passwd", {"gw-secret": PASSWORD}))
    broker = Broker(tmp_path / "broker", tls=listener).start()
    device_cert = pki.issue("gw-secret")
    credentials = tmp_path / "credentials"  # what systemd's LoadCredential= would have made
    credentials.mkdir()
    (credentials / "mqtt-password").write_text(PASSWORD + "\n")
    (credentials / "tls-key").write_bytes(device_cert.key.read_bytes())
    key_lines = [line for line in device_cert.key.read_text().splitlines() if not line.startswith("-----")]
    secrets = [PASSWORD, *key_lines]
    env = tls_env(broker, pki.ca_file, device_cert, mqtt__username="gw-secret",
                  mqtt__password_file="credential:mqtt-password", mqtt__tls_key_file="credential:tls-key",
                  telemetry_interval_s="1")
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    cloud = CloudClient(broker.port)
    try:
        agent, device, _ = start_agent(broker, device_id="gw-secret", env=env)
        status = cloud.wait_online(device)
        job = command("chat", chat(PROMPT, max_tokens=16, seed=3))
        cloud.send(device, job)
        reply = cloud.wait_terminal(job["id"])
        assert reply["status"] == "succeeded", reply
        cloud.wait_for(lambda: cloud.on("/telemetry"), 30, "a telemetry message")
        check = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check-config", str(agent.config)],
                               env=agent.env, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        assert agent.terminate() == 0
        published = "\n".join(str(body) for _, body in cloud.messages)
        for where, text in {"log": agent.log_text(), "status": str(status), "published messages": published,
                            "check-config": check.stdout + check.stderr}.items():
            leaked = [s for s in secrets if s in text]
            assert not leaked, f"a secret reached the {where}"
        generated = reply["output"]["text"].strip()
        assert PROMPT not in agent.log_text(), "a prompt was logged at the default level"
        if len(generated) >= 12:  # long enough not to occur in a log line by chance
            assert generated not in agent.log_text(), "generated text was logged at the default level"
    finally:
        cloud.close()
        broker.stop()
