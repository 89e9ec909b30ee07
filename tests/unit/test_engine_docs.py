"""What the engine adds to the CLI and the config is documented in README.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import build_parser
from edge_agent.engine.settings import ModelConfig, OnnxModelConfig
from edge_agent.engine.templates import PromptTemplate

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_edge_agent_subcommand_is_documented_in_the_readme() -> None:
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert not [name for name in subcommands if f"edge-agent {name}" not in README]


@pytest.mark.parametrize(("section", "model"), [("model", ModelConfig), ("onnx.models.NAME", OnnxModelConfig),
                                                ("templates.NAME", PromptTemplate)])
def test_every_engine_config_key_is_in_the_readme_config_table(section: str, model: type) -> None:
    missing = [key for key in model.model_fields
               if f"`{section}.{key}`" not in README and f"`{key}`" not in README and f"`.{key}`" not in README]
    assert not missing, f"undocumented [{section}] keys: {missing}"
