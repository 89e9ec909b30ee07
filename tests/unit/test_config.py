"""Agent configuration: a TOML file, overridden by EDGE_AGENT_* variables, validated at load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autoglm_wire.errors import ConfigError
from edge_agent.config import load_config

MINIMAL = """
device_id = "pi-7"

[model]
path = "models/glm.gguf"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EDGE_AGENT_* variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("EDGE_AGENT_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "edge-agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_a_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.device_id == "pi-7"
    assert config.mqtt.host == "127.0.0.1"
    assert config.mqtt.port == 1883
    assert config.mqtt.topic_prefix == "autoglm"
    assert config.mqtt.groups == []
    assert (config.reconnect.initial_s, config.reconnect.multiplier, config.reconnect.max_s) == (1.0, 2.0, 30.0)
    assert config.store.synchronous == "full"
    assert config.model.n_gpu_layers == "auto"
    assert config.log_level == "info"


def test_values_in_the_file_are_used(tmp_path: Path) -> None:
    text = MINIMAL + '\n[mqtt]\nhost = "broker.lan"\nport = 8883\ngroups = ["lab"]\n'
    config = load_config(write(tmp_path, text))
    assert config.mqtt.host == "broker.lan"
    assert config.mqtt.port == 8883
    assert config.mqtt.groups == ["lab"]


def test_an_environment_variable_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL + '\n[mqtt]\nhost = "broker.lan"\nport = 8883\n'
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "1884")
    config = load_config(write(tmp_path, text))
    assert config.mqtt.port == 1884
    assert config.mqtt.host == "broker.lan", "other keys of the section still come from the file"


def test_a_list_comes_from_the_environment_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT__GROUPS", '["lab", "floor-2"]')
    config = load_config(write(tmp_path, MINIMAL + '\n[mqtt]\ngroups = ["old"]\n'))
    assert config.mqtt.groups == ["lab", "floor-2"]


def test_gpu_layers_from_the_environment_become_an_int(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_MODEL__N_GPU_LAYERS", "20")
    config = load_config(write(tmp_path, MINIMAL))
    assert config.model.n_gpu_layers == 20
    assert config.model.path == (tmp_path / "models" / "glm.gguf").resolve(), "model.path still comes from the file"


def test_a_top_level_key_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_DEVICE_ID", "pi-8")
    assert load_config(write(tmp_path, MINIMAL)).device_id == "pi-8"


def test_an_invalid_environment_value_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "not-a-port")
    assert "mqtt.port" in config_error(write(tmp_path, MINIMAL))


def test_an_unknown_key_in_a_section_is_an_error_naming_it(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, MINIMAL + '\n[mqtt]\nhots = "broker.lan"\n'))
    assert "mqtt.hots" in message


def test_an_unknown_top_level_key_is_an_error_naming_it(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, 'devcie_name = "x"\n' + MINIMAL))
    assert "devcie_name" in message


@pytest.mark.parametrize("device_id", ["a/b", "", "x" * 65, "a+b"])
def test_a_device_id_that_is_not_a_topic_level_is_a_config_error(tmp_path: Path, device_id: str) -> None:
    text = MINIMAL.replace('"pi-7"', f'"{device_id}"')
    assert "device_id" in config_error(write(tmp_path, text))


def test_a_missing_model_path_is_a_config_error(tmp_path: Path) -> None:
    assert "model" in config_error(write(tmp_path, 'device_id = "pi-7"\n'))


@pytest.mark.parametrize(
    "section",
    [
        "[mqtt]\nport = 70000\n",
        '[mqtt]\ntopic_prefix = "a/#"\n',
        '[mqtt]\ngroups = ["a/b"]\n',
        "[mqtt]\nwill_delay_s = 7200\nsession_expiry_s = 3600\n",
        "[mqtt]\nstream_interval_ms = -1\n",
        "[reconnect]\nmultiplier = 0.5\n",
        '[store]\nsynchronous = "off"\n',
    ],
)
def test_out_of_range_values_are_config_errors(tmp_path: Path, section: str) -> None:
    config_error(write(tmp_path, MINIMAL + "\n" + section))


def test_relative_paths_resolve_against_the_folder_of_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc" / "edge"
    folder.mkdir(parents=True)
    text = MINIMAL + '\n[store]\npath = "state/agent.db"\n[mqtt]\npassword_file = "secret"\n'
    config = load_config(write(folder, text))
    assert config.store.path == (folder / "state" / "agent.db").resolve()
    assert config.model.path == (folder / "models" / "glm.gguf").resolve()
    assert config.mqtt.password_file == (folder / "secret").resolve()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    text = MINIMAL.replace('"models/glm.gguf"', '"/opt/models/glm.gguf"') + '\n[store]\npath = "/var/lib/e.db"\n'
    config = load_config(write(tmp_path, text))
    assert config.model.path == Path("/opt/models/glm.gguf")
    assert config.store.path == Path("/var/lib/e.db")


def test_a_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert str(missing) in config_error(missing)


def test_a_file_that_is_not_toml_is_a_config_error(tmp_path: Path) -> None:
    assert "not valid TOML" in config_error(write(tmp_path, "device_id = \n[model\n"))


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.replace("pi-7", "pi-\xe9").encode("latin-1"))
    config_error(path)


def test_a_config_path_that_is_a_folder_is_a_config_error(tmp_path: Path) -> None:
    config_error(tmp_path)


def test_a_list_variable_that_is_not_json_is_a_config_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT__GROUPS", "lab")
    assert "EDGE_AGENT_MQTT__GROUPS" in config_error(write(tmp_path, MINIMAL))
