"""The `[mqtt]` TLS and credential keys: validated at load, resolved against the config file, and
turned into a TLS 1.2+ client context that verifies the broker. Pure apart from reading PEM files."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from autoglm_wire.errors import ConfigError
from autoglm_wire.mqtt_session import BrokerOptions, TlsOptions
from autoglm_wire.settings import BrokerConfig, ReconnectConfig, read_password
from edge_agent.config import load_config
from tests.security.pki import TestCA


def agent_config(tmp_path: Path, mqtt: str) -> Path:
    path = tmp_path / "edge-agent.toml"
    path.write_text(f'device_id = "gw-1"\n[mqtt]\n{mqtt}\n[model]\npath = "m.gguf"\n')
    return path


def test_a_client_certificate_without_its_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        load_config(agent_config(tmp_path, 'tls_cert_file = "dev.crt"'))


def test_tls_files_are_relative_to_the_config_file_and_credentials_stay_credentials(tmp_path: Path) -> None:
    mqtt = 'tls_ca_file = "pki/ca.crt"\ntls_cert_file = "pki/dev.crt"\ntls_key_file = "credential:device-key"'
    config = load_config(agent_config(tmp_path, mqtt)).mqtt
    assert config.uses_tls
    assert config.tls_ca_file == tmp_path / "pki" / "ca.crt"
    assert str(config.tls_key_file) == "credential:device-key"


def test_tls_is_off_unless_asked_for() -> None:
    assert not BrokerConfig().uses_tls
    assert BrokerConfig(tls=True).uses_tls


def test_a_credential_is_read_from_the_systemd_credentials_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("hunter2\nignored second line\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_password(BrokerConfig(password_file=Path("credential:mqtt-password"))) == "hunter2"


def test_a_credential_outside_systemd_is_an_error_that_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="LoadCredential=mqtt-password"):
        read_password(BrokerConfig(password_file=Path("credential:mqtt-password")))


def test_the_password_never_appears_in_the_options_repr(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("hunter2")
    options = BrokerOptions.from_config(BrokerConfig(username="gw", password_file=tmp_path / "pw"),
                                        ReconnectConfig(), client_id="gw")
    assert options.password == "hunter2"
    assert "hunter2" not in repr(options)


def test_the_tls_context_needs_tls_1_2_and_checks_the_host_name_by_default(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    device = ca.issue("gw-1")
    context = TlsOptions(ca.ca_file, device.cert, device.key).context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    config = BrokerConfig(tls_ca_file=ca.ca_file, tls_insecure_skip_hostname_check=True)
    insecure = TlsOptions.from_config(config).context()
    assert not insecure.check_hostname and insecure.verify_mode == ssl.CERT_REQUIRED


def test_an_unreadable_tls_file_is_a_config_error_naming_the_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="check the files exist"):
        TlsOptions(ca_file=tmp_path / "missing.crt").context()
