"""BridgeConfig: TOML + CLOUD_BRIDGE_ environment, unknown keys rejected, paths relative to the file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from autoglm_wire.settings import read_password
from cloud_bridge.config import load_config
from cloud_bridge.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    return path


def test_defaults_apply_when_the_file_is_empty(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.mqtt.client_id == "cloud-bridge" and config.mqtt.topic_prefix == "autoglm"
    assert (config.dispatch.resend_interval_s, config.dispatch.default_expiry_s, config.dispatch.qos) == (5, 3600, 1)
    assert config.store.path == tmp_path / "cloud-bridge.db"


def test_the_environment_wins_over_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUD_BRIDGE_MQTT__PORT", "2883")
    monkeypatch.setenv("CLOUD_BRIDGE_DISPATCH__QOS", "2")
    config = load_config(write(tmp_path, "[mqtt]\nport = 1884\n"))
    assert config.mqtt.port == 2883 and config.dispatch.qos == 2


def test_a_misspelt_key_fails_with_its_name(tmp_path):
    with pytest.raises(ConfigError, match="mqtt.hots"):
        load_config(write(tmp_path, "[mqtt]\nhots = 'x'\n"))


def test_qos_0_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="dispatch.qos"):
        load_config(write(tmp_path, "[dispatch]\nqos = 0\n"))


def test_a_missing_file_says_where_to_find_an_example(tmp_path):
    with pytest.raises(ConfigError, match="example"):
        load_config(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    config = load_config(write(tmp_path, "[store]\npath = 'data/r.db'\n[mqtt]\npassword_file = 'pw'\n"))
    assert config.store.path == tmp_path / "data" / "r.db"
    assert read_password(config.mqtt) == "s3cret"


def test_retention_counts_back_from_now_and_zero_keeps_forever(tmp_path):
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    retention = load_config(write(tmp_path, "[retention]\ndays = 30\nchunk_days = 0.5\n")).retention
    assert retention.cutoffs(now) == (now - timedelta(days=30), now - timedelta(hours=12), now - timedelta(days=30),
                                      now - timedelta(days=365))
    forever = load_config(write(tmp_path, "[retention]\ndays = 0\nchunk_days = 0\ndead_letter_days = 0\n"
                                          "audit_days = 0\n")).retention
    assert forever.cutoffs(now) == (None, None, None, None)
    with pytest.raises(ConfigError, match="days"):
        load_config(write(tmp_path, "[retention]\ndays = -1\n"))
