"""Rollouts on a real registry (SQLite and PostgreSQL), driven pass by pass with a fixed clock: the
devices' answers are stored as the ingest loop stores them, without a broker."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from autoglm_wire.protocol import Event, ModelInfo, ModelRef, Status, format_ts, to_bytes
from autoglm_wire.topics import DeviceTopics
from cloud_bridge import artifacts, rollout_console, rollouts
from cloud_bridge.config import BridgeConfig, ModelsConfig, RolloutConfig
from cloud_bridge.errors import InvalidRequest
from cloud_bridge.ingest import Inbound, Ingestor
from cloud_bridge.store.registry import Registry

from .factories import T0, at, online, reply, write_gguf

DEVICES = [f"gw-{i:02d}" for i in range(10)]
PREFIX = "p"


@pytest.fixture
def config(tmp_path: Path) -> BridgeConfig:
    return BridgeConfig(models=ModelsConfig(dir=tmp_path / "models", secret_file=tmp_path / "secret",
                                            public_url="http://bridge.lan:8080"),
                        rollouts=RolloutConfig(device_timeout_s=600, finish_timeout_s=60))


@pytest.fixture
def fleet(registry: Registry, config: BridgeConfig, tmp_path: Path):
    for device_id in DEVICES:  # members of group lab: announced, and assigned by the registry
        registry.devices.record_status(online(device_id, groups=["lab"]), T0)
        registry.groups.add(device_id, "lab", T0)
    model, _ = artifacts.register(registry, config.models.dir, write_gguf(tmp_path / "glm-new.gguf"))
    return model


class Devices:
    """Answers as devices would send them, stored through the ingest path."""

    def __init__(self, registry: Registry) -> None:
        self.ingest = Ingestor(registry, PREFIX)
        self.seq: dict[str, int] = {}

    def send(self, device_id: str, status: str, command_id: str, now: datetime, **fields) -> None:
        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        payload = reply(self.seq[device_id], status, command_id, device_id, **fields)
        self.ingest.handle(Inbound(DeviceTopics(PREFIX, device_id).reply, to_bytes(payload)), now)

    def activate(self, device_id: str, command_id: str, now: datetime, rollout: str) -> None:
        self.send(device_id, "accepted", command_id, now)
        self.send(device_id, "succeeded", command_id, now, output={
            "action": "deploy", "result": "activated", "active": {"name": "glm-new", "sha256": "x"},
            "previous": None, "canary": {"passed": True, "results": [], "tokens_per_s": 40.0}, "rollout": rollout})

    def fail_canary(self, device_id: str, command_id: str, now: datetime, rollout: str) -> None:
        self.send(device_id, "accepted", command_id, now)
        self.send(device_id, "failed", command_id, now,
                  error={"code": "model_error", "message": "rolled_back: canary prompt 1: no match"},
                  output={"action": "deploy", "result": "rolled_back", "reason": "canary prompt 1: no match",
                          "active": {"name": "glm-old", "sha256": "y"}, "canary": {"passed": False},
                          "rollout": rollout})

    def progress(self, device_id: str, command_id: str, now: datetime, rollout: str, percent: float) -> None:
        data = {"command_id": command_id, "name": "glm-new", "phase": "download", "bytes": int(percent * 10),
                "total": 1000, "percent": percent, "bytes_per_s": 5e6, "rollout": rollout}
        event = Event(device_id=device_id, ts=format_ts(now), level="info", code="model_progress",
                      message="download", data=data)
        self.ingest.handle(Inbound(DeviceTopics(PREFIX, device_id).event, to_bytes(event)), now)


def wave(registry: Registry, rollout_id: str, index: int) -> dict[str, rollouts.RolloutDeviceRow]:
    return {d.device_id: d for d in registry.rollouts.devices(rollout_id, index)}


def test_waves_split_the_devices_by_cumulative_percent_and_are_never_empty():
    assert [len(w) for w in rollouts.plan_waves(DEVICES, [10, 50, 100])] == [1, 4, 5]
    assert [len(w) for w in rollouts.plan_waves(DEVICES, [5, 25, 100])] == [1, 2, 7]
    assert rollouts.plan_waves(DEVICES[:2], [5, 25, 100]) == [["gw-00"], ["gw-01"]]
    assert rollouts.parse_waves("5%, 25%,100%") == [5, 25, 100]
    for bad in ([50, 25, 100], [10, 50], [0, 100], [50, 150]):
        with pytest.raises(InvalidRequest):
            rollouts.check_waves(bad)


def test_a_rollout_queues_one_deploy_per_device_of_the_first_wave_with_its_own_download_token(
        registry, config, fleet):
    request = rollouts.RolloutRequest(model="glm-new", target="group/lab", waves=[10, 50, 100], id="r1",
                                      canary=rollouts.Canary(prompts=[{"prompt": "2+2=", "regex": "4"}]))
    row = rollouts.create(registry, config, request, T0)
    assert (row.state, row.wave, row.waves) == ("running", 0, [10, 50, 100])
    first = wave(registry, "r1", 0)
    assert list(first) == ["gw-00"] and first["gw-00"].state == "queued"
    command = registry.commands.get("r1.gw-00")
    assert command.kind == "model" and command.batch == "r1" and command.wire_id == "r1.gw-00"
    params = command.payload["params"]
    assert {k: params[k] for k in ("action", "name", "sha256", "size", "rollout")} == {
        "action": "deploy", "name": "glm-new", "sha256": fleet.sha256, "size": fleet.size, "rollout": "r1"}
    assert params["canary"]["prompts"][0] == {"prompt": "2+2=", "max_tokens": 16, "timeout_s": 60.0, "regex": "4"}
    url = urlsplit(params["url"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"http://bridge.lan:8080/artifacts/{fleet.sha256}"
    secret = artifacts.load_secret(config.models.secret_file)
    token = parse_qs(url.query)["token"][0]
    assert artifacts.check_token(secret, token, fleet.sha256, T0.timestamp()) == "gw-00"
    assert command.expires_at == format_ts(T0 + timedelta(seconds=600))
    assert all(d.state == "waiting" for d in registry.rollouts.devices("r1") if d.wave > 0)


def test_ten_devices_in_three_waves_one_failure_halts_and_rolls_back_the_halted_wave(registry, config, fleet):
    devices = Devices(registry)
    rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="group/lab",
                                                              waves=[10, 50, 100], id="r1"), T0)
    devices.progress("gw-00", "r1.gw-00", at(1), "r1", 40.0)
    assert wave(registry, "r1", 0)["gw-00"].percent == 40.0 and wave(registry, "r1", 0)["gw-00"].phase == "download"
    assert "queued   [########............] download 40%" in rollout_console.rollout_text(registry, "r1")
    rollouts.drive(registry, config, registry.rollouts.get("r1"), at(1))
    assert registry.rollouts.get("r1").wave == 0  # gw-00 has not reported
    devices.activate("gw-00", "r1.gw-00", at(2), "r1")
    rollouts.drive(registry, config, registry.rollouts.get("r1"), at(3))
    assert wave(registry, "r1", 0)["gw-00"].state == "activated"
    assert wave(registry, "r1", 0)["gw-00"].canary["passed"] is True
    second = wave(registry, "r1", 1)
    assert registry.rollouts.get("r1").wave == 1 and list(second) == ["gw-01", "gw-02", "gw-03", "gw-04"]
    assert all(d.state == "queued" for d in second.values())

    devices.activate("gw-01", "r1.gw-01", at(4), "r1")
    devices.activate("gw-02", "r1.gw-02", at(4), "r1")
    devices.fail_canary("gw-03", "r1.gw-03", at(4), "r1")
    devices.send("gw-04", "accepted", "r1.gw-04", at(4))  # still downloading
    rollouts.drive(registry, config, registry.rollouts.get("r1"), at(5))

    halted = registry.rollouts.get("r1")
    assert halted.state == "halted" and "1 device(s) failed, more than max_failures 0" in halted.reason
    second = wave(registry, "r1", 1)
    assert second["gw-03"].state == "rolled_back" and second["gw-03"].reason == "canary prompt 1: no match"
    assert {d: second[d].rollback for d in second} == {"gw-01": "queued", "gw-02": "queued", "gw-03": None,
                                                       "gw-04": "wanted"}
    rollback = registry.commands.get("r1.rollback.gw-01")
    assert rollback.payload["params"] == {"action": "rollback", "rollout": "r1"}
    assert wave(registry, "r1", 0)["gw-00"].rollback is None  # only the halted wave is rolled back
    assert all(d.state == "skipped" for d in wave(registry, "r1", 2).values())
    assert registry.rollouts.failures("r1") == 1

    devices.activate("gw-04", "r1.gw-04", at(6), "r1")  # the late one activates: it gets its rollback too
    rollouts.drive(registry, config, registry.rollouts.get("r1"), at(7))
    assert wave(registry, "r1", 1)["gw-04"].rollback == "queued"
    for device_id in ("gw-01", "gw-02", "gw-04"):
        devices.send(device_id, "accepted", f"r1.rollback.{device_id}", at(8))
        devices.send(device_id, "succeeded", f"r1.rollback.{device_id}", at(8), output={"result": "activated"})
    rollouts.drive(registry, config, registry.rollouts.get("r1"), at(9))
    assert {d.device_id: d.rollback for d in wave(registry, "r1", 1).values()} == {
        "gw-01": "done", "gw-02": "done", "gw-03": None, "gw-04": "done"}
    assert registry.rollouts.needing_attention() == []
    assert registry.rollouts.get("r1").state == "halted"


def test_a_device_that_never_accepts_times_out_is_reported_and_does_not_hold_the_rollout(registry, config, fleet):
    devices = Devices(registry)
    rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="group/lab", waves=[20, 100],
                                                              id="r2"), T0)
    devices.activate("gw-00", "r2.gw-00", at(1), "r2")
    registry.commands.mark_expired("r2.gw-01", "no `accepted` before expires_at", at(600))  # the dispatcher's verdict
    rollouts.drive(registry, config, registry.rollouts.get("r2"), at(601))
    first = wave(registry, "r2", 0)
    assert first["gw-01"].state == "timed_out" and "accepted" in first["gw-01"].reason
    assert registry.rollouts.get("r2").wave == 1 and registry.rollouts.get("r2").state == "running"
    for device_id in DEVICES[2:9]:
        devices.activate(device_id, f"r2.{device_id}", at(602), "r2")
    devices.send("gw-09", "accepted", "r2.gw-09", at(602))  # accepted, then silent
    rollouts.drive(registry, config, registry.rollouts.get("r2"), at(601 + 600 + 59))
    assert registry.rollouts.get("r2").state == "running"
    rollouts.drive(registry, config, registry.rollouts.get("r2"), at(601 + 600 + 61))
    assert wave(registry, "r2", 1)["gw-09"].state == "timed_out"
    assert registry.rollouts.get("r2").state == "completed"
    assert rollouts.status(registry, "r2")["counts"] == {"activated": 8, "timed_out": 2}


def test_an_older_agent_that_rejects_kind_model_counts_as_failed(registry, config, fleet):
    devices = Devices(registry)
    rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="gw-05", max_failures=0,
                                                              id="r3"), T0)
    devices.send("gw-05", "rejected", "r3.gw-05", at(1), error={"code": "unknown_kind", "message": "kind 'model'"})
    rollouts.drive(registry, config, registry.rollouts.get("r3"), at(2))
    device = wave(registry, "r3", 0)["gw-05"]
    assert device.state == "failed" and device.reason.startswith("rejected: unknown_kind")
    assert registry.rollouts.get("r3").state == "halted"


def test_pause_resume_abort_and_rollback(registry, config, fleet):
    devices = Devices(registry)
    rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="group/lab", waves=[10, 100],
                                                              id="r4"), T0)
    assert rollouts.pause(registry, "r4", at(1)).state == "paused"
    with pytest.raises(InvalidRequest, match="is paused; it can be made paused only from running"):
        rollouts.pause(registry, "r4")
    devices.activate("gw-00", "r4.gw-00", at(2), "r4")
    rollouts.drive(registry, config, registry.rollouts.get("r4"), at(3))
    assert wave(registry, "r4", 0)["gw-00"].state == "activated" and registry.rollouts.get("r4").wave == 0
    rollouts.resume(registry, "r4", at(4))
    rollouts.drive(registry, config, registry.rollouts.get("r4"), at(5))
    assert registry.rollouts.get("r4").wave == 1
    devices.activate("gw-01", "r4.gw-01", at(6), "r4")
    devices.send("gw-02", "accepted", "r4.gw-02", at(6))
    aborted = rollouts.abort(registry, "r4", now=at(7))
    assert aborted.state == "aborted"
    assert registry.commands.get("r4.gw-03").state == "cancelled"  # not accepted yet: closed, not resent
    assert registry.commands.get("r4.gw-02").state == "accepted"  # the device owns it
    rollouts.drive(registry, config, registry.rollouts.get("r4"), at(8))
    assert wave(registry, "r4", 1)["gw-03"].state == "cancelled"

    rolled = rollouts.rollback(registry, "r4", now=at(9))
    assert rolled.state == "rolled_back"
    rollouts.drive(registry, config, registry.rollouts.get("r4"), at(10))
    queued = {d.device_id for d in registry.rollouts.devices("r4") if d.rollback == "queued"}
    assert queued == {"gw-00", "gw-01"}
    assert registry.commands.get("r4.rollback.gw-00").payload["params"]["action"] == "rollback"
    with pytest.raises(InvalidRequest):
        rollouts.resume(registry, "r4")


def test_creating_needs_a_known_model_devices_and_a_copy(registry, config, fleet):
    with pytest.raises(InvalidRequest, match="no model 'nope'"):
        rollouts.create(registry, config, rollouts.RolloutRequest(model="nope", target="group/lab"), T0)
    with pytest.raises(InvalidRequest, match="no known device"):
        rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="group/none"), T0)
    artifacts.artifact_path(config.models.dir, fleet.sha256).unlink()
    with pytest.raises(InvalidRequest, match="no file in"):
        rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="group/lab"), T0)
    with pytest.raises(InvalidRequest, match="being rolled out|no rollout"):
        rollouts.abort(registry, "missing")


def test_status_keeps_the_active_and_previous_model_and_the_rollout(registry):
    model = ModelInfo(name="glm-new", sha256="aa" * 32, arch="glm4", quant="Q4_0", n_gpu_layers=0)
    registry.devices.record_status(Status(device_id="gw-1", state="online", ts=format_ts(T0), model=model,
                                          previous_model=ModelRef(name="glm-old", sha256="bb" * 32), rollout="r9"), T0)
    registry.devices.record_status(online("gw-2"), T0)  # an older agent: no such fields
    new, old = registry.devices.get("gw-1"), registry.devices.get("gw-2")
    assert (new.model_name, new.previous_model_name, new.previous_model_sha256, new.rollout) == (
        "glm-new", "glm-old", "bb" * 32, "r9")
    assert (old.previous_model_name, old.previous_model_sha256, old.rollout) == (None, None, None)


def test_two_replicas_driving_the_same_rollout_queue_each_command_once(registry, config, fleet, request):
    url = request.getfixturevalue("pg_url") if registry._connection.backend.dialect == "postgresql" else None
    other = Registry.connect(url) if url else Registry.open(Path(registry.path))
    devices = Devices(registry)
    try:
        rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="group/lab",
                                                                  waves=[10, 100], id="r5"), T0)
        devices.activate("gw-00", "r5.gw-00", at(1), "r5")
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def drive(reg: Registry) -> None:
            try:
                start.wait()
                for _ in range(5):
                    rollouts.drive(reg, config, reg.rollouts.get("r5"), at(2))
                    time.sleep(0)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(reg,)) for reg in (registry, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        rows = [c for c in registry.commands.recent(limit=100, batch="r5")]
        assert sorted(c.id for c in rows) == sorted(f"r5.{d}" for d in DEVICES)
        assert registry.rollouts.get("r5").wave == 1
    finally:
        other.close()


def test_a_progress_event_with_figures_out_of_range_is_stored_and_its_bad_figures_dropped(registry, config, fleet):
    devices = Devices(registry)
    rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="gw-01", id="r6"), T0)
    for data in ({"rollout": "r6", "phase": "download", "percent": "half", "bytes": 1e30, "total": -1},
                 {"rollout": ["r6"], "phase": 3}, {"rollout": "other", "percent": 50}):
        event = Event(device_id="gw-01", ts=format_ts(at(len(str(data)))), level="info", code="model_progress",
                      message="download", data=data)
        outcome = devices.ingest.handle(Inbound(DeviceTopics(PREFIX, "gw-01").event, to_bytes(event)), at(1))
        assert outcome == "stored"
    device = wave(registry, "r6", 0)["gw-01"]
    assert (device.phase, device.percent, device.bytes, device.total) == ("download", None, None, None)
    assert len(registry.events.recent("gw-01")) == 3


def test_a_command_deleted_before_it_ended_settles_the_device_instead_of_failing_each_pass(
        registry, config, fleet):
    rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="gw-02", id="r7"), T0)
    registry._connection.execute("DELETE FROM commands WHERE id = 'r7.gw-02'")  # as [retention] would, much later
    rollouts.drive(registry, config, registry.rollouts.get("r7"), at(1))
    device = wave(registry, "r7", 0)["gw-02"]
    assert device.state == "timed_out" and "no longer in the registry" in device.reason
    assert registry.rollouts.get("r7").state == "completed"
    rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="gw-04", id="r8"), at(2))
    Devices(registry).activate("gw-04", "r8.gw-04", at(2), "r8")
    rollouts.rollback(registry, "r8", now=at(3))
    rollouts.drive(registry, config, registry.rollouts.get("r8"), at(4))
    assert wave(registry, "r8", 0)["gw-04"].rollback == "queued"
    registry._connection.execute("DELETE FROM commands WHERE id = 'r8.rollback.gw-04'")
    rollouts.drive(registry, config, registry.rollouts.get("r8"), at(5))
    assert wave(registry, "r8", 0)["gw-04"].rollback == "failed" and registry.rollouts.needing_attention() == []
