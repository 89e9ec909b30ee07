"""What the operator console prints: tables of devices, commands, alerts and policies, a command's
outcome, and the lines of `cloud-bridge watch`.

Only rendering: sending and following commands is `commands`. Everything here takes a Registry or
its rows and returns text (or writes lines to a callable), so tests call it without a terminal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from cloud_bridge.store.devices import DeviceQuery
from cloud_bridge.store.feeds import FeedReader
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow, DeviceRow

Write = Callable[[str], None]


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


def devices_table(registry: Registry, devices: list[DeviceRow] | None = None) -> str:
    """These devices (default: every device the bridge has heard of), one line each."""
    headers = ["DEVICE", "STATE", "SINCE", "LAST SEEN", "MODEL", "SHA256", "PREVIOUS", "ROLLOUT", "GPU LAYERS",
               "AGENT"]
    rows = [_device_cells(d) for d in (registry.devices.all() if devices is None else devices)]
    if not rows:
        return ("no device matches" if devices is not None and registry.devices.page(DeviceQuery(limit=1))[1]
                else "no devices yet: none has published a status under this topic prefix")
    counters = registry.counters.all()
    footer = "\n\n" + "  ".join(f"{k}={v}" for k, v in counters.items()) if counters else ""
    return render_table(headers, rows) + footer


def _device_cells(d: DeviceRow) -> list[str]:
    previous = f"{d.previous_model_name} ({(d.previous_model_sha256 or '')[:12]})" if d.previous_model_name else "-"
    return [d.device_id, d.state or "unknown", short_ts(d.since), short_ts(d.last_seen), _cell(d.model_name),
            (d.model_sha256 or "-")[:12], previous, _cell(d.rollout), _cell(d.n_gpu_layers), _cell(d.agent_version)]


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


def deliveries_table(registry: Registry, limit: int = 50) -> str:
    """The webhook delivery log of alert notifications, newest first."""
    headers = ["ALERT", "EVENT", "WEBHOOK", "STATE", "ATTEMPTS", "CREATED", "DELIVERED", "LAST ERROR"]
    rows = [[str(d.alert_id), d.event, d.webhook, d.state, str(d.attempts), short_ts(d.created_at),
             short_ts(d.delivered_at), d.last_error or "-"] for d in registry.deliveries.recent(limit)]
    return render_table(headers, rows) if rows else "no alert notifications yet (is [[alerts.webhooks]] set?)"


def dead_letters_table(registry: Registry, device_id: str | None = None, limit: int = 20) -> str:
    """Messages the bridge could not store, newest first: where from, why, and how they start."""
    headers = ["ID", "RECEIVED", "TOPIC", "BYTES", "ERROR", "PAYLOAD"]
    rows = [[str(d.id), short_ts(d.received_at), d.topic, str(d.size), d.error[:100], d.preview[:60]]
            for d in registry.dead_letters.recent(device_id, limit)]
    if not rows:
        return "no dead letters" + (f" from {device_id}" if device_id else "") + ": every message was stored"
    return render_table(headers, rows)


def group_cell(device: DeviceRow) -> str:
    """Its assigned groups, and what it announces when that differs (a hint, never used to route)."""
    assigned = ", ".join(device.groups) or "-"
    if not device.group_mismatch:
        return assigned
    return f"{assigned} (announces: {', '.join(device.claimed_groups) or 'none'})"


def groups_table(registry: Registry) -> str:
    """Each device's assigned groups, what it announces, and the groups whose work goes to it."""
    rows = [[d.device_id, ", ".join(d.groups) or "-", ", ".join(d.claimed_groups) or "-",
             ", ".join(d.routable_groups) or "-", "MISMATCH" if d.group_mismatch else "ok"]
            for d in registry.devices.all() if d.groups or d.claimed_groups]
    if not rows:
        return "no group memberships: assign one with `cloud-bridge group add DEVICE GROUP`"
    return render_table(["DEVICE", "ASSIGNED", "ANNOUNCED", "ROUTED", "CHECK"], rows)


def groups_toml(registry: Registry) -> str:
    """The registry's membership as the `[groups]` table that deploy/mosquitto/make_acl.py --groups reads."""
    lines = ["# group membership assigned in the cloud-bridge registry (cloud-bridge group list --toml)", "[groups]"]
    lines += [f"{json.dumps(group)} = {json.dumps(devices)}" for group, devices in registry.groups.members().items()]
    return "\n".join(lines) + "\n"


def policies_table(registry: Registry) -> str:
    """The policy in force on each device (the output of its last succeeded `config` command)."""
    rows = [[d.device_id, group_cell(d),
             json.dumps(d.policy, sort_keys=True) if d.policy is not None else "(agent defaults)"]
            for d in registry.devices.all()]
    if not rows:
        return "no devices yet"
    return render_table(["DEVICE", "GROUPS", "POLICY IN FORCE"], rows)


def tokens_table(registry: Registry) -> str:
    """The API's named tokens (never the tokens themselves)."""
    rows = [[t.name, t.role, short_ts(t.created_at), short_ts(t.last_used_at)] for t in registry.tokens.all()]
    if not rows:
        return "no named tokens: only the [http] token_file token (admin) works; add one with `cloud-bridge token add`"
    return render_table(["NAME", "ROLE", "CREATED", "LAST USED"], rows)


def audit_table(registry: Registry, limit: int = 50) -> str:
    """The newest entries of the audit log, newest first."""
    rows = [[short_ts(a.ts), a.actor, a.action, a.target, a.outcome[:100]] for a in registry.audit.recent(limit)]
    if not rows:
        return "the audit log is empty: nothing was changed through the API or the CLI yet"
    return render_table(["TIME", "WHO", "ACTION", "TARGET", "OUTCOME"], rows)


# --- a command's outcome ----------------------------------------------------------------------


def final_json(row: CommandRow) -> dict[str, Any]:
    """The terminal Reply as the device sent it, or the bridge's own verdict when there is none."""
    if row.reply is not None:
        return row.reply
    return {"v": 1, "command_id": row.id, "device_id": row.device_id, "status": row.state, "error": row.error,
            "attempts": row.attempts, "source": "cloud-bridge"}


def format_outcome(row: CommandRow, streamed: str | None = None, lost_chunks: int = 0) -> str:
    """Human-readable result of a finished command (see `describe_failure` for the others).

    `streamed` is the text already printed as the device streamed it, `lost_chunks` how many of its
    chunks never arrived.
    """
    output = (row.reply or {}).get("output") or {}
    metrics = (row.reply or {}).get("metrics") or {}
    if row.kind == "ping":
        return (f"pong from {row.device_id}: agent {output.get('agent_version', '?')}, "
                f"model {output.get('model', '?')}")
    if row.kind in ("chat", "complete"):
        return _format_text(output, metrics, streamed, lost_chunks)
    if row.kind == "cancel" and "target" in output:
        return f"cancel {output['target']}: {output.get('previous_state', '?')} -> {output.get('state', '?')}"
    return json.dumps(output, indent=2, sort_keys=True)


def _format_text(output: dict[str, Any], metrics: dict[str, Any], streamed: str | None, lost_chunks: int) -> str:
    text = output.get("text", "")
    lines = []
    if streamed is None:
        lines.append(text)
    elif streamed != text:
        lines.append(f"\n[stream incomplete ({lost_chunks} chunk(s) lost); the full text:]\n{text}")
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


def _stream_lines(feed: FeedReader) -> list[tuple[str, str, dict[str, Any]]]:
    """One line per command with the text its stream chunks added since the last poll."""
    runs: dict[str, dict[str, Any]] = {}
    for chunk in feed.chunks():
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
    feed = FeedReader(registry.feeds, device_id)
    if on_ready is not None:
        on_ready()
    deadline = None if for_s is None else time.monotonic() + for_s
    while deadline is None or time.monotonic() < deadline:
        for _, line, record in sorted(_new_lines(feed), key=lambda item: item[:2]):
            write(json.dumps(record) if as_json else line)
        time.sleep(poll_s)


def _new_lines(feed: FeedReader) -> list[tuple[str, str, dict[str, Any]]]:
    """(timestamp, line, JSON record) of every row the feed has not returned before."""
    lines = []
    for change in feed.device_states():
        lines.append((change.ts, f"{change.ts} status {change.device_id} {change.state}",
                      {"type": "status", **asdict(change)}))
    for reply in feed.replies():
        error = reply.payload.get("error")
        tail = f" {error['code']}: {error['message']}" if error else ""
        lines.append((reply.received_at, f"{reply.received_at} reply  {reply.device_id} #{reply.seq} "
                                         f"{reply.command_id or '-'} {reply.status}{tail}",
                      {"type": "reply", **asdict(reply)}))
    lines.extend(_stream_lines(feed))
    for event in feed.events():
        lines.append((event.received_at, f"{event.received_at} event  {event.device_id} {event.level} "
                                         f"{event.code}: {event.message}", {"type": "event", **asdict(event)}))
    return lines
