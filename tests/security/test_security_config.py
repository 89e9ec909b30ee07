"""The agent's `[security]` and `[limits]` keys: validated at load, key files relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm_wire.errors import ConfigError
from edge_agent.config import load_config

KEY = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik="  # base64 of 32 bytes


def agent_config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "edge-agent.toml"
    path.write_text(f'device_id = "gw-1"\n[model]\npath = "m.gguf"\n{extra}\n')
    return path


def test_signatures_are_off_by_default_and_limits_have_defaults(tmp_path: Path) -> None:
    config = load_config(agent_config(tmp_path, ""))
    assert not config.security.require_signed_commands and config.security.trusted_keys == {}
    assert config.limits.max_tokens == 4096


def test_requiring_signatures_without_a_trusted_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs at least one entry in trusted_keys"):
        load_config(agent_config(tmp_path, "[security]\nrequire_signed_commands = true"))


def test_inline_keys_stay_and_key_files_are_relative_to_the_config(tmp_path: Path) -> None:
    extra = f'[security]\nrequire_signed_commands = true\ntrusted_keys = {{a = "{KEY}", b = "keys/b.pem"}}'
    keys = load_config(agent_config(tmp_path, extra)).security.trusted_keys
    assert keys == {"a": KEY, "b": str(tmp_path / "keys" / "b.pem")}


def test_a_ledger_that_forgets_before_the_replay_window_closes_is_a_config_error(tmp_path: Path) -> None:
    keys = f'[security]\ntrusted_keys = {{a = "{KEY}"}}\nreplay_window_s = 86400\nmax_clock_skew_s = 300\n'
    with pytest.raises(ConfigError, match="raise ledger_days or lower replay_window_s"):
        load_config(agent_config(tmp_path, "[store]\nledger_days = 1\n" + keys))
    assert load_config(agent_config(tmp_path, "[store]\nledger_days = 1.01\n" + keys)).store.ledger_days == 1.01
    assert load_config(agent_config(tmp_path, "[store]\nledger_days = 0.5\n")).store.ledger_days == 0.5  # unsigned


def test_the_shipped_production_example_requires_signed_commands() -> None:
    import tomllib

    shipped = tomllib.loads((Path(__file__).resolve().parents[2] / "systemd" / "edge-agent.toml").read_text())
    assert shipped["security"]["require_signed_commands"] is True
    assert shipped["security"]["trusted_keys"]


def test_every_security_limit_and_tls_key_is_documented_in_the_readme_and_security_doc() -> None:
    from autoglm_wire.settings import BrokerConfig
    from cloud_bridge.config import SigningConfig
    from edge_agent.config import LimitsConfig, SecurityConfig

    root = Path(__file__).resolve().parents[2]
    readme, security_doc = (root / "README.md").read_text(), (root / "docs" / "security.md").read_text()
    keys = [*SecurityConfig.model_fields, *LimitsConfig.model_fields,
            *(k for k in BrokerConfig.model_fields if k.startswith("tls") or k == "password_file")]
    missing = [k for k in keys if k not in readme or k not in security_doc]
    missing += [k for k in SigningConfig.model_fields if k not in security_doc]
    assert not missing, f"undocumented config keys: {missing}"
