"""The device policy: merging `config` commands, filling sampling defaults, clamping by [limits]."""

from __future__ import annotations

from autoglm_wire.protocol import ChatParams, ConfigParams
from edge_agent.policy import Policy, apply_defaults, initial, merge

CAP = 4096


def chat(**fields: object) -> ChatParams:
    return ChatParams.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_a_config_command_changes_only_the_fields_it_sets() -> None:
    policy = merge(Policy(), ConfigParams(temperature=0.2), CAP)
    assert policy.temperature == 0.2
    assert policy.max_tokens == Policy().max_tokens and policy.top_p == Policy().top_p


def test_successive_config_commands_accumulate() -> None:
    policy = merge(merge(Policy(), ConfigParams(temperature=0.2), CAP), ConfigParams(max_tokens=64), CAP)
    assert (policy.temperature, policy.max_tokens) == (0.2, 64)


def test_a_command_without_sampling_fields_takes_the_policy_defaults() -> None:
    params = apply_defaults(chat(), Policy(max_tokens=32, temperature=0.1, top_p=0.5))
    assert (params.max_tokens, params.temperature, params.top_p) == (32, 0.1, 0.5)


def test_fields_the_command_sets_win_over_the_policy() -> None:
    params = apply_defaults(chat(temperature=1.5), Policy(temperature=0.1, max_tokens=32))
    assert params.temperature == 1.5
    assert params.max_tokens == 32


def test_the_stored_policy_wins_over_the_config_files_telemetry_interval() -> None:
    assert initial({}, 30.0, CAP).telemetry_interval_s == 30.0
    assert initial({"telemetry_interval_s": 5.0}, 30.0, CAP).telemetry_interval_s == 5.0


def test_a_stored_max_tokens_above_a_lowered_limit_is_clamped_at_load() -> None:
    assert initial({"max_tokens": 4096, "temperature": 0.3}, 30.0, 300).max_tokens == 300
    assert initial({}, 30.0, 100).max_tokens == 100  # the built-in default 256 too
    assert initial({"max_tokens": 200}, 30.0, 300).max_tokens == 200


def test_a_change_is_clamped_by_the_limit() -> None:
    policy = merge(Policy(max_tokens=50), ConfigParams(temperature=0.1), 40)
    assert (policy.max_tokens, policy.temperature) == (40, 0.1)
