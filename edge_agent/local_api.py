"""The local OpenAI-compatible API on the gateway (`[http]`, off by default).

Standard library only (http.server): the gateway install carries no web server, and a raw handler
checks the bearer token and the Content-Length before one byte of the body is read.

A request becomes a real command: an id of the protocol's format, the command JSON handed to the
same `Intake.handle` as an MQTT delivery (size cap, limits, policy, dedupe, the ledger), run by the
same executor workers, answered through the outbox to the cloud like any other. The HTTP thread
only waits: the engine's deltas (streaming) and the terminal reply come from edge_agent.local_calls.
If the agent dies mid-request, the client loses its connection; the ledger answers the command
`failed` at restart (never run twice) and that reply still reaches the cloud. If the client goes
away first (its socket closes while it waits, or a streamed write fails), the request's command is
cancelled by a local `cancel` command through the same intake (within CLIENT_CHECK_S while it
waits). A streamed request's command carries `stream: true`, so its chunks reach the cloud too.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models and GET /metrics (the
agent's numbers in Prometheus text, edge_agent.metrics) with the bearer token; open: GET /healthz
(alive) and GET /readyz (broker connected, store writable, model loaded; 503 otherwise), for load
balancers and probes that carry no token.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from autoglm_wire.local_origin import LOCAL_ID_PREFIX
from autoglm_wire.openai_requests import REQUEST_BY_KIND, OpenAIRequest, RequestError
from autoglm_wire.protocol import Reply, describe_validation_error, format_ts, utc_now
from edge_agent.config import HttpConfig
from edge_agent.local_calls import LocalCalls
from edge_agent.metrics import CONTENT_TYPE, Numbers, exposition

log = logging.getLogger(__name__)

ERROR_STATUS = {"invalid_command": 400, "unauthorized": 403, "unsupported_kind": 400, "busy": 429,
                "expired": 504, "cancelled": 499}
CLIENT_CHECK_S = 0.25  # how often a waiting request checks that its client and the server are still there


class ClientGone(Exception):
    """The client of a request closed its connection before the answer was complete."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code}}


def command_params(request: OpenAIRequest) -> dict[str, Any]:
    """The protocol params of a chat or complete command for an OpenAI request (400 if it lacks them)."""
    try:
        return request.params()
    except RequestError as exc:
        raise ApiError(400, exc.message, exc.code) from exc


def new_command(kind: str, params: dict[str, Any]) -> tuple[str, bytes]:
    """A fresh command id (`local-` + 32 hex digits, a valid protocol id) and the command's JSON."""
    command_id = f"{LOCAL_ID_PREFIX}{uuid.uuid4().hex}"
    command = {"v": 1, "id": command_id, "kind": kind, "params": params, "created_at": format_ts(utc_now())}
    return command_id, json.dumps(command).encode("utf-8")


def reply_error(reply: Reply) -> ApiError:
    """The HTTP error of a command that did not succeed: 4xx for a rejection, 5xx for a failure."""
    code = reply.error.code.value if reply.error else reply.status
    message = reply.error.message if reply.error else f"the command ended {reply.status}"
    if reply.status == "rejected" or code in ERROR_STATUS:
        return ApiError(ERROR_STATUS.get(code, 400), message, code)
    return ApiError(500, message, code, kind="server_error")


@dataclass(frozen=True)
class LocalApiDeps:
    """What the API needs from the agent."""

    submit: Callable[[bytes], None]  # the command's JSON into the intake (raises StoreUnavailable)
    calls: LocalCalls
    readiness: Callable[[], dict[str, str | None]]  # each readiness check: what fails it, or None
    model_name: Callable[[], str]
    device_id: str
    durable: Callable[[], None]  # waits for the commit in progress and fsyncs it (SqliteFile.sync)
    numbers: Callable[[], Numbers]  # the agent's numbers now (`/metrics`)


class LocalApi:
    def __init__(self, config: HttpConfig, token: str, deps: LocalApiDeps) -> None:
        self.config, self.deps = config, deps
        self._token = token.encode("utf-8")
        self._stopping = threading.Event()
        self.metrics_text = exposition(deps.numbers)
        api = self

        class Handler(_Handler):
            owner = api
        self._server = ThreadingHTTPServer((config.host, config.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-api", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("local API on http://%s:%d (OpenAI-compatible, bearer token)", self.config.host, self.port)

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def authorized(self, header: str | None) -> bool:
        if header is None or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode("utf-8"), self._token)

    def wait(self, events: queue.SimpleQueue[Any], client: socket.socket) -> tuple[str, Any]:
        """The call's next event. The terminal reply arrives from inside its storing transaction:
        it is answered only once that transaction is committed and on disk. Raises ClientGone when
        the client's connection has closed (checked at every event: deltas also flow for a request
        that is not streamed, and a check is one non-blocking poll)."""
        while not self._stopping.is_set():
            try:
                tag, value = events.get(timeout=CLIENT_CHECK_S)
            except queue.Empty:
                tag = None
            if closed_by_peer(client):
                raise ClientGone
            if tag is None:
                continue
            if tag == "done":
                self.deps.durable()
            return tag, value
        raise ApiError(503, "the agent is stopping; the command's reply will reach the cloud", "stopping",
                       kind="server_error")


def closed_by_peer(client: socket.socket) -> bool:
    """Whether the other end closed (or reset) the connection; bytes waiting to be read are not a close."""
    try:
        readable, _, _ = select.select([client], [], [], 0)
        return bool(readable) and client.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed on this side
        return True


class _Handler(BaseHTTPRequestHandler):
    owner: LocalApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("local API %s: " + format, self.client_address[0], *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/healthz":
            self._json(200, {"status": "alive"})
            return
        if self.path == "/readyz":
            checks = self.owner.deps.readiness()
            problems = [problem for problem in checks.values() if problem]
            body = {"status": "not ready" if problems else "ready", "reason": "; ".join(problems) or None,
                    "checks": {name: problem or "ok" for name, problem in checks.items()}}
            self._json(503 if problems else 200, body)
            return
        routes = {"/v1/models": self._models, "/metrics": self._metrics}
        self._guarded(routes.get(self.path))

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        routes = {"/v1/chat/completions": "chat", "/v1/completions": "complete"}
        kind = routes.get(self.path)
        self._guarded(None if kind is None else lambda: self._generate(kind))

    def _guarded(self, route: Callable[[], None] | None) -> None:
        """Authentication first (before the body is read), then the route; errors in OpenAI's shape."""
        try:
            if not self.owner.authorized(self.headers.get("Authorization")):
                self.close_connection = True  # the body, if any, is never read
                raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <http.token_file>)",
                               "invalid_api_key")
            if route is None:
                raise ApiError(404, f"no route {self.command} {self.path}", "not_found")
            route()
        except ApiError as exc:
            self._json(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):  # the client left after its command ended
            log.info("local API client %s disconnected before its answer", self.client_address[0])

    def _models(self) -> None:
        deps = self.owner.deps
        self._json(200, {"object": "list", "data": [{"id": deps.model_name(), "object": "model", "created": 0,
                                                      "owned_by": deps.device_id}]})

    def _metrics(self) -> None:
        body = self.owner.metrics_text()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self, kind: str) -> OpenAIRequest:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required", "length_required")
        if int(length) > self.owner.config.max_body_bytes:
            self.close_connection = True  # not read: the connection is dropped after the answer
            raise ApiError(413, f"the body is {length} bytes; this API takes at most "
                                f"{self.owner.config.max_body_bytes} (http.max_body_bytes)", "request_too_large")
        raw = self.rfile.read(int(length))
        try:
            return REQUEST_BY_KIND[kind].model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            detail = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            raise ApiError(400, f"the body is not a valid request: {detail}", "invalid_value") from exc

    def _generate(self, kind: str) -> None:
        request = self._body(kind)
        params = command_params(request)
        if request.stream:
            params["stream"] = True  # the cloud gets the chunks too (P/D/stream/<id>), as for its own commands
        command_id, payload = new_command(kind, params)
        calls = self.owner.deps.calls
        events = calls.open(command_id)
        try:
            try:
                self.owner.deps.submit(payload)
            except Exception as exc:  # noqa: BLE001 - StoreUnavailable: the store cannot write now
                raise ApiError(503, f"the device cannot store the command now: {exc}", "store_unavailable",
                               kind="server_error") from exc
            shape = _Shape(kind, command_id, self.owner.deps.model_name())
            try:
                if request.stream:
                    self._stream(events, shape, request.include_usage)
                else:
                    self._json(200, shape.whole(self._final(events)))
            except (ClientGone, BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                self._cancel(command_id)
        finally:
            calls.close(command_id)

    def _cancel(self, command_id: str) -> None:
        """The client left before its answer: cancel its command (a no-op answer if it already ended)."""
        log.info("local API client %s disconnected before its answer; cancelling command %s",
                 self.client_address[0], command_id)
        _, payload = new_command("cancel", {"target": command_id})
        try:
            self.owner.deps.submit(payload)
        except Exception as exc:  # noqa: BLE001 - StoreUnavailable: the command runs to its end instead
            log.warning("could not cancel command %s of a departed client (%s); it runs to its end",
                        command_id, exc)

    def _final(self, events: queue.SimpleQueue[Any]) -> Reply:
        while True:
            tag, value = self.owner.wait(events, self.connection)
            if tag == "done":
                if value.status != "succeeded":
                    raise reply_error(value)
                return value

    def _stream(self, events: queue.SimpleQueue[Any], shape: _Shape, include_usage: bool) -> None:
        tag, value = self.owner.wait(events, self.connection)
        if tag == "done" and value.status != "succeeded":
            raise reply_error(value)  # rejected or failed before any text: a plain HTTP error
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.close_connection = True
        self.end_headers()
        opening = shape.first()
        if opening is not None:
            self._event(opening)
        try:
            while tag == "delta":
                self._event(shape.chunk(value, None))
                tag, value = self.owner.wait(events, self.connection)
        except ApiError as exc:  # stopping: the stream ends with the error, as OpenAI's do
            self._event(exc.body())
            return
        reply: Reply = value
        if reply.status != "succeeded":
            self._event(reply_error(reply).body())
        else:
            output = reply.output or {}
            self._event(shape.chunk(None, _finish(output)))
            if include_usage:
                self._event({**shape.chunk(None, None), "choices": [], "usage": _usage(output)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, body: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _usage(output: dict[str, Any]) -> dict[str, int]:
    usage = output.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(output: dict[str, Any]) -> str:
    reason = output.get("finish_reason")
    return reason if reason in ("stop", "length") else "stop"


class _Shape:
    """OpenAI's objects for one chat or text completion, whole or as stream chunks."""

    def __init__(self, kind: str, command_id: str, model: str) -> None:
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + command_id
        self.model, self.created = model, int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, reply: Reply) -> dict[str, Any]:
        output = reply.output or {}
        text, finish = str(output.get("text", "")), _finish(output)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(output)}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": _usage(output)}

    def first(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role."""
        if not self.chat:
            return None
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}

    def chunk(self, text: str | None, finish: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {"content": text} if text is not None else {}
            return {**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {**self._head("text_completion"),
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}
