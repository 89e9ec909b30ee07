"""`/v1`: an OpenAI-compatible endpoint that runs each request as a `chat` or `complete` command on a device.

`model` names a device (`gw-01`) or a group (`group/site-a`: the online member with the fewest
unfinished commands). A request becomes one command in the registry (it shows in `cloud-bridge
commands` and is resent until accepted like any other); `stream: true` answers with server-sent
chunks built from the device's stream chunks, then `data: [DONE]`. Mounted by `app.create_app`
behind the bearer token.

What a client sees, as OpenAI's own API would answer it (README, "OpenAI-compatible endpoint"):
- Fields this endpoint does not use (tools, logprobs, penalties, ...) are ignored and logged, as
  other OpenAI-compatible servers do; a field it uses with a bad value is a 400.
- A device that is offline (or never reported) is a 503 at once and nothing is queued, unless the
  body says `"queue": true` (an extension: `extra_body={"queue": True}`): then the command waits in
  the broker session for `[dispatch] default_expiry_s`.
- A command the device rejected or that failed is a 4xx/500 in OpenAI's error shape with the
  device's error code and `x-should-retry: false`, so the official client does not send it again;
  only a device answering `busy` (nothing ran) is a retryable 429.
- Idempotency: a request with an `Idempotency-Key` header runs once per key; a retry of the
  official client (`x-stainless-retry-count` > 0, e.g. after its own read timeout) is attached to
  the command an identical request queued within `[http] chat_timeout_s` instead of queueing another.
- No answer within `[http] chat_timeout_s` (default 300 s) is a 504 naming the command, which stays
  on the device; the client's own timeout should be longer (the official client's is 600 s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from autoglm_wire import openai_requests
from autoglm_wire.lifecycle import State
from autoglm_wire.openai_requests import RequestError
from autoglm_wire.protocol import utc_now
from cloud_bridge import commands, console
from cloud_bridge.config import BridgeConfig
from cloud_bridge.errors import DuplicateCommand
from cloud_bridge.http.deps import CFG, OPERATOR, REG, STREAM_POLL_S, VIEWER, ApiError, stream_response
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow

log = logging.getLogger(__name__)
router = APIRouter()
QUEUE_HELP = "extension: queue for an offline device instead of a 503"
ID_PREFIX = "oai-"
RETRY_SCAN = 200  # recent commands searched for the original of a retried request
WAITING = (State.PENDING, State.SENT)


class ChatCompletionRequest(openai_requests.ChatCompletionRequest):
    model: str
    queue: bool = Field(default=False, description=QUEUE_HELP)


class CompletionRequest(openai_requests.CompletionRequest):
    model: str
    queue: bool = Field(default=False, description=QUEUE_HELP)


GenerationRequest = ChatCompletionRequest | CompletionRequest


def command_params(body: GenerationRequest) -> dict[str, Any]:
    """The command's params for `body`; a value they cannot be built from is a 400 naming the field."""
    try:
        return body.params()
    except RequestError as exc:
        raise ApiError(400, exc.message, exc.code, param=exc.param) from exc


# --- which device, which command ----------------------------------------------------------------


def pick_device(registry: Registry, body: GenerationRequest) -> str:
    """The device `body.model` names; for `group/G`, the least busy online member.

    A device that is not online is a 503 at once unless the body asks to `queue`.
    """
    model = body.model
    target = commands.parse_target(model)
    if isinstance(target, str):
        device = registry.devices.get(target)
        if device is None:
            raise ApiError(404, f"model {model!r}: no such device has reported to this bridge; GET /v1/models "
                           "lists devices and groups", "model_not_found", param="model", retry=False)
        if device.state != "online" and not body.queue:
            since = f" since {console.short_ts(device.since)} UTC" if device.since else ""
            raise ApiError(503, f"device {model!r} is {device.state or 'not reporting'}{since}; nothing was queued. "
                           'Retry later, or send "queue": true to wait for it', "device_offline", "server_error")
        return target
    members = commands.select(registry, commands.DeviceFilter(group=target.group, state="online"))
    if not members:
        raise ApiError(503, f"model {model!r}: no device of group {target.group!r} is online; nothing was queued",
                       "no_device_online", "server_error")
    busy = registry.commands.active_counts()
    return min(members, key=lambda d: (busy.get(d.device_id, 0), d.device_id)).device_id


def start_command(request: Request, registry: Registry, config: BridgeConfig, body: GenerationRequest,
                  kind: str, params: dict[str, Any]) -> CommandRow:
    """Queue the command for `body`, or find the one an earlier attempt of the same request queued."""
    request.state.audit_target = body.model
    ignored = body.ignored()
    if ignored:
        log.warning("%s: ignored request fields %s", request.url.path, ", ".join(ignored))
    key = request.headers.get("idempotency-key")
    if key is None and _is_retry(request):
        earlier = _earlier_attempt(registry, _devices_of(registry, body.model), kind, params,
                                   config.http.chat_timeout_s)
        if earlier is not None:
            log.info("%s: retry of command %s, not queued again", request.url.path, earlier.id)
            return earlier
    device_id = pick_device(registry, body)
    expires_in_s = config.dispatch.default_expiry_s if body.queue else config.http.chat_timeout_s
    command_id = ID_PREFIX + (hashlib.sha256(key.encode()).hexdigest()[:40] if key else uuid.uuid4().hex)
    command = commands.CommandRequest(target=device_id, kind=kind, params=params, expires_in_s=expires_in_s,
                                      id=command_id)
    try:
        row, _ = commands.queue_command(registry, command, dispatch=config.dispatch)
    except DuplicateCommand:
        row = registry.commands.get(command_id)
        if row.kind != kind or row.payload["params"] != params:
            raise ApiError(400, "this Idempotency-Key was already used for a different request; use a new key",
                           "idempotency_key_reused", retry=False) from None
    return row


def _is_retry(request: Request) -> bool:
    try:
        return int(request.headers.get("x-stainless-retry-count", "0")) > 0
    except ValueError:
        return False


def _devices_of(registry: Registry, model: str) -> set[str]:
    """The device `model` names, or every known member of its group."""
    target = commands.parse_target(model)
    if isinstance(target, str):
        return {target}
    return {d.device_id for d in commands.select(registry, target)}


def _earlier_attempt(registry: Registry, devices: set[str], kind: str, params: dict[str, Any],
                     window_s: float) -> CommandRow | None:
    """The newest /v1 command for one of `devices` with these params queued within `window_s` whose
    outcome a retry may share (not one the device refused as `busy`, nor one that expired unaccepted:
    those ran nowhere)."""
    since = utc_now() - timedelta(seconds=window_s)
    for row in registry.commands.recent(None, RETRY_SCAN):
        if datetime.fromisoformat(row.created_at) < since:
            return None
        if (row.id.startswith(ID_PREFIX) and row.device_id in devices and row.kind == kind
                and row.payload["params"] == params and row.state != State.EXPIRED and _error_code(row) != "busy"):
            return row
    return None


# --- outcomes ------------------------------------------------------------------------------------


def _error_code(row: CommandRow) -> str | None:
    return (row.error or {}).get("code") or ((row.reply or {}).get("error") or {}).get("code")


def failure(row: CommandRow) -> ApiError:
    """The error answer for a command that did not succeed in time, as OpenAI would shape it."""
    message = console.describe_failure(row)
    code = _error_code(row)
    if not row.terminal:
        return ApiError(504, f"{message}; it was not queued twice: follow it with GET /api/commands/{row.id}",
                        "timeout", "server_error", retry=False)
    if row.state == State.REJECTED and code == "busy":
        return ApiError(429, message, "busy", "rate_limit_error")
    if row.state == State.FAILED:
        return ApiError(500, message, code or "command_failed", "server_error", retry=False)
    if row.state == State.EXPIRED:
        return ApiError(504, message, "expired", "server_error", retry=False)
    return ApiError(400, message, code or f"command_{row.state}", retry=False)


def _outcome(row: CommandRow) -> tuple[str, str, dict[str, int]]:
    """(text, finish_reason, usage) of a succeeded command; ApiError when it did not succeed."""
    if row.state != State.SUCCEEDED:
        raise failure(row)
    output = (row.reply or {}).get("output") or {}
    usage = output.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    finish = output.get("finish_reason", "stop")
    finish = finish if finish in ("stop", "length") else "stop"
    return output.get("text", ""), finish, {"prompt_tokens": prompt, "completion_tokens": completion,
                                            "total_tokens": prompt + completion}


def _wait_until_accepted(registry: Registry, row: CommandRow, timeout_s: float) -> CommandRow:
    """The row once the device took the command (or ended it); a rejection then is an HTTP error, not a
    200 stream that breaks off."""
    deadline = time.monotonic() + timeout_s
    while row.state in WAITING and time.monotonic() < deadline:
        time.sleep(STREAM_POLL_S)
        row = registry.commands.get(row.id)
    if row.state in WAITING or (row.terminal and row.state != State.SUCCEEDED):
        raise failure(row)
    return row


# --- routes --------------------------------------------------------------------------------------


@router.get("/models", summary="devices and groups usable as `model`", dependencies=[VIEWER])
def list_models(registry: Registry = REG) -> dict[str, Any]:
    devices = registry.devices.all()
    names = [d.device_id for d in devices] + sorted({f"group/{g}" for d in devices for g in d.routable_groups})
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "autoglm-edge"}
                                       for n in names]}


@router.post("/chat/completions", summary="OpenAI chat completions, run on a device over MQTT (operator)",
             dependencies=[OPERATOR])
def chat_completions(body: ChatCompletionRequest, request: Request, registry: Registry = REG,
                     config: BridgeConfig = CFG) -> Any:
    return _generate(request, registry, config, body, "chat", command_params(body), ChatShape(body.model))


@router.post("/completions", summary="OpenAI (legacy) text completions, run on a device as `complete` (operator)",
             dependencies=[OPERATOR])
def completions(body: CompletionRequest, request: Request, registry: Registry = REG,
                config: BridgeConfig = CFG) -> Any:
    return _generate(request, registry, config, body, "complete", command_params(body), TextShape(body.model))


class ChatShape:
    """`chat.completion` objects and `chat.completion.chunk` events."""

    prefix, obj, chunk_obj = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str) -> None:
        self.model = model

    def choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": None}

    def delta(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    def first(self) -> dict[str, Any] | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}


class TextShape(ChatShape):
    """`text_completion` objects, streamed as `text_completion` events too."""

    prefix, obj, chunk_obj = "cmpl-", "text_completion", "text_completion"

    def choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def delta(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        return self.choice(text or "", finish)

    def first(self) -> dict[str, Any] | None:
        return None


def _generate(request: Request, registry: Registry, config: BridgeConfig, body: GenerationRequest, kind: str,
              params: dict[str, Any], shape: ChatShape) -> Any:
    if body.stream:
        params = {**params, "stream": True}
    row = start_command(request, registry, config, body, kind, params)
    created = int(time.time())
    timeout_s = config.http.chat_timeout_s
    if body.stream:
        row = _wait_until_accepted(registry, row, timeout_s)
        follower = commands.Follower(registry, row.id, STREAM_POLL_S)
        return stream_response(_events(follower, shape, created, timeout_s, body.include_usage))
    text, finish, usage = _outcome(commands.Follower(registry, row.id).wait(timeout_s))
    return {"id": shape.prefix + row.id, "object": shape.obj, "created": created, "model": shape.model,
            "system_fingerprint": row.device_id, "usage": usage, "choices": [shape.choice(text, finish)]}


def _events(follower: commands.Follower, shape: ChatShape, created: int, timeout_s: float,
            include_usage: bool) -> Iterator[str]:
    """`data: {chunk}` lines, ending with `data: [DONE]` (or an error object)."""
    command_id = follower.row.id

    def event(choice: dict[str, Any] | None, usage: dict | None = None) -> str:
        body = {"id": shape.prefix + command_id, "object": shape.chunk_obj, "created": created,
                "model": shape.model, "choices": [] if choice is None else [choice], "usage": usage}
        return f"data: {json.dumps(body)}\n\n"

    first = shape.first()
    if first is not None:
        yield event(first)
    for delta in follower.follow(timeout_s):
        yield event(shape.delta(delta))
    try:
        text, finish, usage = _outcome(follower.row)
    except ApiError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
        return
    sent = follower.text
    if text.startswith(sent) and len(text) > len(sent):
        yield event(shape.delta(text[len(sent):]))  # chunks lost on the way (QoS 0)
    yield event(shape.delta(None, finish))
    if include_usage:
        yield event(None, usage=usage)
    yield "data: [DONE]\n\n"
