"""Protocol v1 payloads: what `parse_command` accepts, the error code of everything it refuses, and
the shape of every device -> cloud payload."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from autoglm_wire.errors import BadJson, ErrorCode, InvalidCommand, PayloadTooLarge, ProtocolError, UnknownKind
from autoglm_wire.protocol import (
    MAX_JSON_DEPTH,
    CancelParams,
    ChatParams,
    CompleteParams,
    ErrorInfo,
    Event,
    ModelInfo,
    PingParams,
    Reply,
    Status,
    StreamChunk,
    Telemetry,
    format_ts,
    json_nesting_exceeds,
    parse_command,
    to_bytes,
)

MAX = 64 * 1024
CREATED = "2026-11-21T10:00:00Z"


def command(**fields: Any) -> dict[str, Any]:
    """A valid ping command, with `fields` replacing or adding envelope fields."""
    return {"v": 1, "id": "cmd-1", "kind": "ping", "params": {}, "created_at": CREATED, **fields}


def without(key: str) -> dict[str, Any]:
    obj = command()
    del obj[key]
    return obj


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8")


def refusal(payload: bytes, max_bytes: int = MAX, kinds: frozenset[str] | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_command(payload, max_bytes, kinds)
    return caught.value


# --- valid commands ------------------------------------------------------------------------------


def test_a_ping_parses_with_empty_params() -> None:
    parsed = parse_command(encode(command()), MAX)
    assert parsed.id == "cmd-1"
    assert parsed.kind == "ping"
    assert isinstance(parsed.params, PingParams)
    assert parsed.command.created_at == datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    assert parsed.command.priority == 0
    assert parsed.command.expires_at is None


def test_a_chat_parses_its_messages_and_sampling_fields() -> None:
    params = {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 32,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 7,
        "stream": True,
        "response_format": {"type": "json_schema", "schema": {"type": "object"}},
    }
    parsed = parse_command(encode(command(kind="chat", params=params, priority=5)), MAX)
    assert isinstance(parsed.params, ChatParams)
    assert [m.content for m in parsed.params.messages] == ["be brief", "hi"]
    assert parsed.params.max_tokens == 32
    assert parsed.params.seed == 7
    assert parsed.params.stream is True
    assert parsed.params.response_format is not None
    assert parsed.params.response_format.schema_ == {"type": "object"}
    assert parsed.command.priority == 5


def test_a_complete_parses_its_prompt_and_gets_default_sampling() -> None:
    parsed = parse_command(encode(command(kind="complete", params={"prompt": "Once"})), MAX)
    assert isinstance(parsed.params, CompleteParams)
    assert parsed.params.prompt == "Once"
    assert parsed.params.max_tokens == 256
    assert parsed.params.stream is False


def test_a_cancel_parses_its_target() -> None:
    parsed = parse_command(encode(command(kind="cancel", params={"target": "other:42"})), MAX)
    assert isinstance(parsed.params, CancelParams)
    assert parsed.params.target == "other:42"


def test_the_optional_envelope_fields_target_sig_and_expires_at_are_accepted() -> None:
    sig = {"key_id": "k1", "alg": "ed25519", "value": "AAAA"}
    obj = command(target="group/lab", sig=sig, expires_at="2026-11-21T10:05:00Z")
    parsed = parse_command(encode(obj), MAX)
    assert parsed.command.target == "group/lab"
    assert parsed.command.sig is not None and parsed.command.sig.key_id == "k1"
    assert parsed.command.expires_at == datetime(2026, 11, 21, 10, 5, tzinfo=UTC)


def test_a_payload_of_exactly_max_bytes_is_accepted() -> None:
    payload = encode(command())
    assert parse_command(payload, len(payload)).id == "cmd-1"


# --- payload_too_large and bad_json --------------------------------------------------------------


def test_a_payload_one_byte_over_the_limit_is_payload_too_large() -> None:
    payload = encode(command())
    error = refusal(payload, max_bytes=len(payload) - 1)
    assert isinstance(error, PayloadTooLarge)
    assert error.code is ErrorCode.PAYLOAD_TOO_LARGE


def test_size_is_checked_before_parsing_so_oversized_garbage_is_payload_too_large() -> None:
    error = refusal(b"\xff not json at all " * 100, max_bytes=100)
    assert isinstance(error, PayloadTooLarge)
    assert error.command_id is None


def test_a_payload_that_is_not_utf8_is_bad_json() -> None:
    error = refusal(b'{"v": 1, "id": "\xff\xfe"}')
    assert isinstance(error, BadJson)
    assert error.code is ErrorCode.BAD_JSON
    assert "UTF-8" in error.message


def test_a_payload_that_is_not_json_is_bad_json() -> None:
    assert isinstance(refusal(b"{v: 1, id: cmd-1}"), BadJson)


def test_an_empty_payload_is_bad_json() -> None:
    assert isinstance(refusal(b""), BadJson)


@pytest.mark.parametrize("payload", [b"[1, 2, 3]", b"42", b'"ping"', b"null", b"true"])
def test_json_that_is_not_an_object_is_bad_json(payload: bytes) -> None:
    error = refusal(payload)
    assert isinstance(error, BadJson)
    assert "object" in error.message


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_json_nested_100000_levels_deep_is_bad_json_not_a_crash(opener: bytes) -> None:
    error = refusal(opener * 100_000, max_bytes=10**7)
    assert isinstance(error, BadJson)


def test_balanced_json_nested_100000_levels_deep_is_bad_json_not_a_crash() -> None:
    error = refusal(b"[" * 100_000 + b"]" * 100_000, max_bytes=10**7)
    assert isinstance(error, BadJson)


def test_json_nested_deeper_than_the_limit_is_refused_before_the_parser_recurses(monkeypatch) -> None:
    def must_not_parse(text: str) -> None:
        raise AssertionError("json.loads was called on deeply nested text")

    monkeypatch.setattr("autoglm_wire.protocol.json.loads", must_not_parse)
    error = refusal(b'{"v": 1, "params": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}")
    assert isinstance(error, BadJson) and f"more than {MAX_JSON_DEPTH} levels" in error.message


def test_a_command_nested_exactly_to_the_limit_is_still_parsed() -> None:
    inputs = "[" * (MAX_JSON_DEPTH - 3) + "1.5" + "]" * (MAX_JSON_DEPTH - 3)  # envelope, params, inputs: 3 levels
    payload = json.dumps({"v": 1, "id": "cmd-1", "kind": "onnx", "created_at": CREATED,
                          "params": {"model": "m", "inputs": {"x": json.loads(inputs)}}}).encode()
    assert json_nesting_exceeds(payload, MAX_JSON_DEPTH) is False
    assert parse_command(payload, MAX).command.kind == "onnx"


@pytest.mark.parametrize(("text", "deeper_than_2"), [
    ('[[["x"]]]', True),
    ('[["[[[[", "{{{{"]]', False),  # brackets inside strings do not nest
    ('[["\\\\", "]"], []]', False),  # an escaped backslash ends the string before its closing quote
    ('[["\\\"[[[["]]', False),  # an escaped quote does not end the string
    ("[[]][[]][[]][[]]", False),  # many brackets, never deep
    ('{"a": {"b": {"c": 1}}}', True),
])
def test_json_nesting_is_measured_outside_strings(text: str, deeper_than_2: bool) -> None:
    assert json_nesting_exceeds(text.encode(), 2) is deeper_than_2


def test_an_integer_literal_too_long_for_python_is_bad_json_not_a_crash() -> None:
    payload = (
        b'{"v": 1, "id": "cmd-1", "kind": "ping", "created_at": "2026-11-21T10:00:00Z", "priority": '
        + (b"9" * 5000)
        + b"}"
    )
    assert isinstance(refusal(payload), BadJson)


# --- invalid_command: the envelope ---------------------------------------------------------------


@pytest.mark.parametrize("missing", ["v", "id", "kind", "created_at"])
def test_a_command_missing_a_required_envelope_field_is_invalid(missing: str) -> None:
    error = refusal(encode(without(missing)))
    assert isinstance(error, InvalidCommand)
    assert error.code is ErrorCode.INVALID_COMMAND
    assert missing in error.message


@pytest.mark.parametrize("v", [2, 0, "1", None])
def test_a_command_with_another_protocol_version_is_invalid(v: Any) -> None:
    error = refusal(encode(command(v=v)))
    assert isinstance(error, InvalidCommand)
    assert error.command_id == "cmd-1"


@pytest.mark.parametrize("v", [True, 1.0])
def test_a_version_that_only_equals_1_loosely_is_invalid(v: Any) -> None:
    assert isinstance(refusal(encode(command(v=v))), InvalidCommand)


def test_an_unknown_envelope_field_is_invalid_and_named() -> None:
    error = refusal(encode(command(colour="blue")))
    assert isinstance(error, InvalidCommand)
    assert "colour" in error.message
    assert error.command_id == "cmd-1"


def test_a_signature_with_another_algorithm_is_invalid() -> None:
    sig = {"key_id": "k1", "alg": "rsa", "value": "AAAA"}
    assert isinstance(refusal(encode(command(sig=sig))), InvalidCommand)


@pytest.mark.parametrize("priority", [1001, -1001, "high"])
def test_a_priority_outside_minus_1000_to_1000_is_invalid(priority: Any) -> None:
    assert isinstance(refusal(encode(command(priority=priority))), InvalidCommand)


@pytest.mark.parametrize("bad_id", ["a/b", "a+b", "#", "", "x" * 129, "a b", "abc\n", 42, None])
def test_an_id_that_is_not_a_valid_topic_level_is_invalid_and_not_carried(bad_id: Any) -> None:
    error = refusal(encode(command(id=bad_id)))
    assert isinstance(error, InvalidCommand)
    assert error.command_id is None


@pytest.mark.parametrize("good_id", ["a", "x" * 128, "Az09_.:-"])
def test_every_legal_id_character_and_length_is_accepted(good_id: str) -> None:
    assert parse_command(encode(command(id=good_id)), MAX).id == good_id


def test_a_valid_id_is_carried_on_the_error_even_when_the_rest_is_invalid() -> None:
    error = refusal(encode({"v": 1, "id": "keep-me", "kind": "ping"}))
    assert isinstance(error, InvalidCommand)
    assert error.command_id == "keep-me"


def test_a_bad_created_at_is_invalid() -> None:
    assert isinstance(refusal(encode(command(created_at="yesterday"))), InvalidCommand)


# --- unknown_kind and params ---------------------------------------------------------------------


def test_a_kind_outside_protocol_v1_is_unknown_kind_carrying_the_id() -> None:
    error = refusal(encode(command(kind="teleport")))
    assert isinstance(error, UnknownKind)
    assert error.code is ErrorCode.UNKNOWN_KIND
    assert error.command_id == "cmd-1"
    assert "teleport" in error.message


def test_a_v1_kind_this_device_does_not_serve_is_unknown_kind() -> None:
    obj = command(kind="complete", params={"prompt": "x"})
    error = refusal(encode(obj), kinds=frozenset({"ping", "chat"}))
    assert isinstance(error, UnknownKind)
    assert "chat" in error.message and "ping" in error.message


def test_an_unknown_params_field_is_invalid_and_named() -> None:
    obj = command(kind="complete", params={"prompt": "x", "temprature": 0.1})
    error = refusal(encode(obj))
    assert isinstance(error, InvalidCommand)
    assert "temprature" in error.message
    assert error.command_id == "cmd-1"


def test_a_ping_with_any_params_is_invalid() -> None:
    assert isinstance(refusal(encode(command(params={"x": 1}))), InvalidCommand)


@pytest.mark.parametrize(
    "params",
    [
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 6},
        {"messages": [{"role": "user", "content": "hi"}], "top_p": 0},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 17},
        {"messages": [{"role": "user", "content": "hi"}], "seed": -1},
    ],
)
def test_chat_params_out_of_range_are_invalid(params: dict[str, Any]) -> None:
    assert isinstance(refusal(encode(command(kind="chat", params=params))), InvalidCommand)


def test_a_cancel_whose_target_is_not_a_command_id_is_invalid() -> None:
    assert isinstance(refusal(encode(command(kind="cancel", params={"target": "a/b"}))), InvalidCommand)


# --- nothing but ProtocolError, whatever arrives ----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
envelope_keys = st.sampled_from(
    ["v", "id", "kind", "params", "created_at", "expires_at", "priority", "target", "sig"]
) | st.text(max_size=8)
plausible_values = json_values | st.sampled_from(
    [1, "cmd-1", "ping", "chat", "complete", "cancel", "onnx", "config", CREATED, {}, {"prompt": "x"}]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_nothing_but_agent_errors(payload: bytes) -> None:
    try:
        parse_command(payload, 200)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(envelope_keys, plausible_values, max_size=10))
def test_arbitrary_json_objects_raise_nothing_but_agent_errors(obj: dict[str, Any]) -> None:
    try:
        parsed = parse_command(encode(obj), MAX)
    except ProtocolError as error:
        assert error.command_id is None or error.command_id == obj.get("id")
    else:
        assert parsed.id == obj["id"]


# --- device -> cloud payloads --------------------------------------------------------------------


def decoded(model: BaseModel) -> dict[str, Any]:
    raw = to_bytes(model)
    assert isinstance(raw, bytes)
    return json.loads(raw.decode("utf-8"))


def test_a_reply_serializes_with_v1_and_nulls_kept() -> None:
    reply = Reply(command_id="c1", device_id="d1", status="accepted", seq=1, ts="2026-11-21T10:00:00.123Z")
    assert decoded(reply) == {
        "v": 1,
        "command_id": "c1",
        "device_id": "d1",
        "status": "accepted",
        "seq": 1,
        "ts": "2026-11-21T10:00:00.123Z",
        "output": None,
        "error": None,
        "metrics": {},
    }


def test_a_rejected_reply_may_have_no_command_id_and_carries_its_error_code() -> None:
    reply = Reply(
        command_id=None,
        device_id="d1",
        status="rejected",
        seq=3,
        ts="t",
        error=ErrorInfo(code=ErrorCode.BAD_JSON, message="payload is not JSON"),
    )
    body = decoded(reply)
    assert body["command_id"] is None
    assert body["error"] == {"code": "bad_json", "message": "payload is not JSON"}
    assert reply.is_terminal


def test_only_terminal_reply_statuses_are_terminal() -> None:
    def status(s: Any) -> bool:
        return Reply(command_id="c", device_id="d", status=s, seq=1, ts="t").is_terminal

    assert not status("accepted") and not status("running")
    assert all(status(s) for s in ["succeeded", "failed", "rejected", "expired", "cancelled"])


def test_a_reply_seq_must_be_at_least_1() -> None:
    with pytest.raises(ValueError):
        Reply(command_id="c", device_id="d", status="accepted", seq=0, ts="t")


def test_a_status_serializes_with_v1_and_its_model() -> None:
    model = ModelInfo(name="glm", sha256="ab" * 32, arch="glm4", quant="Q4_K_M", n_gpu_layers=-1)
    status = Status(
        device_id="d1", state="online", ts="t", agent_version="0.1", model=model, kinds=["chat", "ping"], groups=["lab"]
    )
    body = decoded(status)
    assert body["v"] == 1
    assert body["state"] == "online"
    assert body["model"]["n_gpu_layers"] == -1
    assert body["kinds"] == ["chat", "ping"]


def test_the_offline_status_of_the_will_needs_only_device_and_state() -> None:
    body = decoded(Status(device_id="d1", state="offline"))
    assert body["v"] == 1 and body["device_id"] == "d1" and body["state"] == "offline"


def test_a_stream_chunk_serializes_with_v1() -> None:
    assert decoded(StreamChunk(command_id="c1", index=0, delta="Hel")) == {
        "v": 1,
        "command_id": "c1",
        "index": 0,
        "delta": "Hel",
        "done": False,
    }


def test_an_event_serializes_with_v1() -> None:
    body = decoded(Event(device_id="d1", ts="t", level="warning", code="outbox_full", message="m", data={"n": 1}))
    assert body == {
        "v": 1,
        "device_id": "d1",
        "ts": "t",
        "level": "warning",
        "code": "outbox_full",
        "message": "m",
        "data": {"n": 1},
    }


def test_telemetry_serializes_with_v1_and_every_contract_field() -> None:
    telemetry = Telemetry(
        device_id="d1",
        ts="t",
        queue_depth=2,
        outbox_depth=3,
        outbox_bytes=400,
        tokens_per_s_ewma=None,
        rss_mb=12.5,
        gpu_layers=0,
        uptime_s=9.0,
    )
    assert set(decoded(telemetry)) == {
        "v",
        "device_id",
        "ts",
        "queue_depth",
        "outbox_depth",
        "outbox_bytes",
        "tokens_per_s_ewma",
        "rss_mb",
        "gpu_layers",
        "uptime_s",
        "dropped",
        "redelivery",
        # additive (docs/protocol.md), with defaults an older agent's telemetry parses to
        "reconnects",
        "store_bytes",
        "model_load_s",
        "commands",
        "max_tokens_limit",
    }
    old = Telemetry.model_validate({k: v for k, v in decoded(telemetry).items()
                                    if k not in ("reconnects", "store_bytes", "model_load_s", "commands",
                                                 "max_tokens_limit")})
    assert (old.reconnects, old.store_bytes, old.model_load_s, old.commands, old.max_tokens_limit) == (0, 0, None, {},
                                                                                                       None)


def test_payload_models_refuse_a_device_id_that_is_not_a_topic_level() -> None:
    with pytest.raises(ValueError):
        Event(device_id="a/b", ts="t", level="info", code="c", message="m")


def test_format_ts_gives_utc_with_milliseconds_and_a_z() -> None:
    moment = datetime(2026, 11, 21, 10, 0, 5, 123456, tzinfo=UTC)
    assert format_ts(moment) == "2026-11-21T10:00:05.123Z"


def test_format_ts_converts_other_offsets_to_utc() -> None:
    moment = datetime(2026, 11, 21, 12, 30, 0, 7000, tzinfo=timezone(timedelta(hours=2)))
    assert format_ts(moment) == "2026-11-21T10:30:00.007Z"


def test_format_ts_of_now_matches_the_wire_format() -> None:
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", format_ts(datetime.now(UTC)))


# --- values at and past the edges of what storage and code accept ------------------------------------


@pytest.mark.parametrize("field", ["created_at", "expires_at"])
@pytest.mark.parametrize("value", ["0001-01-01", "2026-11-21T10:00:00", "2026-11-21 10:00:00.5"])
def test_a_datetime_without_an_offset_is_invalid_and_names_the_field(field: str, value: str) -> None:
    error = refusal(encode(command(**{field: value})))
    assert isinstance(error, InvalidCommand) and error.command_id == "cmd-1"
    assert field in error.message and "UTC offset" in error.message


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "2200-01-01T00:00:00Z",
                                   "9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00-14:00"])
def test_a_datetime_outside_the_sane_years_is_invalid(value: str) -> None:
    error = refusal(encode(command(expires_at=value)))
    assert isinstance(error, InvalidCommand) and "between the years" in error.message


def test_datetimes_at_the_edges_of_the_range_are_kept_in_utc_and_have_a_timestamp() -> None:
    first = parse_command(encode(command(created_at="1970-01-01T00:00:00+00:00",
                                         expires_at="2199-12-31T23:00:00-00:59")), MAX).command
    assert first.created_at.timestamp() == 0.0
    assert first.expires_at is not None and first.expires_at.tzinfo is UTC and first.expires_at.year == 2199


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "x\u0000y"])
def test_text_with_a_lone_surrogate_or_a_nul_is_an_invalid_command_with_its_id(text: str) -> None:
    payload = encode(command(kind="chat", params={"messages": [{"role": "user", "content": text}]}))
    error = refusal(payload)
    assert isinstance(error, InvalidCommand) and error.command_id == "cmd-1"
    assert "surrogate" in error.message or "NUL" in error.message


def test_a_key_with_a_lone_surrogate_is_refused_too() -> None:
    error = refusal(encode(command(kind="onnx", params={"model": "m", "inputs": {"\ud83d": [1.0]}})))
    assert isinstance(error, InvalidCommand) and "surrogate" in error.message


def test_a_surrogate_pair_and_an_escaped_backslash_u0000_are_ordinary_text() -> None:
    parsed = parse_command(encode(command(kind="complete", params={"prompt": "\U0001f600 \\u0000"})), MAX)
    assert isinstance(parsed.params, CompleteParams) and parsed.params.prompt == "\U0001f600 \\u0000"


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json_numbers(constant: bytes) -> None:
    payload = encode(command(kind="complete", params={"prompt": "p"})).replace(b'"p"}', b'"p", "temperature": '
                                                                               + constant + b"}")
    assert isinstance(refusal(payload), BadJson)


def test_a_float_that_overflows_to_infinity_is_invalid() -> None:
    payload = encode(command(kind="complete", params={"prompt": "p"})).replace(b'"p"}', b'"p", "top_p": 1e999}')
    assert isinstance(refusal(payload), InvalidCommand)


@pytest.mark.parametrize(("model", "fields"), [
    (Reply, {"seq": 2**63}), (StreamChunk, {"index": 2**63}), (StreamChunk, {"index": -1}),
    (Telemetry, {"queue_depth": 2**63}), (Telemetry, {"dropped": {"events": 2**64}}),
    (Telemetry, {"rss_mb": float("inf")}), (Telemetry, {"gpu_layers": -(2**63) - 1}),
])
def test_device_payload_integers_are_64_bit_and_floats_finite(model: type[BaseModel], fields: dict[str, Any]) -> None:
    valid = {
        Reply: {"command_id": "c", "device_id": "d", "status": "accepted", "seq": 2**63 - 1, "ts": CREATED},
        StreamChunk: {"command_id": "c", "index": 2**63 - 1, "delta": "x"},
        Telemetry: {"device_id": "d", "ts": CREATED, "queue_depth": 0, "outbox_depth": 0, "outbox_bytes": 0,
                    "tokens_per_s_ewma": None, "rss_mb": 1.0, "gpu_layers": 0, "uptime_s": 1.0},
    }[model]
    model.model_validate(valid)
    with pytest.raises(ValueError):
        model.model_validate({**valid, **fields})
