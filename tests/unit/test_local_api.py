"""The local API's pure parts: [http] config, the token file, OpenAI request -> command params,
reply -> HTTP error, and the registry that hands deltas and terminal replies to the waiting call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from autoglm_wire.errors import ConfigError
from autoglm_wire.openai_requests import ChatCompletionRequest, CompletionRequest
from autoglm_wire.protocol import Reply, is_command_id, parse_command
from edge_agent import cli
from edge_agent.config import HttpConfig
from edge_agent.local_api import ApiError, command_params, new_command, reply_error
from edge_agent.local_calls import LocalCalls
from edge_agent.preflight import read_token


def test_http_is_off_by_default_on_localhost_when_on_and_needs_a_token() -> None:
    assert HttpConfig().enabled is False
    assert HttpConfig(enabled=True, token_file=Path("t")).host == "127.0.0.1"
    with pytest.raises(ValidationError, match="http.token_file"):
        HttpConfig(enabled=True)


def test_token_file_first_line_and_short_or_missing_tokens(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a" * 32 + "\nignored\n")
    assert read_token(HttpConfig(enabled=True, token_file=token)) == "a" * 32
    token.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(HttpConfig(enabled=True, token_file=token))
    with pytest.raises(ConfigError, match="http.token_file"):
        read_token(HttpConfig(enabled=True, token_file=tmp_path / "missing"))


def test_chat_request_becomes_a_valid_chat_command() -> None:
    request = ChatCompletionRequest.model_validate({
        "model": "x", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                   {"role": "tool", "content": "42"}],
        "max_completion_tokens": 7, "stop": "\n", "temperature": 0, "logit_bias": {"1": 2},
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}})
    params = command_params(request)
    assert params["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                  {"role": "observation", "content": "42"}]
    assert params["max_tokens"] == 7 and params["stop"] == ["\n"] and params["temperature"] == 0
    assert params["response_format"] == {"type": "json_schema", "schema": {"type": "object"}}
    command_id, payload = new_command("chat", params)
    assert is_command_id(command_id) and command_id.startswith("local-")
    assert parse_command(payload, 1 << 20).id == command_id


def test_completion_needs_exactly_one_prompt_and_chat_a_message() -> None:
    with pytest.raises(ApiError, match="one prompt per request") as caught:
        command_params(CompletionRequest.model_validate({"prompt": ["a", "b"]}))
    assert caught.value.status == 400
    with pytest.raises(ApiError, match="at least one message"):
        command_params(ChatCompletionRequest.model_validate({"messages": []}))
    with pytest.raises(ApiError, match="json_schema.schema"):
        command_params(CompletionRequest.model_validate({"prompt": "a", "response_format": {"type": "json_schema"}}))
    assert command_params(CompletionRequest.model_validate({"prompt": "a", "response_format": {"type": "json_object"}})
                          )["response_format"] == {"type": "json_schema", "schema": {"type": "object"}}


def reply(status: str, code: str | None = None, command_id: str = "local-1") -> Reply:
    error = {"code": code, "message": f"{code} happened"} if code else None
    return Reply.model_validate({"command_id": command_id, "device_id": "gw", "status": status, "seq": 1,
                                 "ts": "2026-01-01T00:00:00Z", "error": error})


@pytest.mark.parametrize(("status", "code", "http"), [
    ("rejected", "invalid_command", 400), ("rejected", "busy", 429), ("rejected", "unauthorized", 403),
    ("failed", "internal", 500), ("failed", "model_error", 500), ("expired", "expired", 504),
])
def test_reply_errors_map_rejections_to_4xx_and_failures_to_5xx(status: str, code: str, http: int) -> None:
    error = reply_error(reply(status, code))
    assert error.status == http
    assert error.body() == {"error": {"message": f"{code} happened", "type": error.kind, "code": code}}


def test_calls_get_their_deltas_and_only_their_terminal_reply() -> None:
    calls = LocalCalls()
    events = calls.open("local-1")
    assert calls.on_delta("local-2") is None
    on_delta = calls.on_delta("local-1")
    assert on_delta is not None
    on_delta("Hel")
    calls.on_reply(json.dumps(reply("running").model_dump(mode="json")).encode())
    calls.on_reply(json.dumps(reply("succeeded", command_id="local-2").model_dump(mode="json")).encode())
    calls.on_reply(json.dumps(reply("succeeded").model_dump(mode="json")).encode())
    assert events.get_nowait() == ("delta", "Hel")
    tag, done = events.get_nowait()
    assert tag == "done" and done.status == "succeeded" and done.command_id == "local-1"
    assert events.empty()
    calls.close("local-1")
    assert calls.on_delta("local-1") is None


MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-glm4-q4_0.gguf"


def test_check_config_opens_the_token_file_relative_to_the_config(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "gw-1"\n[model]\npath = "{MODEL}"\n'
                      '[http]\nenabled = true\ntoken_file = "http-token"\n')
    assert cli.main(["check-config", str(config)]) == 2
    assert f"http.token_file = {tmp_path / 'http-token'}: cannot open it" in capsys.readouterr().err
    (tmp_path / "http-token").write_text("t" * 32)
    assert cli.main(["check-config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "ok: http: local API on 127.0.0.1:8089" in err and "t" * 32 not in out + err


def test_closed_by_peer_tells_a_closed_connection_from_one_with_bytes_waiting() -> None:
    import socket

    from edge_agent.local_api import closed_by_peer

    ours, theirs = socket.socketpair()
    with ours:
        assert not closed_by_peer(ours)
        theirs.sendall(b"x")  # a pipelined byte is not a close
        assert not closed_by_peer(ours)
        theirs.close()
        ours.recv(1)
        assert closed_by_peer(ours)
    assert closed_by_peer(ours)  # closed on this side too
