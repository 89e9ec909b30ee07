"""Pure parts of issue #14's device side: the `model` params, the canary's checks, the slots and
the journal on a real SQLite file (no broker, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from autoglm_wire.errors import InvalidCommand
from autoglm_wire.model_command import CanaryPrompt, ModelParams
from autoglm_wire.protocol import parse_command
from edge_agent.canary import speed_problem, text_problem
from edge_agent.model_deploy import file_name
from edge_agent.model_pull import target_path
from edge_agent.model_slots import ModelSlots, Slot
from edge_agent.sqlite_file import SqliteFile

SHA = "a" * 64
DEPLOY = {"action": "deploy", "name": "glm-v2", "url": "https://bridge.lan/artifacts/x?token=abc", "sha256": SHA,
          "size": 10}


def test_deploy_params_take_the_contract_fields_and_defaults() -> None:
    params = ModelParams.model_validate({**DEPLOY, "canary": {"prompts": [{"prompt": "hi"}]}, "rollout": "r1"})
    assert params.canary is not None and params.canary.min_speed_ratio == 0.5
    prompt = params.canary.prompts[0]
    assert (prompt.max_tokens, prompt.timeout_s) == (16, 60.0)
    assert ModelParams.model_validate({"action": "list"}).action == "list"
    assert ModelParams.model_validate({"action": "rollback", "rollout": "r1"}).rollout == "r1"


@pytest.mark.parametrize("change", [
    {"name": ".hidden"}, {"name": "a/b"}, {"name": "x" * 65}, {"url": "ftp://x/y"}, {"url": "file:///etc/passwd"},
    {"sha256": "A" * 64}, {"sha256": "a" * 63}, {"size": 0}, {"size": None}, {"rollout": "r" * 65},
    {"canary": {"prompts": [{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}]}},
    {"canary": {"prompts": [{}]}}, {"canary": {"prompts": [{"prompt": "a", "regex": "("}]}},
    {"canary": {"prompts": [{"prompt": "a", "max_tokens": 513}]}},
    {"canary": {"prompts": [{"prompt": "a", "timeout_s": 0}]}}, {"canary": {"min_speed_ratio": 1.5}},
    {"canary": {"prompts": [{"prompt": "a"}] * 17}}, {"extra": 1},
])
def test_invalid_deploy_params_are_refused(change: dict) -> None:
    with pytest.raises(ValidationError):
        ModelParams.model_validate({k: v for k, v in {**DEPLOY, **change}.items() if v is not None})


@pytest.mark.parametrize("params", [{"action": "list", "rollout": "r"}, {"action": "rollback", "name": "x"},
                                    {"action": "remove"}])
def test_params_of_another_action_are_refused_as_invalid_commands(params: dict) -> None:
    envelope = {"v": 1, "id": "c1", "kind": "model", "created_at": "2026-11-21T10:00:00Z", "params": params}
    payload = json.dumps(envelope).encode()
    with pytest.raises(InvalidCommand):
        parse_command(payload, 1 << 20)


def test_the_file_of_a_deployed_model_stays_in_the_models_directory(tmp_path: Path) -> None:
    for name in ("glm-v2", "-dash", "_under", "glm.gguf"):
        path = target_path(tmp_path, file_name(name, SHA))
        assert path.parent == tmp_path.resolve() and path.name.endswith(".gguf")
    assert file_name("glm.gguf", SHA) == "aaaaaaaaaaaa-glm.gguf"


def test_text_checks_regex_and_json_schema() -> None:
    schema = {"type": "object", "required": ["ok"]}
    assert text_problem("hello", CanaryPrompt(prompt="p", regex="ell")) is None
    assert "regex" in (text_problem("hello", CanaryPrompt(prompt="p", regex="^x")) or "")
    assert text_problem('{"ok": 1}', CanaryPrompt(prompt="p", json_schema=schema)) is None
    assert "not JSON" in (text_problem("nope", CanaryPrompt(prompt="p", json_schema=schema)) or "")
    assert "validate" in (text_problem('{"no": 1}', CanaryPrompt(prompt="p", json_schema=schema)) or "")


def test_speed_is_compared_with_the_baseline_of_the_same_activation() -> None:
    assert speed_problem(60.0, 100.0, 0.5) is None
    assert "below 0.5 x" in (speed_problem(40.0, 100.0, 0.5) or "")
    assert speed_problem(1.0, None, 0.5) is None  # no baseline: nothing to compare with
    assert speed_problem(1.0, 100.0, 0.0) is None


def test_slots_keep_the_active_and_previous_and_prune_files_inside_the_models_dir_only(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    outside = tmp_path / "config-model.gguf"
    outside.write_bytes(b"c")
    files = [outside] + [models / f"m{i}.gguf" for i in range(3)]
    for path in files[1:]:
        path.write_bytes(b"m")
    file = SqliteFile(tmp_path / "agent.db")
    slots = ModelSlots(file, models, keep=2)
    made = [Slot(f"m{i}", path, str(i) * 64, 1) for i, path in enumerate(files)]
    assert slots.active() is None and slots.previous() is None
    slots.activate(made[0])
    slots.activate(made[1], rollout="r1")
    assert [s.name for s in slots.slots()] == ["m1", "m0"] and slots.rollout() == "r1"
    assert slots.activate(made[2]) == [] and outside.exists()  # the config's file is never deleted
    assert slots.activate(made[3]) == [files[1].resolve()] and not files[1].exists()
    assert [s.name for s in slots.slots()] == ["m3", "m2"] and slots.rollout() is None
    slots.activate(made[2])  # a rollback: the previous becomes active
    assert slots.active() == slots.slots()[0] and slots.active().name == "m2" and slots.previous().name == "m3"
    file.close()


def test_the_journal_and_the_switch_commit_together(tmp_path: Path) -> None:
    file = SqliteFile(tmp_path / "agent.db")
    slots = ModelSlots(file, tmp_path / "models", keep=2)
    old, new = Slot("old", tmp_path / "old.gguf", "1" * 64, 1), Slot("new", tmp_path / "new.gguf", "2" * 64, 2)
    slots.activate(old)
    slots.begin("c1", "deploy", "download", new, "r1")
    slots.advance("c1", "canary")
    entry = slots.journal()
    assert entry is not None and (entry.phase, entry.target.name, entry.rollout) == ("canary", "new", "r1")
    assert slots.active().name == "old"
    slots.activate(new, "r1", command_id="c1")
    assert slots.journal().phase == "active" and slots.active().name == "new"
    slots.end("c1")
    assert slots.journal() is None
    file.close()
