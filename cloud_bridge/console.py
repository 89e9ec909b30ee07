"""The operator console: what `devices`, `send`, `commands` and `watch` do, against the registry file.

The console never talks MQTT: it reads and writes the same SQLite registry as `cloud-bridge serve`,
whose dispatch loop publishes a queued command within ~100 ms. Everything here takes a Registry and
returns text (or writes lines to a callable), so tests call it without a terminal.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from autoglm_wire.protocol import PARAMS_BY_KIND, Command, describe_validation_error, is_command_id, utc_now
from autoglm_wire.topics import check_device_id
from cloud_bridge.errors import InvalidRequest
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow, DeviceRow

POLL_S = 0.1
PROMPT_KINDS = ("chat", "complete", "cancel")
Write = Callable[[str], None]

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 2


# --- tables --------------------------------------------------------------------------------------


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a header line."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def short_ts(ts: str | None) -> str:
    """`2026-11-21T10:00:00.123Z` -> `2026-11-21 10:00:00`; `-` for none."""
    return ts[:19].replace("T", " ") if ts else "-"


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def devices_table(registry: Registry) -> str:
    """Every device the bridge has heard of, one line each."""
    headers = ["DEVICE", "STATE", "SINCE", "LAST SEEN", "MODEL", "SHA256", "GPU LAYERS", "AGENT"]
    rows = [_device_cells(d) for d in registry.devices.all()]
    if not rows:
        return "no devices yet: none has published a status under this topic prefix"
    counters = registry.counters.all()
    footer = "\n\n" + "  ".join(f"{k}={v}" for k, v in counters.items()) if counters else ""
    return render_table(headers, rows) + footer


def _device_cells(d: DeviceRow) -> list[str]:
    return [d.device_id, d.state or "unknown", short_ts(d.since), short_ts(d.last_seen), _cell(d.model_name),
            (d.model_sha256 or "-")[:12], _cell(d.n_gpu_layers), _cell(d.agent_version)]


def commands_table(registry: Registry, device_id: str | None = None, limit: int = 20,
                   batch: str | None = None) -> str:
    """The most recent commands, newest first."""
    headers = ["ID", "DEVICE", "KIND", "STATE", "ATTEMPTS", "CREATED", "LAST SENT", "UPDATED", "ERROR"]
    rows = [[c.id, c.device_id, c.kind, c.state, str(c.attempts), short_ts(c.created_at),
             short_ts(c.last_sent_at), short_ts(c.updated_at), (c.error or {}).get("code", "-")]
            for c in registry.commands.recent(device_id, limit, batch)]
    if not rows:
        return "no commands yet" + (f" for {device_id}" if device_id else "")
    return render_table(headers, rows)


def alerts_table(registry: Registry, include_cleared: bool = False) -> str:
    """Abnormal-device alerts, newest first."""
    headers = ["DEVICE", "ALERT", "RAISED", "CLEARED", "MESSAGE"]
    rows = [[a.device_id, a.kind, short_ts(a.raised_at), short_ts(a.cleared_at), a.message]
            for a in registry.alerts.recent(open_only=not include_cleared)]
    if not rows:
        return "no open alerts" if not include_cleared else "no alerts yet"
    return render_table(headers, rows)


def policies_table(registry: Registry) -> str:
    """The policy in force on each device (the output of its last succeeded `config` command)."""
    rows = [[d.device_id, ", ".join(d.groups) or "-",
             json.dumps(d.policy, sort_keys=True) if d.policy is not None else "(agent defaults)"]
            for d in registry.devices.all()]
    if not rows:
        return "no devices yet"
    return render_table(["DEVICE", "GROUPS", "POLICY IN FORCE"], rows)


# --- send ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendRequest:
    """A command as the operator asked for it on the command line."""

    device_id: str
    kind: str
    prompt: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    expires_in_s: float = 3600.0
    command_id: str | None = None
    priority: int = 0


def build_params(request: SendRequest) -> dict[str, Any]:
    """The `params` object of the command, validated against the kind's protocol model."""
    if request.kind not in PARAMS_BY_KIND:
        raise InvalidRequest(f"unknown kind {request.kind!r}; protocol v1 kinds are {sorted(PARAMS_BY_KIND)}")
    params = _prompt_params(request)
    sampling = {"max_tokens": request.max_tokens, "temperature": request.temperature, "seed": request.seed}
    params.update({k: v for k, v in sampling.items() if v is not None})
    if request.stream:
        params["stream"] = True
    params.update(request.params)
    try:
        PARAMS_BY_KIND[request.kind].model_validate(params)
    except ValidationError as exc:
        problems = describe_validation_error(exc, root="params")
        raise InvalidRequest(f"invalid params for {request.kind!r}: {problems}") from exc
    return params


def _prompt_params(request: SendRequest) -> dict[str, Any]:
    if request.kind not in PROMPT_KINDS:
        if request.prompt is not None:
            raise InvalidRequest(f"kind {request.kind!r} takes no PROMPT; pass its params with --params JSON")
        return {}
    if request.prompt is None:
        if {"messages", "prompt", "target"} & request.params.keys():
            return {}  # given whole in --params (the API's and /v1's way)
        what = "the target command id" if request.kind == "cancel" else "a PROMPT"
        raise InvalidRequest(f"kind {request.kind!r} needs {what}")
    if request.kind == "chat":
        return {"messages": [{"role": "user", "content": request.prompt}]}
    if request.kind == "complete":
        return {"prompt": request.prompt}
    return {"target": request.prompt}


def build_command(request: SendRequest, now: datetime | None = None) -> Command:
    """The Command envelope to queue: fresh uuid4 hex id (or --id), expiry, target = the device."""
    try:
        check_device_id(request.device_id)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    command_id = request.command_id or uuid.uuid4().hex
    if not is_command_id(command_id):
        raise InvalidRequest(f"command id {command_id!r} must be 1-128 characters of [A-Za-z0-9_.:-]")
    if request.expires_in_s <= 0:
        raise InvalidRequest("--expires-in must be more than 0 seconds")
    if not -1000 <= request.priority <= 1000:
        raise InvalidRequest(f"priority {request.priority} must be between -1000 and 1000 (higher runs first)")
    moment = now or utc_now()
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    return Command(v=1, id=command_id, kind=request.kind, params=build_params(request), created_at=moment,
                   expires_at=moment + timedelta(seconds=request.expires_in_s), target=request.device_id,
                   priority=request.priority)


def queue_command(registry: Registry, request: SendRequest, now: datetime | None = None,
                  resend_interval_s: float = 5.0, batch: str | None = None) -> tuple[CommandRow, list[str]]:
    """Validate and queue a command; returns its row and warnings worth showing the operator."""
    command = build_command(request, now)
    with registry.transaction():
        row = registry.commands.add(command, request.device_id, now, batch=batch)
        notes = _cancel_undelivered(registry, row, now) if row.kind == "cancel" else []
    return row, notes + device_warnings(registry.devices.get(request.device_id), row, resend_interval_s)


def _cancel_undelivered(registry: Registry, cancel: CommandRow, now: datetime | None) -> list[str]:
    """A cancel for a command the device has not accepted yet also stops the bridge resending it.

    The cancel itself still goes to the device, after any copy of the target its session holds,
    so the device cancels that copy if it arrives.
    """
    target = cancel.payload["params"]["target"]
    message = f"cancelled by command {cancel.id} before the device accepted it"
    if registry.commands.close_locally(target, "cancelled", message, now):
        return [f"{target} was not accepted by the device yet: it is marked cancelled and no longer resent"]
    return []


def device_warnings(device: DeviceRow | None, row: CommandRow, resend_interval_s: float) -> list[str]:
    """Why a queued command might not run soon (never an error: the command stays queued)."""
    expiry = short_ts(row.expires_at)
    if device is None or device.state is None:
        return [f"device {row.device_id} has never reported status to this bridge; the command is queued and "
                f"sent every {resend_interval_s:g} s until it is accepted or expires at {expiry} UTC "
                "(a device with no broker session yet misses the copies sent before it connects)"]
    warnings = []
    if device.state == "offline":
        warnings.append(f"device {row.device_id} is offline since {short_ts(device.since)} UTC; its broker session "
                        f"keeps the command until it returns or the command expires at {expiry} UTC")
    if device.kinds and row.kind not in device.kinds:
        warnings.append(f"device {row.device_id} does not list kind {row.kind!r} (it serves {', '.join(device.kinds)});"
                        " it will most likely reject the command")
    return warnings


class StreamFollower:
    """Prints a command's stream chunks in index order as they are stored."""

    def __init__(self, registry: Registry, command_id: str, write: Write) -> None:
        self._registry = registry
        self._command_id = command_id
        self._write = write
        self.next_idx = 0
        self.text = ""
        self.gaps = 0

    def poll(self, final: bool = False) -> None:
        """Print the chunks that continue the text; with `final`, also those after a gap (lost chunks)."""
        for chunk in self._registry.chunks.of_command(self._command_id, self.next_idx):
            if chunk.idx != self.next_idx and not final:
                return
            self.gaps += chunk.idx - self.next_idx
            self._write(chunk.delta)
            self.text += chunk.delta
            self.next_idx = chunk.idx + 1


def wait_for_terminal(registry: Registry, command_id: str, timeout_s: float,
                      follower: StreamFollower | None = None, poll_s: float = POLL_S) -> CommandRow:
    """Poll until the command is terminal or `timeout_s` passed; returns its latest row either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = registry.commands.get(command_id)
        if follower is not None:
            follower.poll(final=row.terminal)
        if row.terminal or time.monotonic() >= deadline:
            return row
        time.sleep(poll_s)


def exit_code(row: CommandRow) -> int:
    """0 succeeded, 1 any other terminal state, 2 not finished (timeout)."""
    if not row.terminal:
        return EXIT_TIMEOUT
    return EXIT_SUCCEEDED if row.state == "succeeded" else EXIT_FAILED


def final_json(row: CommandRow) -> dict[str, Any]:
    """The terminal Reply as the device sent it, or the bridge's own verdict when there is none."""
    if row.reply is not None:
        return row.reply
    return {"v": 1, "command_id": row.id, "device_id": row.device_id, "status": row.state, "error": row.error,
            "attempts": row.attempts, "source": "cloud-bridge"}


def format_outcome(row: CommandRow, streamed: StreamFollower | None = None) -> str:
    """Human-readable result of a finished command (see `describe_failure` for the others)."""
    output = (row.reply or {}).get("output") or {}
    metrics = (row.reply or {}).get("metrics") or {}
    if row.kind == "ping":
        return (f"pong from {row.device_id}: agent {output.get('agent_version', '?')}, "
                f"model {output.get('model', '?')}")
    if row.kind in ("chat", "complete"):
        return _format_text(output, metrics, streamed)
    if row.kind == "cancel" and "target" in output:
        return f"cancel {output['target']}: {output.get('previous_state', '?')} -> {output.get('state', '?')}"
    return json.dumps(output, indent=2, sort_keys=True)


def _format_text(output: dict[str, Any], metrics: dict[str, Any], streamed: StreamFollower | None) -> str:
    text = output.get("text", "")
    lines = []
    if streamed is None:
        lines.append(text)
    elif streamed.text != text:
        lines.append(f"\n[stream incomplete ({streamed.gaps} chunk(s) lost); the full text:]\n{text}")
    else:
        lines.append("")
    usage = output.get("usage") or {}
    summary = [f"finish_reason={output.get('finish_reason', '?')}",
               f"prompt_tokens={usage.get('prompt_tokens', '?')}",
               f"completion_tokens={usage.get('completion_tokens', '?')}"]
    if metrics.get("tokens_per_s") is not None:
        summary.append(f"tokens/s={metrics['tokens_per_s']:.1f}")
    if metrics.get("ttft_ms") is not None:
        summary.append(f"ttft_ms={metrics['ttft_ms']:.0f}")
    lines.append("  ".join(summary))
    return "\n".join(lines)


def describe_failure(row: CommandRow) -> str:
    """One line for a command that did not succeed (or did not finish in time)."""
    if not row.terminal:
        return (f"no terminal reply for {row.id} yet (state {row.state}, {row.attempts} send(s)); it stays queued "
                f"until it expires at {short_ts(row.expires_at)} UTC; follow it with "
                f"`cloud-bridge commands --device {row.device_id}`")
    error = row.error or {}
    detail = f": {error.get('code')}: {error.get('message')}" if error else ""
    return f"command {row.id} on {row.device_id} ended {row.state}{detail}"


def _stream_lines(registry: Registry, cursor: dict[str, int],
                  device_id: str | None) -> list[tuple[str, str, dict[str, Any]]]:
    """One line per command with the text its stream chunks added since the last poll."""
    runs: dict[str, dict[str, Any]] = {}
    for chunk in registry.feeds.chunks(cursor["stream_chunks"], device_id):
        cursor["stream_chunks"] = chunk.id
        run = runs.setdefault(chunk.command_id, {"type": "stream", "device_id": chunk.device_id,
                                                 "command_id": chunk.command_id, "first_index": chunk.idx,
                                                 "text": "", "received_at": chunk.received_at})
        run["text"] += chunk.delta
    return [(run["received_at"], f"{run['received_at']} stream {run['device_id']} {run['command_id']} "
                                 f"{json.dumps(run['text'])}", run) for run in runs.values()]


# --- watch ---------------------------------------------------------------------------------------


def watch(registry: Registry, write: Write, device_id: str | None = None, for_s: float | None = None,
          poll_s: float = 0.2, on_ready: Callable[[], None] | None = None, as_json: bool = False) -> None:
    """Print new status changes, replies and events as they are stored, until `for_s` passed.

    `on_ready` is called once the starting point is fixed: everything stored after it is printed.
    With `as_json`, each is one JSON object per line (`{"type": "status"|"reply"|"event", ...}`).
    """
    cursor = registry.feeds.last_ids()
    if on_ready is not None:
        on_ready()
    deadline = None if for_s is None else time.monotonic() + for_s
    while deadline is None or time.monotonic() < deadline:
        for _, line, record in sorted(_new_lines(registry, cursor, device_id), key=lambda item: item[:2]):
            write(json.dumps(record) if as_json else line)
        time.sleep(poll_s)


def _new_lines(registry: Registry, cursor: dict[str, int],
               device_id: str | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(timestamp, line, JSON record) of every row past `cursor`; advances the cursor."""
    lines = []
    for change in registry.feeds.device_states(cursor["device_states"], device_id):
        cursor["device_states"] = change.id
        lines.append((change.ts, f"{change.ts} status {change.device_id} {change.state}",
                      {"type": "status", **asdict(change)}))
    for reply in registry.feeds.replies(cursor["replies"], device_id):
        cursor["replies"] = reply.id
        error = reply.payload.get("error")
        tail = f" {error['code']}: {error['message']}" if error else ""
        lines.append((reply.received_at, f"{reply.received_at} reply  {reply.device_id} #{reply.seq} "
                                         f"{reply.command_id or '-'} {reply.status}{tail}",
                      {"type": "reply", **asdict(reply)}))
    lines.extend(_stream_lines(registry, cursor, device_id))
    for event in registry.feeds.events(cursor["events"], device_id):
        cursor["events"] = event.id
        lines.append((event.received_at, f"{event.received_at} event  {event.device_id} {event.level} "
                                         f"{event.code}: {event.message}", {"type": "event", **asdict(event)}))
    return lines
