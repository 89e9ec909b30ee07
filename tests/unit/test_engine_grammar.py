"""response_format schemas llama.cpp cannot compile are the command's fault: `invalid_command`."""

from __future__ import annotations

import pytest

from autoglm_wire.errors import InvalidCommand
from edge_agent.engine.llama import _compile_grammar


@pytest.mark.parametrize("schema", [{"Q": None, "i": None, "N": None}, {" ": False}])
def test_a_schema_the_grammar_converter_does_not_recognise_is_invalid_command(schema: dict) -> None:
    with pytest.raises(InvalidCommand, match="cannot be compiled to a llama.cpp grammar"):
        _compile_grammar(schema)


def test_a_plain_object_schema_compiles() -> None:
    assert _compile_grammar({"type": "object", "properties": {"a": {"type": "string"}}}) is not None
