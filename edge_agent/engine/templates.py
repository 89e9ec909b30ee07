"""Named prompt templates on the device (`[templates.NAME]` in the config). Pure.

A template contributes a system message (put first) and/or a user message (put last) around the
command's own `messages`; `{name}` placeholders are filled from the command's `variables`. The
GGUF's chat template still formats the resulting conversation.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoglm_wire.errors import InvalidCommand


class PromptTemplate(BaseModel):
    """`system` and `user` texts with `{variable}` placeholders; `variables` declares every one used.
    Write a literal brace as `{{` or `}}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str | None = None
    user: str | None = None
    variables: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _placeholders_are_declared(self) -> PromptTemplate:
        if self.system is None and self.user is None:
            raise ValueError("a template needs `system`, `user` or both")
        used = placeholders(self.system or "") | placeholders(self.user or "")
        declared = set(self.variables)
        if used != declared:
            raise ValueError(f"placeholders {sorted(used)} must match the declared variables {sorted(declared)}")
        return self


def placeholders(text: str) -> set[str]:
    """The `{name}` fields of a format string; anything but a plain identifier is an error."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as exc:
        raise ValueError(f"template text {text[:40]!r}...: {exc} (write a literal brace as {{{{ or }}}})") from exc
    for field in fields:
        if not field.isidentifier():
            raise ValueError(f"placeholder {{{field}}} must be a plain name like {{device}}")
    return fields


def apply_template(templates: Mapping[str, PromptTemplate], name: str, variables: Mapping[str, str],
                   messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation with template `name` filled in; InvalidCommand on an unknown name or when
    the variables given differ from the ones the template declares."""
    template = templates.get(name)
    if template is None:
        known = ", ".join(sorted(templates)) or "none are configured"
        raise InvalidCommand(f"prompt template {name!r} is not defined on this device (templates: {known})")
    declared, given = set(template.variables), set(variables)
    if declared != given:
        missing, extra = sorted(declared - given), sorted(given - declared)
        raise InvalidCommand(f"template {name!r} takes variables {sorted(declared)}; "
                             f"missing: {missing}, not declared: {extra}")
    filled = []
    if template.system is not None:
        filled.append({"role": "system", "content": template.system.format_map(variables)})
    filled.extend(messages)
    if template.user is not None:
        filled.append({"role": "user", "content": template.user.format_map(variables)})
    return filled
