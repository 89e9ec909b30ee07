"""Abnormal devices: pure checks of one device's registry facts, and raising/clearing alerts.

Each check returns a message while its condition holds and None once it ended; `check_fleet`
opens an alert the first time a message appears and closes it when it turns None (one open alert
per device and kind, kept in the registry with raised/cleared times).

- `offline`: the device has been offline longer than `offline_after_s`.
- `error_rate`: of its last `error_window` commands that ran to the end (`succeeded` or `failed`),
  more than `error_rate` failed. Expiries, cancellations and rejections (a client's retry of a
  duplicate id among them) are not device failures and are not counted.
- `outbox_growing`: its last telemetry reports more than `outbox_depth_max` replies waiting to be
  published while it is online (the link or the broker is not draining it).
- `tokens_per_s_drop`: the median decode speed of its last `speed_recent` generations is below
  `1 - tokens_per_s_drop` times the median of the `speed_window` generations before them (at least
  `speed_min_samples` of them). Hysteresis: once raised, it clears only when the recent median is
  back above `1 - tokens_per_s_drop / 2` times that baseline, so a device near the threshold does
  not flap; a single slow generation of a noisy device moves a median of three little.
- `group_mismatch`: the groups its last Status announced differ from those the registry assigns
  it (`cloud-bridge group list`). Membership is the registry's; the device gets no work of a group
  it announces without being assigned it, and no group work at all while it announces such a
  group (a compromised or misconfigured device); an assigned group it does not announce gets no
  work either (it does not subscribe to that group's topic).

The service checks incrementally (`Progress`): the reply-based checks run only for the devices that
answered since the previous checks, in two statements for all of them; alerts are written only
when one opens or closes.

One fleet-wide alert, on device `*` (`FLEET`):
- `dead_letters`: a message was dead-lettered in the last `dead_letter_window_s` (it names the
  devices that sent the most; `cloud-bridge dead-letters` lists them).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cloud_bridge import webhooks
from cloud_bridge.config import AlertConfig
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import DeviceRow


@dataclass(frozen=True)
class Facts:
    """What the checks read about one device."""

    device: DeviceRow
    outcomes: list[str]  # succeeded | failed, newest first
    speeds: list[float]  # newest first
    open_kinds: frozenset[str] = frozenset()  # the kinds of alert open for the device


Check = Callable[[Facts, datetime, AlertConfig], "str | None"]

FLEET = "*"  # the device id of fleet-wide alerts


def offline(facts: Facts, now: datetime, config: AlertConfig) -> str | None:
    device = facts.device
    if device.state != "offline" or not device.since:
        return None
    gone_s = (now - datetime.fromisoformat(device.since)).total_seconds()
    if gone_s <= config.offline_after_s:
        return None
    return f"offline for {gone_s / 60:.0f} min (since {device.since}; threshold {config.offline_after_s:g} s)"


def error_rate(facts: Facts, now: datetime, config: AlertConfig) -> str | None:
    states = facts.outcomes[: config.error_window]
    if len(states) < config.error_window:
        return None
    failed = sum(state == "failed" for state in states)
    if failed / len(states) <= config.error_rate:
        return None
    return f"{failed} of its last {len(states)} finished commands failed (threshold {config.error_rate:.0%})"


def outbox_growing(facts: Facts, now: datetime, config: AlertConfig) -> str | None:
    telemetry = facts.device.last_telemetry or {}
    depth = telemetry.get("outbox_depth") or 0
    if facts.device.state != "online" or depth <= config.outbox_depth_max:
        return None
    return f"{depth} replies waiting in its outbox while online (threshold {config.outbox_depth_max})"


def tokens_per_s_drop(facts: Facts, now: datetime, config: AlertConfig) -> str | None:
    recent = facts.speeds[: config.speed_recent]
    before = facts.speeds[config.speed_recent: config.speed_recent + config.speed_window]
    if len(recent) < config.speed_recent or len(before) < config.speed_min_samples:
        return None
    current, baseline = statistics.median(recent), statistics.median(before)
    drop = config.tokens_per_s_drop / 2 if "tokens_per_s_drop" in facts.open_kinds else config.tokens_per_s_drop
    if baseline <= 0 or current >= baseline * (1 - drop):
        return None
    return (f"decoding at {current:.1f} tokens/s (median of the last {len(recent)}), down from a median of "
            f"{baseline:.1f}")


def group_mismatch(facts: Facts, now: datetime, config: AlertConfig) -> str | None:
    device = facts.device
    if not device.group_mismatch:
        return None
    claimed, assigned = set(device.claimed_groups), set(device.groups)
    parts = []
    if claimed - assigned:
        parts.append(f"announces {', '.join(sorted(claimed - assigned))} without being assigned "
                     "(no group work goes to it until this is resolved)")
    if assigned - claimed:
        parts.append(f"does not announce its assigned {', '.join(sorted(assigned - claimed))} "
                     "(that group's work does not go to it)")
    return ("; ".join(parts) + ": assign with `cloud-bridge group add|remove` or fix the agent's mqtt.groups")


CHECKS: dict[str, Check] = {
    "offline": offline,
    "error_rate": error_rate,
    "outbox_growing": outbox_growing,
    "tokens_per_s_drop": tokens_per_s_drop,
    "group_mismatch": group_mismatch,
}


def dead_letters(counts: dict[str | None, int], config: AlertConfig) -> str | None:
    """`counts`: dead letters of the window by device (None: a topic naming no device)."""
    total = sum(counts.values())
    if not total:
        return None
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0] or ""))[:5]
    senders = ", ".join(f"{device or '(no device)'}: {n}" for device, n in top)
    return (f"{total} message(s) dead-lettered in the last {config.dead_letter_window_s / 60:g} min ({senders}); "
            "see `cloud-bridge dead-letters`")


@dataclass
class Progress:
    """How far `check_fleet` has read, so that the next check reads only what is new.

    The checks that read replies and commands (`error_rate`, `tokens_per_s_drop`) can only change
    for a device that sent a reply since, so they run for those devices alone; the others
    (`offline`, `outbox_growing`) read the device rows, all of them in one query. Reply ids are taken
    in insertion order but committed in any order (two replicas, concurrent batches), so a check
    reads the replies after the newest id seen by the check *before* the previous one: a reply
    committed up to one interval late is still looked at.
    """

    reply_ids: tuple[int, int] = (0, 0)  # the newest reply id at the check before last, and at the last
    checked: bool = False  # False: no check yet, the next one reads every device

    def advance(self, newest: int) -> None:
        self.reply_ids = (self.reply_ids[1], newest)
        self.checked = True


ROW_CHECKS = ("offline", "outbox_growing", "group_mismatch")  # the checks that read the device row only


def check_fleet(registry: Registry, config: AlertConfig, now: datetime,
                progress: Progress | None = None) -> list[tuple[str, str, bool]]:
    """Run the checks on the fleet, then the fleet-wide one; returns (device, kind, raised?) for each
    alert opened or closed, and queues its webhook notifications (cloud_bridge.webhooks). With
    `progress` (kept by the caller between checks) only what changed since is read (see Progress);
    without it, every device is checked in full."""
    changes: list[tuple[str, str, bool]] = []

    def update(device_id: str, kind: str, message: str | None, is_open: bool) -> None:
        if (message is not None) == is_open:
            return  # nothing to open or to close
        with registry.transaction():  # the alert change and its webhook deliveries, together
            if message is not None and registry.alerts.open(device_id, kind, message, now):
                raised = True
            elif message is None and registry.alerts.clear(device_id, kind, now):
                raised = False
            else:
                return
            alert = registry.alerts.latest(device_id, kind)
            if alert is not None:
                webhooks.enqueue(registry, config.webhooks, alert, "raised" if raised else "cleared", now)
        changes.append((device_id, kind, raised))

    open_alerts: dict[str, set[str]] = {}
    for alert in registry.alerts.recent(open_only=True, limit=1_000_000):
        open_alerts.setdefault(alert.device_id, set()).add(alert.kind)
    newest = registry.replies.newest_id()
    devices = registry.devices.all()
    if progress is None or not progress.checked:
        answered = sorted(device.device_id for device in devices)
    else:
        answered = sorted(registry.replies.devices_after(progress.reply_ids[0]))
    outcomes = registry.commands.outcomes_of(answered, config.error_window)
    speeds = registry.replies.decode_speeds_of(answered, config.speed_recent + config.speed_window)
    for device in devices:
        kinds = open_alerts.get(device.device_id, set())
        facts = Facts(device, outcomes.get(device.device_id, []), speeds.get(device.device_id, []), frozenset(kinds))
        checks = CHECKS if device.device_id in outcomes else ROW_CHECKS
        for kind in checks:
            update(device.device_id, kind, CHECKS[kind](facts, now, config), kind in kinds)
    window = timedelta(seconds=config.dead_letter_window_s)
    update(FLEET, "dead_letters", dead_letters(registry.dead_letters.by_device_since(now - window), config),
           "dead_letters" in open_alerts.get(FLEET, set()))
    if progress is not None:
        progress.advance(newest)
    return changes
