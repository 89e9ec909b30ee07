"""Named prompt templates: declared variables, missing/extra variables, placement of messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from autoglm_wire.errors import InvalidCommand
from edge_agent.engine.templates import PromptTemplate, apply_template

TEMPLATES = {
    "triage": PromptTemplate(system="You watch {site}. Answer in one line.", user="Reading: {reading}",
                             variables=["site", "reading"]),
}
USER = [{"role": "user", "content": "context first"}]


def test_a_template_puts_its_system_first_and_its_user_message_last() -> None:
    messages = apply_template(TEMPLATES, "triage", {"site": "pump 4", "reading": "91 C"}, USER)
    assert messages == [
        {"role": "system", "content": "You watch pump 4. Answer in one line."},
        {"role": "user", "content": "context first"},
        {"role": "user", "content": "Reading: 91 C"},
    ]


def test_variable_values_are_not_formatted_again() -> None:
    messages = apply_template(TEMPLATES, "triage", {"site": "{reading}", "reading": "{0}"}, [])
    assert messages[0]["content"] == "You watch {reading}. Answer in one line."
    assert messages[1]["content"] == "Reading: {0}"


def test_an_unknown_template_is_an_invalid_command_naming_the_known_ones() -> None:
    with pytest.raises(InvalidCommand, match="'nope' is not defined.*triage"):
        apply_template(TEMPLATES, "nope", {}, USER)


def test_missing_and_undeclared_variables_are_an_invalid_command_that_lists_them() -> None:
    with pytest.raises(InvalidCommand, match=r"missing: \['reading'\], not declared: \['color'\]"):
        apply_template(TEMPLATES, "triage", {"site": "a", "color": "red"}, USER)


@pytest.mark.parametrize("fields", [
    {"user": "hi {name}", "variables": []},
    {"user": "hi", "variables": ["name"]},
    {"user": "hi {name.attr}", "variables": ["name.attr"]},
    {"user": "unbalanced {", "variables": []},
    {"variables": []},
])
def test_a_template_whose_placeholders_do_not_match_its_declared_variables_is_a_config_error(fields: dict) -> None:
    with pytest.raises(ValidationError):
        PromptTemplate(**fields)


def test_literal_braces_are_written_doubled() -> None:
    template = PromptTemplate(user='Answer as {{"ok": true}} for {x}', variables=["x"])
    assert apply_template({"t": template}, "t", {"x": "y"}, [])[0]["content"] == 'Answer as {"ok": true} for y'
