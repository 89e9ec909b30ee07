"""The OpenAI request bodies both OpenAI-compatible endpoints take (the bridge's `/v1` and the
agent's local API), and how each becomes the params of a protocol `chat` or `complete` command.

Unknown fields are kept aside (`model_extra`; `ignored()` names them) and otherwise ignored, as
other OpenAI-compatible servers do; a field that is used with a bad value is a `RequestError`,
which each endpoint answers as a 400 in OpenAI's error shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI roles -> protocol v1 roles (GLM's `observation` carries a tool's result)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "observation"}


class RequestError(ValueError):
    """A request field with a value the command cannot be built from: a 400 naming `param`."""

    def __init__(self, message: str, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class Body(BaseModel):
    """Unknown fields are kept aside (`model_extra`) and otherwise ignored."""

    model_config = ConfigDict(extra="allow")

    def ignored(self) -> list[str]:
        """The names of the fields that were ignored, nested ones as `a.b`."""
        names = list(self.model_extra or {})
        for name, value in self:
            children = value if isinstance(value, list) else [value]
            names += [f"{name}.{child}" for item in children if isinstance(item, Body) for child in item.ignored()]
        return sorted(set(names))


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def to_protocol(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": ROLES[self.role], "content": text}


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaSpec(Body):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def to_protocol(self) -> dict[str, Any] | None:
        """The device's `response_format` (JSON-schema constrained output), or None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_schema", "schema": {"type": "object"}}
        if self.json_schema is None:
            raise RequestError("response_format of type json_schema needs json_schema.schema",
                               "response_format.json_schema")
        return {"type": "json_schema", "schema": self.json_schema.schema_}


class GenerationRequest(Body):
    """The fields chat and text completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        fields = {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                  "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
                  "response_format": self.response_format.to_protocol() if self.response_format else None}
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message]
    max_completion_tokens: int | None = None

    def params(self) -> dict[str, Any]:
        """The protocol params of the `chat` command; raises RequestError."""
        if not self.messages:
            raise RequestError("messages: at least one message is required", "messages")
        limit = self.max_completion_tokens or self.max_tokens
        return {"messages": [m.to_protocol() for m in self.messages], **self.sampling(limit)}


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    def params(self) -> dict[str, Any]:
        """The protocol params of the `complete` command; raises RequestError."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise RequestError(f"prompt: one prompt per request ({len(prompts)} given)", "prompt")
        return {"prompt": prompts[0], **self.sampling(self.max_tokens)}


OpenAIRequest = ChatCompletionRequest | CompletionRequest
REQUEST_BY_KIND: dict[str, type[OpenAIRequest]] = {"chat": ChatCompletionRequest, "complete": CompletionRequest}
