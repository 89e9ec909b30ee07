"""The console's rendering behind `cloud-bridge devices/commands/send/watch`, on a tmp registry."""

from __future__ import annotations

from cloud_bridge.cli import exit_code
from cloud_bridge.commands import CommandRequest, queue_command
from cloud_bridge.console import (
    commands_table,
    describe_failure,
    devices_table,
    final_json,
    format_outcome,
    render_table,
)

from .factories import T0, at, chunk, online, reply


def test_a_ping_outcome_prints_pong(registry):
    row, _ = queue_command(registry, CommandRequest(target="dev-1", kind="ping", id="c1"), T0)
    registry.replies.record(reply(1, "succeeded", output={"pong": True, "agent_version": "0.1.0", "model": "m"}), at(1))
    row = registry.commands.get("c1")
    assert format_outcome(row).startswith("pong from dev-1")
    assert exit_code(row) == 0 and final_json(row)["output"]["pong"] is True


def test_a_chat_outcome_prints_text_and_metrics(registry):
    queue_command(registry, CommandRequest(target="dev-1", kind="chat", prompt="hi", id="c1"), T0)
    output = {"text": "Hello!", "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    metrics = {"tokens_per_s": 20.0, "ttft_ms": 15.2}
    registry.replies.record(reply(1, "succeeded", output=output, metrics=metrics), at(1))
    text = format_outcome(registry.commands.get("c1"))
    assert text.splitlines()[0] == "Hello!"
    assert "finish_reason=stop" in text and "tokens/s=20.0" in text and "ttft_ms=15" in text


def test_a_failed_or_unfinished_command_explains_itself(registry):
    queue_command(registry, CommandRequest(target="dev-1", kind="ping", id="c1"), T0)
    assert "stays queued" in describe_failure(registry.commands.get("c1"))
    assert exit_code(registry.commands.get("c1")) == 2
    registry.commands.mark_expired("c1", "no accepted", at(10))
    row = registry.commands.get("c1")
    assert exit_code(row) == 1 and "ended expired: expired: no accepted" in describe_failure(row)
    assert final_json(row)["status"] == "expired" and final_json(row)["source"] == "cloud-bridge"


def test_tables_list_devices_and_commands(registry):
    assert "no devices yet" in devices_table(registry)
    registry.devices.record_status(online(), T0)
    queue_command(registry, CommandRequest(target="dev-1", kind="ping", id="c1"), T0)
    assert "glm-4-tiny" in devices_table(registry) and "abababababab" in devices_table(registry)
    assert "c1" in commands_table(registry) and "no commands yet for dev-2" in commands_table(registry, "dev-2")


def test_render_table_aligns_columns():
    assert render_table(["A", "BB"], [["xxx", "y"]]) == "A    BB\nxxx  y"


def test_the_devices_table_shows_the_bridge_counters(registry):
    registry.devices.record_status(online(), T0)
    registry.counters.bump("bad_payloads")
    assert devices_table(registry).splitlines()[-1] == "bad_payloads=1"


def test_watch_shows_streamed_text_as_it_arrives_and_json_lines_for_scripts(registry):
    import json

    from cloud_bridge.console import watch

    registry.devices.record_status(online(), T0)
    registry.chunks.record("dev-1", chunk(0, "Hel", "c9"), T0)  # before watch starts: not shown

    def produce() -> None:
        for index, delta in enumerate(["lo", " wor", "ld"], start=1):
            registry.chunks.record("dev-1", chunk(index, delta, "c9"), at(1))
        registry.replies.record(reply(1, "succeeded", "c9"), at(2))

    text_lines: list[str] = []
    watch(registry, text_lines.append, for_s=0.01, on_ready=produce)
    assert any('stream dev-1 c9 "lo world"' in line for line in text_lines)
    json_lines: list[str] = []
    watch(registry, json_lines.append, for_s=0.01, on_ready=lambda: registry.chunks.record(
        "dev-1", chunk(4, "!", "c9"), at(3)), as_json=True)
    assert json.loads(json_lines[0]) == {
        "type": "stream", "device_id": "dev-1", "command_id": "c9", "first_index": 4, "text": "!",
        "received_at": "2026-11-21T10:00:03.000Z"}
