"""The environment overlay of autoglm_wire.settings: `<PREFIX><KEY>` variables over a TOML file.

Pure tests: the environment is a dict passed in, never the process's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from autoglm_wire.errors import ConfigError
from autoglm_wire.settings import Section, TomlSettings, deep_merge, env_overlay, load_toml_settings
from cloud_bridge.config import BridgeConfig
from edge_agent.config import AgentConfig

EXAMPLE = "EDGE_AGENT_MQTT__GROUPS='[\"lab\"]'"

MINIMAL = """
device_id = "pi-7"

[model]
path = "/opt/glm.gguf"

[mqtt]
host = "broker.lan"
port = 8883
groups = ["old"]
"""


def overlay(environ: dict[str, str], model: type[BaseModel] = AgentConfig, prefix: str = "EDGE_AGENT_") -> dict:
    return env_overlay(model, prefix, environ, EXAMPLE)


def load(tmp_path: Path, environ: dict[str, str], text: str = MINIMAL) -> AgentConfig:
    path = tmp_path / "edge-agent.toml"
    path.write_text(text, encoding="utf-8")
    return load_toml_settings(AgentConfig, path, hint="no hint", env_example=EXAMPLE, environ=environ)


class Point(Section):
    x: int = 0
    y: int = 0


class Shapes(TomlSettings):
    env_prefix = "SHAPES_"

    origin: Point = Field(default_factory=Point)
    named: dict[str, Point] = Field(default_factory=dict)
    tags: list[str] | None = None
    pair: tuple[int, int] = (0, 0)
    ids: set[int] = Field(default_factory=set)
    label: str | None = None
    size: int | str = 1


def test_a_nested_variable_sets_one_key_and_keeps_the_files_others(tmp_path: Path) -> None:
    config = load(tmp_path, {"EDGE_AGENT_MQTT__HOST": "other.lan"})
    assert config.mqtt.host == "other.lan"
    assert config.mqtt.port == 8883
    assert config.mqtt.groups == ["old"]


def test_a_whole_table_as_json_merges_into_the_files_table(tmp_path: Path) -> None:
    config = load(tmp_path, {"EDGE_AGENT_MQTT": '{"port": 1884}'})
    assert (config.mqtt.host, config.mqtt.port) == ("broker.lan", 1884)


def test_a_deeper_variable_wins_over_a_whole_table() -> None:
    environ = {"EDGE_AGENT_MQTT__PORT": "1885", "EDGE_AGENT_MQTT": '{"port": 1884, "host": "a"}'}
    assert overlay(environ) == {"mqtt": {"port": "1885", "host": "a"}}


def test_lists_and_tables_are_json_and_scalars_stay_strings() -> None:
    environ = {"EDGE_AGENT_MQTT__GROUPS": '["lab", "floor-2"]', "EDGE_AGENT_MQTT__PORT": "1884",
               "EDGE_AGENT_MODEL__N_GPU_LAYERS": "20", "EDGE_AGENT_DEVICE_ID": "pi-8"}
    assert overlay(environ) == {"mqtt": {"groups": ["lab", "floor-2"], "port": "1884"},
                                "model": {"n_gpu_layers": "20"}, "device_id": "pi-8"}


def test_a_string_that_looks_like_json_stays_a_string() -> None:
    environ = {"EDGE_AGENT_MQTT__USERNAME": '{"not": "parsed"}', "SHAPES_LABEL": "[1]", "SHAPES_SIZE": "2"}
    assert overlay(environ) == {"mqtt": {"username": '{"not": "parsed"}'}}
    assert overlay(environ, Shapes, "SHAPES_") == {"label": "[1]", "size": "2"}


def test_models_dicts_tuples_sets_and_optional_lists_are_json() -> None:
    environ = {"SHAPES_ORIGIN": '{"x": 1}', "SHAPES_NAMED": '{"a": {"y": 2}}', "SHAPES_TAGS": '["t"]',
               "SHAPES_PAIR": "[3, 4]", "SHAPES_IDS": "[5]"}
    assert overlay(environ, Shapes, "SHAPES_") == {"origin": {"x": 1}, "named": {"a": {"y": 2}}, "tags": ["t"],
                                                   "pair": [3, 4], "ids": [5]}


def test_a_key_below_a_dict_takes_the_type_of_the_dicts_values() -> None:
    environ = {"SHAPES_NAMED__A": '{"x": 1}', "SHAPES_NAMED__B__Y": "2"}
    assert overlay(environ, Shapes, "SHAPES_") == {"named": {"a": {"x": 1}, "b": {"y": "2"}}}
    environ = {"EDGE_AGENT_TEMPLATES__GREET__VARIABLES": '["name"]', "EDGE_AGENT_TEMPLATES__GREET__SYSTEM": "hi"}
    assert overlay(environ) == {"templates": {"greet": {"variables": ["name"], "system": "hi"}}}


def test_names_match_in_any_case() -> None:
    environ = {"edge_agent_mqtt__host": "a", "Edge_Agent_Model__N_Ctx": "128", "EDGE_AGENT_LOG_LEVEL": "debug"}
    assert overlay(environ) == {"mqtt": {"host": "a"}, "model": {"n_ctx": "128"}, "log_level": "debug"}


def test_a_variable_that_names_no_config_key_is_ignored(tmp_path: Path) -> None:
    knobs = {"EDGE_AGENT_FAULT_POINT": "after_accept", "EDGE_AGENT_SLOW_TESTS": "1",
             "EDGE_AGENT_FAULT_REPORT": "/tmp/r.jsonl", "EDGE_AGENT_": "x", "EDGE_AGENT_MQTT_HOST": "single underscore",
             "OTHER_MQTT__HOST": "x"}
    assert overlay(knobs) == {}
    assert load(tmp_path, knobs).mqtt.host == "broker.lan"


def test_an_unknown_key_below_a_config_key_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.hsot") as caught:
        load(tmp_path, {"EDGE_AGENT_MQTT__HSOT": "broker.lan"})
    assert "EDGE_AGENT_* environment overrides" in str(caught.value)


def test_an_unknown_key_in_a_json_table_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.hsot"):
        load(tmp_path, {"EDGE_AGENT_MQTT": '{"hsot": "broker.lan"}'})


@pytest.mark.parametrize("name, value", [("EDGE_AGENT_MQTT__GROUPS", "lab"), ("EDGE_AGENT_MQTT", "host=x"),
                                         ("EDGE_AGENT_SECURITY__TRUSTED_KEYS", "{k: v}")])
def test_a_value_that_must_be_json_and_is_not_is_a_config_error_naming_the_variable(
    tmp_path: Path, name: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {name: value})
    message = str(caught.value)
    assert f"environment variable {name} is not valid JSON" in message
    assert EXAMPLE in message, "the message shows a good value"


def test_the_bridge_reads_only_its_own_prefix() -> None:
    environ = {"CLOUD_BRIDGE_DISPATCH__QOS": "2", "EDGE_AGENT_LOG_LEVEL": "debug", "CLOUD_BRIDGE_FAULT": "x"}
    assert overlay(environ, BridgeConfig, BridgeConfig.env_prefix) == {"dispatch": {"qos": "2"}}


def test_a_config_built_in_code_does_not_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUD_BRIDGE_DISPATCH__QOS", "2")
    assert BridgeConfig().dispatch.qos == 1


def test_deep_merge_merges_tables_and_replaces_everything_else() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [2], "e": {"f": 1}}, "d": {"g": 1}}) == {
        "a": {"b": 1, "c": [2], "e": {"f": 1}}, "d": {"g": 1}}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}, "the inputs are not changed"
