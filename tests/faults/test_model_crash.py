"""Crash safety of a model deploy (issue #14): the agent is SIGKILLed mid-download, after the rename,
mid-load, mid-canary and right after the switch; on restart it serves a verified model (the previous
one, or the new one only if it had passed) and the deploy command has exactly one terminal reply."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Rig
from tests.support.file_server import FileServer, serving
from tests.support.model_files import Served, build_served, deploy, events, serving_sha

pytestmark = pytest.mark.integration

CANARY = {"prompts": [{"prompt": "Hello", "max_tokens": 4}], "min_speed_ratio": 0.05}


@pytest.fixture
def server(tmp_path: Path):  # noqa: ANN201 - a generator fixture
    served = build_served(tmp_path / "www")
    with serving(tmp_path / "www") as file_server:
        file_server.served = served  # type: ignore[attr-defined]
        yield file_server


def journal_rows(store: Path) -> int:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT COUNT(*) FROM model_journal").fetchone()[0]
    finally:
        conn.close()


def restart_and_answer(rig: Rig, job: dict[str, Any]) -> dict[str, Any]:
    """Start the agent again (unarmed): the deploy's one terminal reply, checked to stay one."""
    rig.agent.start()
    reply = rig.cloud.wait_terminal(job["id"], 90)
    serving_sha(rig.cloud, rig.device_id)  # a later round trip: any second terminal reply would be here by now
    assert len(rig.cloud.terminal(job["id"])) == 1, rig.cloud.terminal(job["id"])
    assert rig.agent.ledger()[job["id"]] == reply["status"]
    assert journal_rows(rig.agent.store) == 0
    return reply


@pytest.mark.parametrize("point, result", [
    ("model_downloaded", "download_failed"),  # verified and renamed, activation not started
    ("model_loading", "rolled_back"),  # journalled `loading`, old model still loaded
    ("model_canary", "rolled_back"),  # new model loaded, canary not run
    ("model_activated", "activated"),  # switch committed, reply not stored
])
def test_a_kill_at_each_step_of_an_activation_restarts_on_a_verified_model_with_one_reply(
        make_rig, server: FileServer, point: str, result: str) -> None:
    v1: Served = server.served["v1"]  # type: ignore[attr-defined]
    rig: Rig = make_rig(fault_point=point)
    tiny_sha = rig.cloud.wait_online(rig.device_id)["model"]["sha256"]
    job = deploy(server, v1, "glm-v1", canary=CANARY, rollout="r-9")
    rig.cloud.send(rig.device_id, job)
    rig.agent.wait_fault_kill(90)

    reply = restart_and_answer(rig, job)
    assert reply["output"]["result"] == result and reply["output"]["rollout"] == "r-9", reply
    models = rig.agent.workdir / "models"
    if result == "activated":
        assert reply["status"] == "succeeded"
        assert reply["output"]["active"]["sha256"] == v1.sha256 and reply["output"]["previous"]["sha256"] == tiny_sha
        assert serving_sha(rig.cloud, rig.device_id) == v1.sha256
        assert events(rig.cloud.on("/event"), "model_activated", job["id"])
        return
    assert reply["status"] == "failed" and reply["error"]["code"] == "model_error"
    assert reply["error"]["message"].startswith(f"{result}: ") and reply["output"]["active"]["sha256"] == tiny_sha
    assert serving_sha(rig.cloud, rig.device_id) == tiny_sha
    if result == "rolled_back":
        assert events(rig.cloud.on("/event"), "model_rolled_back", job["id"])
        assert not list(models.glob("*glm-v1*")), "the model whose activation was cut is not kept"
        return
    # killed after the download: a new deploy finds the verified file and activates it without fetching again
    fetched = len(server.faults.requests)
    again = deploy(server, v1, "glm-v1", canary=CANARY)
    rig.cloud.send(rig.device_id, again)
    assert rig.cloud.wait_terminal(again["id"], 90)["status"] == "succeeded"
    assert len(server.faults.requests) == fetched
    assert serving_sha(rig.cloud, rig.device_id) == v1.sha256


def test_a_kill_mid_download_answers_the_deploy_once_and_the_next_deploy_resumes_the_partial_file(
        make_rig, server: FileServer) -> None:
    v1: Served = server.served["v1"]  # type: ignore[attr-defined]
    rig: Rig = make_rig()
    tiny_sha = rig.cloud.wait_online(rig.device_id)["model"]["sha256"]
    server.faults.bytes_per_s = 100_000
    job = deploy(server, v1, "glm-v1")
    rig.cloud.send(rig.device_id, job)
    partial = rig.agent.workdir / "models"

    def some_bytes_on_disk() -> bool:
        files = list(partial.glob("*.partial"))
        return bool(files) and files[0].stat().st_size >= 128 * 1024

    rig.cloud.wait_for(some_bytes_on_disk, 30, "part of the file on disk")
    rig.agent.kill()
    server.faults.bytes_per_s = None
    reply = restart_and_answer(rig, job)
    assert reply["status"] == "failed" and reply["output"]["result"] == "download_failed", reply
    assert serving_sha(rig.cloud, rig.device_id) == tiny_sha
    kept = next(partial.glob("*.partial")).stat().st_size

    again = deploy(server, v1, "glm-v1")
    rig.cloud.send(rig.device_id, again)
    done = rig.cloud.wait_terminal(again["id"], 90)
    assert done["status"] == "succeeded" and done["output"]["active"]["sha256"] == v1.sha256, done
    assert server.faults.requests[-1] == f"bytes={kept}-", server.faults.requests
    assert serving_sha(rig.cloud, rig.device_id) == v1.sha256
