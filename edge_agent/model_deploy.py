"""The `model` command kind on the device (issue #14; docs/protocol.md "Model deployment").

`deploy` journals the change (edge_agent/model_slots.py), downloads the GGUF on a thread of its
own (edge_agent/model_pull.py: resumable, verified; chat commands go on meanwhile) with progress
Events at most every PROGRESS_INTERVAL_S, then asks the executor for an engine swap between
commands (`Activation`, the reload path SIGHUP uses). The swap measures the current model's decode
speed, loads the new model, runs the canary (edge_agent/canary.py); a pass makes the new slot
active, a failure (or a load error) loads the previous model again. `rollback` swaps to the
previous slot the same way, `list` answers the slots. The command's handler answers DEFERRED; the
terminal reply is stored by the thread that ends the change. After a crash, `recovered` answers
the interrupted command from the journal: the slot recorded active is what the agent loaded.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from autoglm_wire.errors import Busy, Internal, InvalidCommand, ModelError
from autoglm_wire.lifecycle import State
from autoglm_wire.model_command import Canary, ModelParams
from autoglm_wire.protocol import ParsedCommand
from edge_agent import checkpoints
from edge_agent.canary import CanaryResult, measure_speed, run_canary
from edge_agent.config import ModelsConfig
from edge_agent.engine import TextEngine
from edge_agent.executor import DEFERRED, Executor, Outcome
from edge_agent.inbox import StoredCommand
from edge_agent.model_pull import Progress, PullError, UnsafeName, pull, target_path
from edge_agent.model_slots import ModelSlots, Slot, slot_rows

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"([?&]token=)[^&\s]+")
PROGRESS_INTERVAL_S = 2.0  # model_progress Events: at most this often per command, plus one per phase
EventSink = Callable[[str, str, str, dict[str, Any]], None]  # level, code, message, data


def file_name(name: str, sha256: str) -> str:
    """The file a deployed model is stored as: its sha256 prefix and name (two deploys of one name
    with different contents never share a file)."""
    return f"{sha256[:12]}-{name}" + ("" if name.endswith(".gguf") else ".gguf")


def _ref(slot: Slot | None) -> dict[str, str] | None:
    return slot.ref() if slot is not None else None


class ModelDeployer:
    """Handles `model` commands; one deploy or rollback at a time."""

    def __init__(self, slots: ModelSlots, models: ModelsConfig, executor: Executor,
                 load: Callable[[Slot], TextEngine], event: EventSink,
                 announce: Callable[[TextEngine, Slot], None]) -> None:
        self.slots, self._models, self._executor = slots, models, executor
        self._load, self._event, self._announce = load, event, announce
        self._lock = threading.Lock()
        self._current: str | None = None  # the command id of the change in progress

    # --- the handler -----------------------------------------------------------------------------

    def handle(self, parsed: ParsedCommand, cancel: threading.Event) -> Outcome:
        params = parsed.params
        assert isinstance(params, ModelParams)
        if params.action == "list":
            return Outcome(State.SUCCEEDED, self.listing(), {})
        active = self.slots.active()
        if active is None:  # the agent records its model as a slot at start; only a broken store lands here
            raise ModelError("no active model slot is recorded; restart the agent")
        with self._lock:
            if self._current is not None:
                raise Busy(f"model command {self._current} is still deploying; send this one after its reply")
            if params.action == "deploy":
                assert params.name and params.url and params.sha256 and params.size
                if params.sha256 == active.sha256:
                    return self._unchanged(params, active)
                try:
                    path = target_path(self.slots.models_dir, file_name(params.name, params.sha256))
                except UnsafeName as exc:
                    raise InvalidCommand(str(exc)) from exc
                target = Slot(params.name, path, params.sha256, params.size)
                self.slots.begin(parsed.id, "deploy", "download", target, params.rollout)
                self._current = parsed.id
                threading.Thread(target=self._download, args=(parsed.id, params, target),
                                 name=f"model-download-{parsed.id}", daemon=True).start()
                return DEFERRED
            previous = self.slots.previous()
            if previous is None:
                raise ModelError(f"no_previous: this device has no previous model slot; it keeps {active.name}")
            self.slots.begin(parsed.id, "rollback", "loading", previous, params.rollout)
            self._current = parsed.id
        self._executor.reload_engine(Activation(self, parsed.id, params, previous, active))
        return DEFERRED

    def listing(self) -> dict[str, Any]:
        slots = self.slots.slots()
        active = slots[0] if slots else None
        return {"active": None if active is None else {**active.ref(), "size": active.size},
                "slots": slot_rows(slots)}

    def _unchanged(self, params: ModelParams, active: Slot) -> Outcome:
        output = {"action": params.action, "result": "unchanged", "active": active.ref(),
                  "previous": _ref(self.slots.previous()), "canary": None, "rollout": params.rollout}
        return Outcome(State.SUCCEEDED, output, {})

    # --- download (its own thread) ---------------------------------------------------------------

    def _download(self, command_id: str, params: ModelParams, target: Slot) -> None:
        assert params.url is not None and params.sha256 is not None
        self.progress(command_id, target, "download", 0, target.size, 0.0, params.rollout)
        last = [time.monotonic()]

        def on_progress(progress: Progress) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                self.progress(command_id, target, "download", progress.done, progress.total, progress.bytes_per_s,
                              params.rollout)
        try:
            pulled = pull(params.url, params.sha256, self.slots.models_dir, name=target.path.name, size=params.size,
                          ca_file=self._models.ca_file, on_progress=on_progress,
                          progress_interval_s=PROGRESS_INTERVAL_S / 4, attempts=self._models.download_attempts)
        except PullError as exc:
            self._finish_download_failed(command_id, params, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug must still end the command with one reply
            log.exception("model download of command %s failed unexpectedly", command_id)
            self._finish_download_failed(command_id, params, f"unexpected error: {exc!r}")
            return
        self.progress(command_id, target, "verify", pulled.size, pulled.size, 0.0, params.rollout)
        checkpoints.reached("model_downloaded")
        active = self.slots.active()
        assert active is not None
        self._executor.reload_engine(Activation(self, command_id, params, target, active))

    def _finish_download_failed(self, command_id: str, params: ModelParams, reason: str) -> None:
        reason = _TOKEN.sub(r"\1...", reason)  # the URL's download token stays out of replies and logs
        log.error("model deploy %s: download failed: %s", command_id, reason)
        self._end(command_id, self._download_failed(command_id, "deploy", reason, params.rollout))

    # --- shared by the activation ----------------------------------------------------------------

    def progress(self, command_id: str, target: Slot, phase: str, done: int, total: int | None,
                 bytes_per_s: float, rollout: str | None) -> None:
        percent = round(100.0 * done / total, 1) if total else None
        shown = f"{target.name}: {phase}" + (f" {percent}%" if percent is not None else "")
        self._event("info", "model_progress", shown,
                    {"command_id": command_id, "name": target.name, "phase": phase, "bytes": done, "total": total,
                     "percent": percent, "bytes_per_s": round(bytes_per_s, 1), "rollout": rollout})

    def activated(self, command_id: str, action: str, target: Slot, previous: Slot | None, rollout: str | None,
                  canary: dict[str, Any] | None) -> None:
        self._end(command_id, self._activated(command_id, action, target, previous, rollout, canary))

    def rolled_back(self, command_id: str, action: str, target: Slot, active: Slot | None, reason: str,
                    rollout: str | None, canary: dict[str, Any] | None) -> None:
        self._end(command_id, self._rolled_back(command_id, action, target, active, reason, rollout, canary))

    def _activated(self, command_id: str, action: str, target: Slot, previous: Slot | None, rollout: str | None,
                   canary: dict[str, Any] | None) -> Outcome:
        """`target` serves now: the `model_activated` Event and the reply."""
        self._event("info", "model_activated", f"now serving {target.name}",
                    {"command_id": command_id, "name": target.name, "sha256": target.sha256,
                     "previous": _ref(previous), "rollout": rollout, "canary": canary})
        output = {"action": action, "result": "activated", "active": target.ref(), "previous": _ref(previous),
                  "canary": canary, "rollout": rollout}
        return Outcome(State.SUCCEEDED, output, {})

    def _rolled_back(self, command_id: str, action: str, target: Slot, active: Slot | None, reason: str,
                     rollout: str | None, canary: dict[str, Any] | None) -> Outcome:
        """The change did not happen: `active` serves (the model of before); a deployed file that failed
        is deleted; the `model_rolled_back` Event and the reply say why."""
        log.error("model %s %s rolled back: %s", action, target.name, reason)
        if action == "deploy" and not self.slots.owns(target.path):
            target.path.unlink(missing_ok=True)
        self._event("error", "model_rolled_back", f"{target.name} rolled back: {reason}",
                    {"command_id": command_id, "name": target.name, "sha256": target.sha256, "reason": reason,
                     "active": _ref(active), "rollout": rollout, "canary": canary})
        output = {"action": action, "result": "rolled_back", "reason": reason, "active": _ref(active),
                  "canary": canary, "rollout": rollout}
        return Outcome(State.FAILED, output, {}, ModelError(f"rolled_back: {reason}", command_id))

    def _download_failed(self, command_id: str, action: str, reason: str, rollout: str | None) -> Outcome:
        output = {"action": action, "result": "download_failed", "reason": reason,
                  "active": _ref(self.slots.active()), "rollout": rollout}
        return Outcome(State.FAILED, output, {}, ModelError(f"download_failed: {reason}", command_id))

    def announce(self, engine: TextEngine, slot: Slot) -> None:
        self._announce(engine, slot)

    def abandon(self, command_id: str, error: Exception) -> None:
        """A bug met during the change: the command still gets its one terminal reply."""
        with self._lock:
            current = self._current == command_id
        if current:
            log.error("model command %s failed unexpectedly: %r", command_id, error)
            self._end(command_id, Outcome(State.FAILED, None, {}, Internal(
                f"the model change failed unexpectedly ({error!r}); this is a bug in the agent, see its log",
                command_id)))

    def load(self, slot: Slot) -> TextEngine:
        """Load a slot's file; its sha256 must be the slot's (the engine hashes what it loaded)."""
        engine = self._load(slot)
        if engine.info.sha256 != slot.sha256:
            engine.close()
            raise ModelError(f"{slot.path} has sha256 {engine.info.sha256}, not the slot's {slot.sha256}")
        return engine

    def _end(self, command_id: str, outcome: Outcome) -> None:
        """The terminal reply, then the journal cleared (a crash between them: `recovered` finds no
        running command and `settle` clears it)."""
        self._executor.finish(command_id, outcome)
        self.slots.end(command_id)
        with self._lock:
            if self._current == command_id:
                self._current = None

    # --- after a crash ---------------------------------------------------------------------------

    def recovered(self, command: StoredCommand) -> Outcome | None:
        """The terminal reply of a `model` command a crash interrupted, from the journal: activated if
        the new slot had been made active, else the model recorded active serves (download_failed or
        rolled_back). None for any other command."""
        entry = self.slots.journal()
        if entry is None or entry.command_id != command.id:
            return None
        active, target = self.slots.active(), entry.target
        if entry.phase == "active":
            return self._activated(command.id, entry.action, target, self.slots.previous(), entry.rollout, None)
        if entry.phase == "download":
            return self._download_failed(command.id, entry.action, "the agent stopped before the new model was "
                                         "loaded (crash or power loss); what was downloaded is kept: deploy again "
                                         "to resume", entry.rollout)
        reason = (f"the agent stopped during the {entry.phase} of {target.name} (crash or power loss); "
                  f"it restarted on {active.name if active else 'its configured model'}")
        return self._rolled_back(command.id, entry.action, target, active, reason, entry.rollout, None)

    def settle(self) -> None:
        """After the recovery: a journal left by a change whose reply was stored is cleared."""
        entry = self.slots.journal()
        if entry is not None:
            self.slots.end(entry.command_id)


class Activation:
    """One model change, run by the executor on a worker thread between commands (`EngineSwap`)."""

    def __init__(self, deployer: ModelDeployer, command_id: str, params: ModelParams, target: Slot,
                 before: Slot) -> None:
        self.deployer, self.command_id, self.params = deployer, command_id, params
        self.target, self.before = target, before

    def swap(self, old: TextEngine) -> TextEngine:
        try:
            return self._swap(old)
        except Exception as exc:
            self.deployer.abandon(self.command_id, exc)
            raise

    def _swap(self, old: TextEngine) -> TextEngine:
        d, params, target = self.deployer, self.params, self.target
        canary: Canary | None = params.canary
        baseline = self._baseline(old, canary)
        d.slots.advance(self.command_id, "loading")
        d.progress(self.command_id, target, "load", target.size, target.size, 0.0, params.rollout)
        checkpoints.reached("model_loading")
        old.close()  # two models may not fit in memory
        try:
            new = d.load(target)
        except Exception as exc:  # noqa: BLE001 - any load failure rolls back
            return self._restore(f"the new model failed to load: {exc}", None)
        d.slots.advance(self.command_id, "canary")
        d.progress(self.command_id, target, "canary", target.size, target.size, 0.0, params.rollout)
        checkpoints.reached("model_canary")
        result: CanaryResult | None = run_canary(new, canary, baseline) if canary is not None else None
        summary = None if result is None else result.summary()
        if result is not None and not result.passed:
            new.close()
            return self._restore(f"canary failed: {result.reason}", summary)
        d.slots.activate(target, params.rollout, self.command_id)
        checkpoints.reached("model_activated")
        d.announce(new, target)
        d.activated(self.command_id, params.action, target, self.before, params.rollout, summary)
        return new

    def _baseline(self, old: TextEngine, canary: Canary | None) -> float | None:
        """The current model's decode speed on the fixed prompt, when the canary compares speeds."""
        if canary is None or canary.min_speed_ratio <= 0:
            return None
        try:
            return round(measure_speed(old), 3)
        except Exception:  # noqa: BLE001 - without a baseline the speed check is skipped
            log.exception("could not measure the current model's speed; the canary skips its speed check")
            return None

    def _restore(self, reason: str, canary: dict[str, Any] | None) -> TextEngine:
        """Load the model of before again and answer rolled_back. If even that fails, the reply says
        so and the error goes up: the worker stops, the watchdog restarts the agent on the slot
        recorded active (this one)."""
        d = self.deployer
        try:
            engine = d.load(self.before)
        except Exception as exc:
            d.rolled_back(self.command_id, self.params.action, self.target, self.before,
                          f"{reason}; reloading {self.before.name} failed too ({exc}): the agent restarts on it",
                          self.params.rollout, canary)
            raise
        d.announce(engine, self.before)
        d.rolled_back(self.command_id, self.params.action, self.target, self.before, reason, self.params.rollout,
                      canary)
        return engine
