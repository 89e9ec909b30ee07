"""`/v1`: an OpenAI-compatible chat endpoint that runs each request as a `chat` command on a device.

`model` names a device (`gw-01`) or a group (`group/site-a`: the online member with the fewest
unfinished commands). The request becomes one command in the registry (so it shows in `cloud-bridge
commands` and is resent until accepted like any other); `stream: true` answers with server-sent
`chat.completion.chunk` events built from the device's stream chunks, then `data: [DONE]`.
Mounted by `app.create_app` behind the bearer token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from cloud_bridge import commands, console
from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.deps import CFG, REG, STREAM_POLL_S, ApiError, stream_response
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow

router = APIRouter()
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation",
         "developer": "system"}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None
    tool_call_id: str | None = None

    def to_protocol(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": ROLES[self.role], "content": text}


class StreamOptions(Body):
    include_usage: bool = False


class ChatCompletionRequest(Body):
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"messages": [m.to_protocol() for m in self.messages]}
        limit = self.max_completion_tokens or self.max_tokens
        fields = {"max_tokens": limit, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                  "stop": [self.stop] if isinstance(self.stop, str) else self.stop}
        params.update({k: v for k, v in fields.items() if v is not None})
        return params


def pick_device(registry: Registry, model: str) -> str:
    """The device a `model` names; for `group/G`, the least busy online member."""
    target = commands.parse_target(model)
    if isinstance(target, str):
        if registry.devices.get(target) is None:
            raise ApiError(404, f"model {model!r}: no such device has reported to this bridge; GET /v1/models "
                           "lists devices and groups", "model_not_found")
        return target
    members = commands.select(registry, commands.DeviceFilter(group=target.group, state="online"))
    if not members:
        raise ApiError(503, f"model {model!r}: no device of group {target.group!r} is online", "no_device_online",
                       "server_error")
    busy = registry.commands.active_counts()
    return min(members, key=lambda d: (busy.get(d.device_id, 0), d.device_id)).device_id


@router.get("/models", summary="devices and groups usable as `model`")
def list_models(registry: Registry = REG) -> dict[str, Any]:
    devices = registry.devices.all()
    names = [d.device_id for d in devices] + sorted({f"group/{g}" for d in devices for g in d.groups})
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "autoglm-edge"}
                                       for n in names]}


@router.post("/chat/completions", summary="OpenAI chat completions, run on a device over MQTT")
def chat_completions(body: ChatCompletionRequest, registry: Registry = REG, config: BridgeConfig = CFG) -> Any:
    device_id = pick_device(registry, body.model)
    request = commands.CommandRequest(target=device_id, kind="chat", stream=body.stream, params=body.params(),
                                      expires_in_s=config.http.chat_timeout_s)
    row, _ = commands.queue_command(registry, request, dispatch=config.dispatch)
    created = int(time.time())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        follower = commands.Follower(registry, row.id, STREAM_POLL_S)
        return stream_response(_chunks(follower, body.model, created, config.http.chat_timeout_s, include_usage))
    final = commands.Follower(registry, row.id).wait(config.http.chat_timeout_s)
    text, finish, usage = _outcome(final)
    message = {"role": "assistant", "content": text}
    return {"id": f"chatcmpl-{row.id}", "object": "chat.completion", "created": created, "model": body.model,
            "system_fingerprint": device_id, "usage": usage,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]}


def _outcome(row: CommandRow) -> tuple[str, str, dict[str, int]]:
    """(text, finish_reason, usage) of a finished chat command; ApiError when it did not succeed."""
    if row.state != "succeeded":
        raise ApiError(502 if row.terminal else 504, console.describe_failure(row), f"command_{row.state}",
                       "server_error")
    output = (row.reply or {}).get("output") or {}
    usage = output.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    finish = output.get("finish_reason", "stop")
    finish = finish if finish in ("stop", "length") else "stop"
    return output.get("text", ""), finish, {"prompt_tokens": prompt, "completion_tokens": completion,
                                            "total_tokens": prompt + completion}


def _chunks(follower: commands.Follower, model: str, created: int, timeout_s: float,
            include_usage: bool) -> Iterator[str]:
    """`data: {chat.completion.chunk}` lines, ending with `data: [DONE]` (or an error object)."""
    command_id = follower.row.id

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}]
        body = {"id": f"chatcmpl-{command_id}", "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": choices, "usage": usage}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for delta in follower.follow(timeout_s):
        yield chunk({"content": delta})
    try:
        text, finish, usage = _outcome(follower.row)
    except ApiError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
        return
    sent = follower.text
    if text.startswith(sent) and len(text) > len(sent):
        yield chunk({"content": text[len(sent):]})  # chunks lost on the way (QoS 0)
    yield chunk({}, finish)
    if include_usage:
        yield chunk({}, usage=usage)
    yield "data: [DONE]\n\n"
