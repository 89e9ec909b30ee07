"""The `/v1` endpoint with the official `openai` client (its retries on), over a real HTTP server on a
registry file; a simulated device answers each queued command by writing its replies to the registry.

What is checked is what a client of OpenAI's API relies on: error shapes and statuses the client
does not retry for a failure that would fail again, nothing run twice, offline devices answered at
once, `/v1/completions`, `response_format`, ignored unknown fields."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from autoglm_wire.protocol import Reply, StreamChunk, format_ts, utc_now
from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.app import create_app
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow

from .conftest import http_server
from .factories import offline, online

openai = pytest.importorskip("openai")

TOKEN = "openai-test-token-0123456789"
Behaviour = Callable[["Device", CommandRow], None]


@dataclass
class Device:
    """Plays the devices: each new command of `device_id` is handed to its behaviour in a thread."""

    registry: Registry
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.02):
            for row in self.registry.commands.active():
                if row.id not in self.seen and row.device_id in self.behaviours:
                    self.seen.add(row.id)
                    threading.Thread(target=self.behaviours[row.device_id], args=(self, row), daemon=True).start()

    def reply(self, row: CommandRow, status: str, **fields: object) -> None:
        self.registry.replies.record(Reply(command_id=row.payload["id"], device_id=row.device_id, status=status,
                                           seq=next(self.seq), ts=format_ts(utc_now()), **fields))


def succeed(delay_s: float = 0.0, text: str = "Hello!") -> Behaviour:
    def behaviour(device: Device, row: CommandRow) -> None:
        device.reply(row, "accepted")
        time.sleep(delay_s)
        if row.payload["params"].get("stream"):
            for index, delta in enumerate([text[:3], text[3:]]):
                device.registry.chunks.record(row.device_id, StreamChunk(command_id=row.id, index=index, delta=delta))
        output = {"text": text, "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        device.reply(row, "succeeded", output=output)
    return behaviour


def reject(code: str, message: str) -> Behaviour:
    def behaviour(device: Device, row: CommandRow) -> None:
        device.reply(row, "rejected", error={"code": code, "message": message})
    return behaviour


def busy_once() -> Behaviour:
    calls = itertools.count()

    def behaviour(device: Device, row: CommandRow) -> None:
        if next(calls) == 0:
            device.reply(row, "rejected", error={"code": "busy", "message": "the outbox is full"})
        else:
            succeed()(device, row)
    return behaviour


def fail(device: Device, row: CommandRow) -> None:
    device.reply(row, "accepted")
    device.reply(row, "failed", error={"code": "timeout", "message": "no token for 120 s"})


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Registry, Device]]:
    registry = Registry.open(Path(tmp_path_factory.mktemp("openai")) / "registry.db")
    config = BridgeConfig.model_validate({"http": {"chat_timeout_s": 5}})
    device = Device(registry)
    threading.Thread(target=device.run, daemon=True).start()
    with http_server(create_app(registry, config, TOKEN)) as base:
        yield f"{base}/v1", registry, device
    device.stop.set()
    registry.close()


def fleet(registry: Registry, device: Device, device_id: str, behaviour: Behaviour, is_online: bool = True) -> None:
    registry.devices.record_status(online(device_id) if is_online else offline(device_id))
    device.behaviours[device_id] = behaviour


def client(url: str, **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=TOKEN, **options)


def commands_of(registry: Registry, device_id: str) -> list[CommandRow]:
    return registry.commands.recent(device_id, 100)


HELLO = [{"role": "user", "content": "Hello"}]


def test_a_device_rejection_is_a_400_in_openais_shape_and_runs_exactly_once(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-reject", reject("invalid_command", "max_tokens 5000 is above limits.max_tokens"))
    with pytest.raises(openai.BadRequestError) as caught:
        client(url, max_retries=2).chat.completions.create(model="gw-reject", messages=HELLO, max_tokens=5000)
    assert caught.value.code == "invalid_command" and "limits.max_tokens" in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error" and "param" in caught.value.body
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(commands_of(registry, "gw-reject")) == 1


def test_a_streamed_request_that_is_rejected_is_the_same_400_not_a_broken_stream(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-reject-stream", reject("invalid_command", "prompt too long"))
    with pytest.raises(openai.BadRequestError, match="prompt too long"):
        client(url).chat.completions.create(model="gw-reject-stream", messages=HELLO, stream=True)
    assert len(commands_of(registry, "gw-reject-stream")) == 1


def test_a_failed_generation_is_a_500_the_client_does_not_retry(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-fail", fail)
    with pytest.raises(openai.InternalServerError) as caught:
        client(url, max_retries=2).chat.completions.create(model="gw-fail", messages=HELLO)
    assert caught.value.code == "timeout"
    assert len(commands_of(registry, "gw-fail")) == 1


def test_busy_is_a_429_the_client_retries_and_the_retry_runs(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-busy", busy_once())
    completion = client(url, max_retries=2).chat.completions.create(model="gw-busy", messages=HELLO)
    assert completion.choices[0].message.content == "Hello!"
    assert sorted(c.state for c in commands_of(registry, "gw-busy")) == ["rejected", "succeeded"]


def test_validation_errors_are_400s_in_openais_shape_naming_the_field(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-valid", succeed())
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model="gw-valid", messages=HELLO, n=2)
    assert caught.value.body["param"] == "n" and caught.value.body["type"] == "invalid_request_error"
    assert "detail" not in caught.value.response.json()
    assert commands_of(registry, "gw-valid") == []


def test_unknown_fields_are_ignored(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-extra", succeed())
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    completion = client(url).chat.completions.create(
        model="gw-extra", messages=[{"role": "user", "content": "Hi", "name": "ann"}], presence_penalty=0.5,
        logprobs=False, tools=tools, user="u-1", extra_body={"top_k": 5})
    assert completion.choices[0].message.content == "Hello!"
    (row,) = commands_of(registry, "gw-extra")
    assert row.payload["params"] == {"messages": [{"role": "user", "content": "Hi"}]}


def test_an_offline_device_is_a_503_at_once_unless_the_caller_asks_to_queue(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-off", succeed(), is_online=False)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError, match="offline") as caught:
        client(url, max_retries=0).chat.completions.create(model="gw-off", messages=HELLO)
    assert caught.value.status_code == 503 and time.monotonic() - started < 2
    assert commands_of(registry, "gw-off") == []
    completion = client(url).chat.completions.create(model="gw-off", messages=HELLO, extra_body={"queue": True})
    assert completion.choices[0].message.content == "Hello!"
    (row,) = commands_of(registry, "gw-off")
    assert row.expires_at > format_ts(utc_now())  # queued for [dispatch] default_expiry_s, not chat_timeout_s


def test_text_completions_run_as_complete_commands_streamed_or_not(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-text", succeed(text="Once upon"))
    completion = client(url).completions.create(model="gw-text", prompt="Tell", max_tokens=8, seed=3)
    assert completion.object == "text_completion" and completion.choices[0].text == "Once upon"
    streamed = "".join(c.choices[0].text for c in client(url).completions.create(
        model="gw-text", prompt="Tell", stream=True) if c.choices)
    assert streamed == "Once upon"
    kinds = {(c.kind, c.payload["params"]["prompt"], c.payload["params"].get("max_tokens"))
             for c in commands_of(registry, "gw-text")}
    assert kinds == {("complete", "Tell", 8), ("complete", "Tell", None)}


def test_response_format_json_schema_reaches_the_device_as_its_json_schema_output(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-json", succeed(text='{"ok": true}'))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    client(url).chat.completions.create(model="gw-json", messages=HELLO, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    client(url).chat.completions.create(model="gw-json", messages=HELLO, response_format={"type": "json_object"})
    formats = [c.payload["params"]["response_format"] for c in reversed(commands_of(registry, "gw-json"))]
    assert formats == [{"type": "json_schema", "schema": schema}, {"type": "json_schema", "schema": {"type": "object"}}]


def test_an_idempotency_key_runs_the_request_once(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-idem", succeed())
    headers = {"Idempotency-Key": "order-42"}
    first = client(url).chat.completions.create(model="gw-idem", messages=HELLO, extra_headers=headers)
    again = client(url).chat.completions.create(model="gw-idem", messages=HELLO, extra_headers=headers)
    assert first.id == again.id and len(commands_of(registry, "gw-idem")) == 1
    with pytest.raises(openai.BadRequestError, match="different request"):
        client(url).chat.completions.create(model="gw-idem", messages=[{"role": "user", "content": "other"}],
                                            extra_headers=headers)


def test_a_retry_after_the_clients_own_timeout_joins_the_running_command(bridge) -> None:
    url, registry, device = bridge
    fleet(registry, device, "gw-slow", succeed(delay_s=1.8))
    completion = client(url, timeout=1.0, max_retries=3).chat.completions.create(model="gw-slow", messages=HELLO)
    assert completion.choices[0].message.content == "Hello!"
    assert len(commands_of(registry, "gw-slow")) == 1
