"""Configs checked before anything heavy: `check-config` on both sides opens every file the config
names (as `run`/`serve` would), reports the effective TLS state, names the file in every error; `run`
fails on a bad file before the model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoglm_wire.errors import ConfigError
from cloud_bridge import cli as bridge_cli
from cloud_bridge import preflight as bridge_preflight
from cloud_bridge.config import StoreConfig
from cloud_bridge.errors import RegistryPermission
from edge_agent import cli as agent_cli
from edge_agent.config import load_config
from edge_agent.preflight import check_agent
from tests.security.pki import TestCA

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-glm4-q4_0.gguf"


def agent_config(folder: Path, extra: str = "", mqtt: str = "") -> Path:
    path = folder / "agent.toml"
    path.write_text(f'device_id = "gw-1"\n{extra}\n[model]\npath = "{MODEL}"\n[mqtt]\n{mqtt}\n')
    return path


def test_a_missing_tls_file_is_named_with_its_key(tmp_path: Path) -> None:
    config = load_config(agent_config(tmp_path, mqtt='tls_ca_file = "pki/ca.crt"'))
    with pytest.raises(ConfigError, match=r"mqtt.tls_ca_file = .*pki/ca.crt: cannot open it: it does not exist"):
        check_agent(config)


def test_a_credential_outside_systemd_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = load_config(agent_config(tmp_path, mqtt='username = "u"\npassword_file = "credential:mqtt-password"'))
    with pytest.raises(ConfigError, match="LoadCredential=mqtt-password"):
        check_agent(config)


def test_a_model_that_is_not_a_gguf_and_a_bad_trusted_key_are_refused(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_text("not a model")
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "gw-1"\n[model]\npath = "model.gguf"\n')
    with pytest.raises(ConfigError, match="model.path = .*model.gguf: not a GGUF file"):
        check_agent(load_config(path))
    keyed = agent_config(tmp_path, mqtt="", extra="")
    keyed.write_text(keyed.read_text() + '[security]\ntrusted_keys = { k1 = "keys/k1.pub.pem" }\n')
    with pytest.raises(ConfigError, match=r"k1.*keys/k1.pub.pem"):
        check_agent(load_config(keyed))


def test_check_config_reports_tls_on_when_a_ca_file_turns_it_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ca = TestCA(tmp_path / "pki")
    config = agent_config(tmp_path, mqtt=f'tls_ca_file = "{ca.ca_file}"')
    assert agent_cli.main(["check-config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mqtt"]["tls"] is True
    assert "ok: mqtt: TLS to" in err and "ok: model.path" in err


def test_run_exits_2_on_a_bad_file_before_the_model_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    def no_engine(config: object) -> None:
        raise AssertionError("the model was loaded before the config check")

    monkeypatch.setattr(agent_cli, "_llama_engine", no_engine)
    config = agent_config(tmp_path, mqtt='tls_ca_file = "missing.crt"')
    assert agent_cli.main(["run", "--config", str(config)]) == agent_cli.EXIT_CONFIG == 2
    assert "missing.crt" in capsys.readouterr().err


def test_bridge_check_config_opens_the_token_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[store]\npath = "reg.db"\n[http]\nenabled = true\ntoken_file = "api-token"\n')
    assert bridge_cli.main(["check-config", "--config", str(config)]) == bridge_cli.EXIT_USAGE == 3
    assert "api-token" in capsys.readouterr().err
    (tmp_path / "api-token").write_text("t" * 32 + "\n")
    assert bridge_cli.main(["check-config", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mqtt"]["tls"] is False and "token_file" in err and "t" * 32 not in out + err
    assert "devices download from http://127.0.0.1:8080/artifacts/<sha256> (a loopback address" in err


def test_bridge_check_config_refuses_a_short_artifact_secret(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[store]\npath = "reg.db"\n[models]\npublic_url = "https://bridge.lan"\n')
    (tmp_path / "artifact-secret").write_text("short\n")
    assert bridge_cli.main(["check-config", "--config", str(config)]) == bridge_cli.EXIT_USAGE
    assert "secret_file" in capsys.readouterr().err
    (tmp_path / "artifact-secret").write_text("s" * 64 + "\n")
    assert bridge_cli.main(["check-config", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "devices download from https://bridge.lan/artifacts/<sha256>" in err and "loopback" not in err


def test_the_console_says_to_run_as_the_service_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge_preflight.os, "access", lambda path, mode: False)
    with pytest.raises(RegistryPermission, match="sudo -u cloud-bridge cloud-bridge devices"):
        bridge_preflight.check_registry_access(StoreConfig(path=tmp_path / "registry.db"))


def test_an_unreadable_config_says_to_run_as_the_service_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = agent_config(tmp_path)

    def denied(self: Path, encoding: str | None = None) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match="sudo -u edge-agent edge-agent"):
        load_config(config)


def test_both_programs_print_their_version(capsys: pytest.CaptureFixture) -> None:
    from autoglm_wire import __version__

    for main in (agent_cli.main, bridge_cli.main):
        with pytest.raises(SystemExit) as done:
            main(["--version"])
        assert done.value.code == 0
    assert capsys.readouterr().out.split() == ["edge-agent", __version__, "cloud-bridge", __version__]
