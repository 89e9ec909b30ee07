"""Staged model rollouts: planning the waves, the deploy and rollback commands, and driving a rollout
from wave to wave as its devices report. No MQTT: commands are queued in the registry and the
dispatch loop publishes them.

A rollout deploys one registered model (`cloud-bridge model add`) to the devices its target matched
when it was created, split into waves by cumulative percentages (`5,25,100`: the first 5 %, then up
to 25 %, then the rest; a wave never empty). Each device gets ONE `model` command (`action:
"deploy"`, id `<rollout>.<device>`, on its own `P/D/cmd`) whose `url` carries a download token for
that device (or the model's mirror url). A device of a wave ends in one of these states:

- `activated` / `unchanged`: the new model is active;
- `rolled_back` / `download_failed` / `failed`: the device stayed on (or went back to) its previous
  model; `failed` also covers a rejection (an older agent without kind `model`). These are the
  failures counted against `max_failures`;
- `timed_out`: no `accepted` within `[rollouts] device_timeout_s` (the command expired), or no end
  `finish_timeout_s` after that. Reported, not counted as a failure;
- `cancelled` / `skipped`: the rollout was aborted, halted or rolled back before the device
  deployed, or before its wave started.

`drive` (every `[rollouts] check_interval_s`, from the service loop) settles devices from their
commands' rows, halts a running rollout when more than `max_failures` devices failed (the devices
of the halted wave that activated are sent a `model` rollback; those still under way get it if they
activate), and starts the next wave once every device of the current one has an end. Each step is
a conditional update (store/rollouts.py), so several bridge replicas may drive the same rollouts.
"""

from __future__ import annotations

import logging
import math
import uuid
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoglm_wire import settings
from autoglm_wire.model_command import MODEL_NAME_PATTERN, Canary
from autoglm_wire.protocol import Command, describe_validation_error, utc_now
from cloud_bridge import artifacts, commands
from cloud_bridge.config import BridgeConfig
from cloud_bridge.errors import DuplicateCommand, InvalidRequest, UnknownCommand
from cloud_bridge.store.models import ModelRow
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rollouts import ACTIVE_STATES, FAILED, RolloutDeviceRow, RolloutRow
from cloud_bridge.store.rows import CommandRow, parse_ts

log = logging.getLogger(__name__)

DEFAULT_WAVES = (5, 25, 100)
ROLLOUT_ID_CHARS = 64
MAX_FAILURES_LIMIT = 1_000_000  # more than any fleet has devices; keeps the value a 64-bit integer


class RolloutRequest(BaseModel):
    """The body of `POST /api/rollouts`, also built by `cloud-bridge rollout create`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME_PATTERN, description="a registered model's name or sha256")
    target: str | None = Field(default=None, description='a device id or "group/G"')
    filter: commands.DeviceFilter | None = Field(default=None, description="instead of target: matching devices")
    waves: list[float] = Field(default=list(DEFAULT_WAVES), min_length=1, max_length=20,
                               description="cumulative percentages of the devices, the last 100")
    max_failures: int = Field(default=0, ge=0, le=MAX_FAILURES_LIMIT,
                              description="more failed devices than this halts the rollout")
    canary: Canary | None = None
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")


# --- planning (pure) -------------------------------------------------------------------------------


def parse_waves(text: str) -> list[float]:
    """`5%,25%,100%` (or without the %) -> [5, 25, 100]."""
    try:
        return [float(part.strip().removesuffix("%")) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InvalidRequest(f"--waves {text!r}: give cumulative percentages like 5%,25%,100%") from exc


def check_waves(waves: list[float]) -> list[float]:
    if not waves or any(not 0 < w <= 100 for w in waves) or any(b <= a for a, b in zip(waves, waves[1:], strict=False)):
        raise InvalidRequest(f"waves {waves}: cumulative percentages, increasing, each in (0, 100]")
    if waves[-1] != 100:
        raise InvalidRequest(f"waves {waves}: the last wave must be 100 (every device)")
    return waves


def plan_waves(device_ids: list[str], waves: list[float]) -> list[list[str]]:
    """The devices (in the given order) of each wave; a wave that would be empty is left out."""
    plan, start = [], 0
    for percent in check_waves(waves):
        end = min(len(device_ids), math.ceil(len(device_ids) * percent / 100))
        if end > start:
            plan.append(device_ids[start:end])
            start = end
    return plan


def outcome(command: CommandRow, now: datetime, finish_timeout_s: float) -> tuple[str, str | None, Any] | None:
    """(device state, reason, canary summary) of a deploy command, or None while it is under way."""
    reply = command.reply or {}
    output = reply.get("output") or {}
    error = command.error or {}
    if command.state == "succeeded":
        result = output.get("result")
        return ("unchanged" if result == "unchanged" else "activated"), None, output.get("canary")
    if command.state == "failed":
        result = output.get("result")
        state = result if result in ("rolled_back", "download_failed") else "failed"
        return state, output.get("reason") or error.get("message"), output.get("canary")
    if command.state == "rejected":
        return "failed", f"rejected: {error.get('code')}: {error.get('message')}", None
    if command.state == "expired":
        return "timed_out", error.get("message") or "the command expired", None
    if command.state == "cancelled":
        return "cancelled", error.get("message"), None
    expires = parse_ts(command.expires_at)
    if expires is not None and now >= expires + timedelta(seconds=finish_timeout_s):
        return "timed_out", f"accepted but no end reported {finish_timeout_s:g} s after the command expired", None
    return None


# --- commands --------------------------------------------------------------------------------------


def base_url(config: BridgeConfig) -> str:
    return (config.models.public_url or f"http://{config.http.host}:{config.http.port}").rstrip("/")


def download_url(config: BridgeConfig, model: ModelRow, device_id: str, now: datetime) -> str:
    """The model's mirror url, or the bridge's `/artifacts/<sha256>` with a token for this device."""
    if model.url is not None:
        return model.url
    secret = artifacts.load_secret(settings.secret_path(config.models.secret_file, "[models] secret_file"))
    expiry = int(now.timestamp() + config.models.token_ttl_s)
    token = artifacts.make_token(secret, model.sha256, device_id, expiry)
    return f"{base_url(config)}/artifacts/{model.sha256}?token={token}"


def _command(command_id: str, device_id: str, params: dict[str, Any], now: datetime, expires_in_s: float) -> Command:
    moment = now.replace(microsecond=now.microsecond // 1000 * 1000)
    return Command(v=1, id=command_id, kind="model", params=params, created_at=moment,
                   expires_at=moment + timedelta(seconds=expires_in_s), target=device_id)


def deploy_command(config: BridgeConfig, rollout: RolloutRow, model: ModelRow, device_id: str,
                   now: datetime) -> Command:
    url = download_url(config, model, device_id, now)
    params: dict[str, Any] = {"action": "deploy", "name": model.name, "url": url, "sha256": model.sha256,
                              "size": model.size, "rollout": rollout.id}
    if rollout.canary is not None:
        params["canary"] = rollout.canary
    return _command(command_id(rollout.id, device_id), device_id, params, now, config.rollouts.device_timeout_s)


def rollback_command(config: BridgeConfig, rollout: RolloutRow, device_id: str, now: datetime) -> Command:
    params = {"action": "rollback", "rollout": rollout.id}
    return _command(command_id(rollout.id, device_id, "rollback"), device_id, params, now,
                    config.rollouts.device_timeout_s)


def command_id(rollout_id: str, device_id: str, what: str = "") -> str:
    return ".".join(part for part in (rollout_id, what, device_id) if part)


# --- operator actions ----------------------------------------------------------------------------


def create(registry: Registry, config: BridgeConfig, request: RolloutRequest,
           now: datetime | None = None) -> RolloutRow:
    """Plan a rollout over the devices its target matches now, and queue its first wave."""
    moment = now or utc_now()
    model = registry.models.find(request.model)
    if model.url is None and not artifacts.artifact_path(config.models.dir, model.sha256).is_file():
        raise InvalidRequest(f"model {model.name!r} has no file in [models] dir {config.models.dir} and no url; "
                             "add it again with `cloud-bridge model add FILE`")
    if (request.target is None) == (request.filter is None):
        raise InvalidRequest('give exactly one of "target" (a device id or "group/G") and "filter"')
    if request.target is not None:
        parsed = commands.parse_target(request.target)
        device_filter = parsed if isinstance(parsed, commands.DeviceFilter) else commands.DeviceFilter(
            device_ids=(parsed,))
        label = request.target
    else:
        device_filter, label = request.filter, request.filter.label()
    devices = [d.device_id for d in commands.select(registry, device_filter)]
    if not devices:
        raise InvalidRequest(f"no known device matches {label}; list the fleet with `cloud-bridge devices`")
    plan = plan_waves(devices, check_waves(request.waves))
    rollout_id = request.id or f"r{uuid.uuid4().hex[:11]}"
    longest = max(len(command_id(rollout_id, d, "rollback")) for d in devices)
    if longest > 128:
        raise InvalidRequest(f"rollout id {rollout_id!r} is too long for these device ids (command ids are at most "
                             "128 characters)")
    rollout = RolloutRow(id=rollout_id, model_name=model.name, model_sha256=model.sha256, target=label,
                         waves=_effective_waves(devices, request.waves), max_failures=request.max_failures,
                         canary=request.canary.model_dump(exclude_none=True) if request.canary else None,
                         state="running", wave=0, reason=None, created_at="", updated_at="")
    with registry.transaction():
        registry.rollouts.create(rollout, plan, moment)
        _start_waiting(registry, config, registry.rollouts.get(rollout_id), model, moment)
    log.info("rollout %s of %s to %s: %d device(s) in %d wave(s)", rollout_id, model.name, label, len(devices),
             len(plan))
    return registry.rollouts.get(rollout_id)


def _effective_waves(devices: list[str], waves: list[float]) -> list[float]:
    """The percentages of the waves that are not empty (the plan's waves)."""
    kept, start = [], 0
    for percent in waves:
        end = min(len(devices), math.ceil(len(devices) * percent / 100))
        if end > start:
            kept.append(int(percent) if percent == int(percent) else percent)
            start = end
    return kept


def parse_canary(data: object) -> dict[str, Any]:
    """A canary object (from --canary FILE) checked against the contract."""
    try:
        return Canary.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid canary: {describe_validation_error(exc, root='canary')}") from exc


def pause(registry: Registry, rollout_id: str, now: datetime | None = None) -> RolloutRow:
    """No new wave starts; the devices of the current one go on and are recorded."""
    return _move(registry, rollout_id, ("running",), "paused", None, now)


def resume(registry: Registry, rollout_id: str, now: datetime | None = None) -> RolloutRow:
    return _move(registry, rollout_id, ("paused",), "running", None, now)


def abort(registry: Registry, rollout_id: str, reason: str = "aborted by the operator",
          now: datetime | None = None) -> RolloutRow:
    """Stop: no new wave; commands not yet accepted are cancelled; the rest end as they end."""
    row = _move(registry, rollout_id, ACTIVE_STATES, "aborted", reason, now)
    _stop_devices(registry, row, None, now)
    return registry.rollouts.get(rollout_id)


def rollback(registry: Registry, rollout_id: str, reason: str = "rolled back by the operator",
             now: datetime | None = None) -> RolloutRow:
    """Stop the rollout and send a `model` rollback to every device of it that activated the model."""
    row = _move(registry, rollout_id, (*ACTIVE_STATES, "halted", "completed", "aborted"), "rolled_back", reason, now)
    registry.rollouts.want_rollback(rollout_id, None, now)
    _stop_devices(registry, row, None, now)
    return registry.rollouts.get(rollout_id)


def _move(registry: Registry, rollout_id: str, from_states: tuple[str, ...], to: str, reason: str | None,
          now: datetime | None) -> RolloutRow:
    current = registry.rollouts.get(rollout_id)
    if not registry.rollouts.move(rollout_id, from_states, to, reason, now):
        raise InvalidRequest(f"rollout {rollout_id} is {registry.rollouts.get(rollout_id).state}; it can be made "
                             f"{to} only from {' or '.join(from_states)}")
    log.info("rollout %s: %s -> %s%s", rollout_id, current.state, to, f" ({reason})" if reason else "")
    return registry.rollouts.get(rollout_id)


def _stop_devices(registry: Registry, rollout: RolloutRow, wave: int | None, now: datetime | None) -> None:
    """Devices whose wave has not started are skipped; deploys not yet accepted are cancelled (of `wave`, or all)."""
    for device in registry.rollouts.devices(rollout.id):
        if device.state == "waiting":
            registry.rollouts.settle(rollout.id, device.device_id, "skipped", f"rollout {rollout.state}", None, now)
        elif device.state == "queued" and device.command_id is not None and (wave is None or device.wave == wave):
            registry.commands.close_locally(device.command_id, "cancelled",
                                             f"rollout {rollout.id} {rollout.state} before the device accepted it", now)


# --- the service loop ------------------------------------------------------------------------------


def drive_all(registry: Registry, config: BridgeConfig, now: datetime) -> None:
    """One pass over every rollout that needs it (see the module doc)."""
    for rollout in registry.rollouts.needing_attention():
        try:
            drive(registry, config, rollout, now)
        except Exception:  # one rollout's problem (a missing model file...) must not stall the others
            log.exception("rollout %s: pass failed; retrying on the next one", rollout.id)


def drive(registry: Registry, config: BridgeConfig, rollout: RolloutRow, now: datetime) -> None:
    """Settle the devices under way, then halt, start or finish waves, then queue and follow rollbacks."""
    for device in registry.rollouts.devices(rollout.id):
        if device.state == "queued" and device.command_id is not None:
            _settle(registry, config, rollout, device, now)
    _step(registry, config, registry.rollouts.get(rollout.id), now)
    for device in registry.rollouts.devices(rollout.id):
        if device.rollback is not None:
            _follow_rollback(registry, config, rollout, device, now)


def _step(registry: Registry, config: BridgeConfig, rollout: RolloutRow, now: datetime) -> None:
    if rollout.state != "running":
        return
    failures = registry.rollouts.failures(rollout.id)
    if failures > rollout.max_failures:
        _halt(registry, rollout, failures, now)
        return
    devices = registry.rollouts.devices(rollout.id, rollout.wave)
    model = registry.models.find(rollout.model_sha256)
    if any(d.state == "waiting" for d in devices):
        _start_waiting(registry, config, rollout, model, now)
        return
    if not all(d.final for d in devices):
        return
    last = max(d.wave for d in registry.rollouts.devices(rollout.id))
    if rollout.wave >= last:
        if registry.rollouts.move(rollout.id, ("running",), "completed", None, now):
            log.info("rollout %s completed", rollout.id)
    elif registry.rollouts.advance_wave(rollout.id, rollout.wave, now):
        log.info("rollout %s: wave %d done, starting wave %d", rollout.id, rollout.wave + 1, rollout.wave + 2)
        _start_waiting(registry, config, registry.rollouts.get(rollout.id), model, now)


def _start_waiting(registry: Registry, config: BridgeConfig, rollout: RolloutRow, model: ModelRow,
                   now: datetime) -> None:
    """Queue the deploy command of every device of the current wave still `waiting` (one transaction each:
    the replica whose conditional update wins queues it)."""
    for device in registry.rollouts.devices(rollout.id, rollout.wave):
        if device.state != "waiting":
            continue
        command = deploy_command(config, rollout, model, device.device_id, now)
        with registry.transaction():
            if registry.rollouts.mark_queued(rollout.id, device.device_id, command.id, now):
                registry.commands.add(command, device.device_id, now, batch=rollout.id)


def _settle(registry: Registry, config: BridgeConfig, rollout: RolloutRow, device: RolloutDeviceRow,
            now: datetime) -> None:
    try:
        result = outcome(registry.commands.get(device.command_id), now, config.rollouts.finish_timeout_s)
    except UnknownCommand:  # deleted by [retention] before it ended: it can no longer end
        result = "timed_out", f"command {device.command_id} is no longer in the registry", None
    if result is None:
        return
    state, reason, canary = result
    if registry.rollouts.settle(rollout.id, device.device_id, state, reason,
                                canary if isinstance(canary, dict) else None, now):
        level = logging.WARNING if state in FAILED or state == "timed_out" else logging.INFO
        log.log(level, "rollout %s: %s %s%s", rollout.id, device.device_id, state, f": {reason}" if reason else "")


def _halt(registry: Registry, rollout: RolloutRow, failures: int, now: datetime) -> None:
    reason = f"{failures} device(s) failed, more than max_failures {rollout.max_failures}"
    if not registry.rollouts.move(rollout.id, ("running",), "halted", reason, now):
        return
    log.warning("rollout %s halted in wave %d: %s; rolling back the wave's devices", rollout.id, rollout.wave + 1,
                reason)
    registry.rollouts.want_rollback(rollout.id, rollout.wave, now)
    _stop_devices(registry, registry.rollouts.get(rollout.id), rollout.wave, now)


def _follow_rollback(registry: Registry, config: BridgeConfig, rollout: RolloutRow, device: RolloutDeviceRow,
                     now: datetime) -> None:
    """`wanted`: queue the rollback once the device activated (nothing to do if it did not); `queued`:
    record how it ended."""
    if device.rollback == "wanted":
        if device.state == "activated":
            command = rollback_command(config, rollout, device.device_id, now)
            with registry.transaction():
                if registry.rollouts.mark_rollback(rollout.id, device.device_id, "wanted", "queued", command.id, now):
                    try:
                        registry.commands.add(command, device.device_id, now, batch=rollout.id)
                    except DuplicateCommand:
                        pass  # queued by an earlier rollback of this rollout
            log.info("rollout %s: rollback queued for %s", rollout.id, device.device_id)
        elif device.final:
            registry.rollouts.mark_rollback(rollout.id, device.device_id, "wanted", "not_needed", None, now)
    elif device.rollback == "queued" and device.rollback_command_id is not None:
        try:
            command = registry.commands.get(device.rollback_command_id)
        except UnknownCommand:  # deleted by [retention] before it ended
            registry.rollouts.mark_rollback(rollout.id, device.device_id, "queued", "failed", None, now)
            return
        if command.terminal:
            registry.rollouts.mark_rollback(rollout.id, device.device_id, "queued",
                                            "done" if command.state == "succeeded" else "failed", None, now)


def status(registry: Registry, rollout_id: str) -> dict[str, Any]:
    """The rollout, its devices and counts by state (the API's and the CLI's view)."""
    rollout = registry.rollouts.get(rollout_id)
    devices = registry.rollouts.devices(rollout_id)
    counts: dict[str, int] = {}
    for device in devices:
        counts[device.state] = counts.get(device.state, 0) + 1
    return {"rollout": rollout, "devices": devices, "counts": counts, "failures": sum(
        counts.get(state, 0) for state in FAILED)}
