"""What `cloud-bridge model list` and `cloud-bridge rollout status` print (text only, like `console`)."""

from __future__ import annotations

from cloud_bridge.console import render_table, short_ts
from cloud_bridge.rollouts import status
from cloud_bridge.store.models import ModelRow
from cloud_bridge.store.registry import Registry

BAR_WIDTH = 20


def models_table(models: list[ModelRow]) -> str:
    if not models:
        return "no models registered: add one with `cloud-bridge model add FILE`"
    headers = ["NAME", "SHA256", "SIZE", "ARCH", "QUANT", "PARAMS", "CONTEXT", "SOURCE", "ADDED"]
    rows = [[m.name, m.sha256[:12], str(m.size), m.architecture or "-", m.quantization or "-",
             str(m.parameters or "-"), str(m.context_length or "-"), m.url or "bridge", short_ts(m.added_at)]
            for m in models]
    return render_table(headers, rows)


def rollouts_table(registry: Registry, limit: int = 20) -> str:
    rows = []
    for rollout in registry.rollouts.recent(limit):
        view = status(registry, rollout.id)
        counts = " ".join(f"{state}={n}" for state, n in sorted(view["counts"].items()))
        rows.append([rollout.id, rollout.model_name, rollout.target, rollout.state,
                     f"{rollout.wave + 1}/{len(rollout.waves)}", f"{view['failures']}/{rollout.max_failures}", counts])
    if not rows:
        return "no rollouts yet: start one with `cloud-bridge rollout create --model N --target group/G`"
    return render_table(["ROLLOUT", "MODEL", "TARGET", "STATE", "WAVE", "FAILED/MAX", "DEVICES"], rows)


def progress_bar(percent: float | None) -> str:
    filled = round((percent or 0) / 100 * BAR_WIDTH)
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def rollout_text(registry: Registry, rollout_id: str) -> str:
    """One rollout: its state, then each device with a progress bar, canary result and reason."""
    view = status(registry, rollout_id)
    rollout = view["rollout"]
    waves = ", ".join(f"{w:g}%" for w in rollout.waves)
    head = (f"rollout {rollout.id}: {rollout.model_name} ({rollout.model_sha256[:12]}) to {rollout.target}\n"
            f"state {rollout.state}, wave {rollout.wave + 1} of {len(rollout.waves)} ({waves}), "
            f"failures {view['failures']} (more than {rollout.max_failures} halts)"
            + (f"\nreason: {rollout.reason}" if rollout.reason else ""))
    rows = []
    for device in view["devices"]:
        progress = progress_bar(100.0 if device.final else device.percent)
        if device.state == "queued" and device.phase is not None:
            progress += f" {device.phase}" + (f" {device.percent:.0f}%" if device.percent is not None else "")
        canary = device.canary or {}
        canary_text = "-" if not canary else ("passed" if canary.get("passed") else "failed")
        rows.append([device.device_id, str(device.wave + 1), device.state, progress, canary_text,
                     device.rollback or "-", device.reason or ""])
    table = render_table(["DEVICE", "WAVE", "STATE", "PROGRESS", "CANARY", "ROLLBACK", "REASON"], rows)
    return head + "\n\n" + table
