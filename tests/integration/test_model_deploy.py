"""The `model` command kind end to end (issue #14): a real agent on a real mosquitto and llama.cpp,
GGUFs built by the project served over HTTP by tests/support/file_server.py."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_proc import AGENT
from tests.support.broker import Broker
from tests.support.cloud import CloudClient, command
from tests.support.file_server import serving
from tests.support.model_files import build_served, deploy, events, serving_sha

pytestmark = pytest.mark.integration

PASSING_CANARY = {"prompts": [{"prompt": "Hello", "max_tokens": 8, "regex": "."},
                              {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "timeout_s": 30}],
                  "min_speed_ratio": 0.05}


def statuses(cloud: CloudClient, device: str) -> list[dict[str, Any]]:
    return [b for t, b in cloud.messages if t == f"autoglm/{device}/status" and isinstance(b, dict)]


def run(cloud: CloudClient, device: str, params: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    job = command("model", params)
    cloud.send(device, job)
    return cloud.wait_terminal(job["id"], timeout)


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def test_a_deploy_downloads_in_the_background_passes_its_canary_and_stays_active_across_a_restart(
        tmp_path: Path, start_agent, session_broker: Broker, tiny_model: Path, cloud: CloudClient) -> None:
    served = build_served(tmp_path / "www")
    with serving(tmp_path / "www") as server:
        agent, device, store = start_agent(session_broker)
        tiny = cloud.wait_online(device)
        tiny_sha = tiny["model"]["sha256"]
        assert "model" in tiny["kinds"] and tiny["previous_model"] is None and tiny["rollout"] is None
        server.faults.bytes_per_s = 100_000  # ~4 s for the 400 KB file
        job = deploy(server, served["v1"], "glm-v1", canary=PASSING_CANARY, rollout="r-1")
        cloud.send(device, job)
        cloud.wait_for(lambda: events(cloud.on("/event"), "model_progress", job["id"]), 30, "first progress")
        assert serving_sha(cloud, device) == tiny_sha, "a command during the download runs on the old model"
        assert not cloud.terminal(job["id"]), "the download was still going"

        reply = cloud.wait_terminal(job["id"], 120)
        assert reply["status"] == "succeeded", reply
        out = reply["output"]
        assert (out["action"], out["result"], out["rollout"]) == ("deploy", "activated", "r-1")
        assert out["active"] == {"name": "glm-v1", "sha256": served["v1"].sha256}
        assert out["previous"]["sha256"] == tiny_sha
        assert out["canary"]["passed"] and [r["passed"] for r in out["canary"]["results"]] == [True, True]
        assert out["canary"]["tokens_per_s"] > 0 and out["canary"]["baseline_tokens_per_s"] > 0
        assert server.faults.requests and all(r is None for r in server.faults.requests)

        progress = events(cloud.on("/event"), "model_progress", job["id"])
        phases = [e["data"]["phase"] for e in progress]
        assert phases[0] == "download" and phases[-3:] == ["verify", "load", "canary"], phases
        downloads = [ts(e) for e in progress if e["data"]["phase"] == "download"]
        assert all(b - a >= 1.99 for a, b in zip(downloads, downloads[1:], strict=False)), downloads
        assert progress[-3]["data"]["bytes"] == served["v1"].size and progress[-3]["data"]["rollout"] == "r-1"
        (activated,) = events(cloud.on("/event"), "model_activated", job["id"])
        assert activated["data"]["previous"]["sha256"] == tiny_sha and activated["data"]["canary"]["passed"]

        cloud.wait_for(lambda: statuses(cloud, device)[-1].get("model", {}).get("sha256") == served["v1"].sha256,
                       30, "status with the new model")
        status = statuses(cloud, device)[-1]
        assert status["previous_model"]["sha256"] == tiny_sha and status["rollout"] == "r-1"
        assert serving_sha(cloud, device) == served["v1"].sha256

        # a restart loads the slot recorded active in SQLite, not the config's file
        assert agent.terminate() == 0, agent.log_text()
        seen = len(statuses(cloud, device))
        agent.start()
        cloud.wait_for(lambda: any(s["state"] == "online" for s in statuses(cloud, device)[seen:]), 60, "online")
        assert serving_sha(cloud, device) == served["v1"].sha256

        back = run(cloud, device, {"action": "rollback", "rollout": "r-1"})
        assert back["status"] == "succeeded", back
        assert back["output"]["active"]["sha256"] == tiny_sha
        assert back["output"]["previous"]["sha256"] == served["v1"].sha256
        assert serving_sha(cloud, device) == tiny_sha

        # two slots are kept: deploying v2 drops v1 and deletes its file; the config's file is never deleted
        v1_file = next((tmp_path / "models").glob("*glm-v1*"))
        assert run(cloud, device, deploy(server, served["v2"], "glm-v2")["params"])["status"] == "succeeded"
        assert not v1_file.exists() and tiny_model.exists()
        # SIGHUP with `[model] path` unchanged reloads the active slot, not the config's file
        assert agent.process is not None
        agent.process.send_signal(signal.SIGHUP)
        cloud.wait_for(lambda: events(cloud.on(f"{device}/event"), "model_reloaded"), 60, "model_reloaded")
        assert serving_sha(cloud, device) == served["v2"].sha256
        listing = run(cloud, device, {"action": "list"})
        assert listing["status"] == "succeeded"
        slots = listing["output"]["slots"]
        assert [(s["sha256"], s["role"]) for s in slots] == [(served["v2"].sha256, "active"), (tiny_sha, "previous")]
        assert listing["output"]["active"] == {"name": "glm-v2", "sha256": served["v2"].sha256,
                                               "size": served["v2"].size}
        cli = subprocess.run([*AGENT, "model", "list", "--config", str(agent.config), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert [(s["sha256"], s["role"]) for s in json.loads(cli.stdout)] == [(x["sha256"], x["role"]) for x in slots]
        assert agent.terminate() == 0, agent.log_text()


def test_failed_deploys_leave_the_model_serving_and_say_why(
        tmp_path: Path, start_agent, session_broker: Broker, cloud: CloudClient) -> None:
    served = build_served(tmp_path / "www")
    models = tmp_path / "models"
    with serving(tmp_path / "www") as server:
        agent, device, _ = start_agent(session_broker)
        tiny_sha = cloud.wait_online(device)["model"]["sha256"]

        for bad in ({"action": "deploy", "name": "../etc", "url": server.url("v1.gguf"),
                     "sha256": served["v1"].sha256, "size": 1},
                    {"action": "deploy", "name": "x", "url": "file:///etc/passwd", "sha256": "0" * 64, "size": 1},
                    {"action": "deploy", "name": "x", "url": server.url("v1.gguf"), "sha256": "ABC", "size": 1},
                    {"action": "list", "rollout": "r"}, {"action": "upgrade"}):
            rejected = run(cloud, device, bad)
            assert rejected["status"] == "rejected" and rejected["error"]["code"] == "invalid_command", rejected

        dots = run(cloud, device, {"action": "deploy", "name": "a..b", "url": server.url("v1.gguf"),
                                   "sha256": served["v1"].sha256, "size": served["v1"].size})
        assert dots["status"] == "failed" and dots["error"]["code"] == "invalid_command", dots
        assert "not allowed" in dots["error"]["message"]

        nothing_before = run(cloud, device, {"action": "rollback"})
        assert nothing_before["status"] == "failed" and nothing_before["error"]["code"] == "model_error"
        assert nothing_before["error"]["message"].startswith("no_previous")

        wrong = deploy(server, served["v1"], "glm-v1", rollout="r-2")
        wrong["params"]["sha256"] = "0" * 64
        mismatch = run(cloud, device, wrong["params"])
        assert mismatch["status"] == "failed" and mismatch["error"]["code"] == "model_error"
        assert mismatch["error"]["message"].startswith("download_failed: ")
        assert "token=..." in mismatch["error"]["message"] and "t0k3n" not in mismatch["error"]["message"]
        assert mismatch["output"]["result"] == "download_failed" and mismatch["output"]["active"]["sha256"] == tiny_sha
        assert not list(models.glob("*glm-v1*")), "a file that does not match is deleted"

        huge = deploy(server, served["v1"], "glm-huge")["params"]
        huge["size"] = shutil.disk_usage(tmp_path).free + 2**40  # more than the disk holds: refused before a byte
        full = run(cloud, device, huge)
        assert full["status"] == "failed" and full["error"]["message"].startswith("download_failed: "), full
        assert "free" in full["output"]["reason"] and full["output"]["active"]["sha256"] == tiny_sha
        assert not list(models.glob("*glm-huge*")), "nothing of a download that cannot fit is written"

        broken = run(cloud, device, deploy(server, served["broken"], "glm-broken", rollout="r-3")["params"])
        assert broken["status"] == "failed" and broken["error"]["message"].startswith("rolled_back: "), broken
        assert "failed to load" in broken["output"]["reason"] and broken["output"]["active"]["sha256"] == tiny_sha
        assert broken["output"]["canary"] is None and broken["output"]["rollout"] == "r-3"
        (event,) = events(cloud.on("/event"), "model_rolled_back", broken["command_id"])
        assert event["data"]["sha256"] == served["broken"].sha256 and event["data"]["active"]["sha256"] == tiny_sha
        assert not list(models.glob("*glm-broken*")), "a model that failed is not kept"
        assert serving_sha(cloud, device) == tiny_sha

        canary = {"prompts": [{"prompt": "Answer in JSON", "max_tokens": 8,
                               "json_schema": {"type": "object", "required": ["answer"]}}]}
        failed = run(cloud, device, deploy(server, served["v1"], "glm-v1", canary=canary)["params"])
        assert failed["status"] == "failed", failed
        assert failed["error"]["message"].startswith("rolled_back: canary failed"), failed
        result = failed["output"]["canary"]
        assert not result["passed"] and not result["results"][0]["passed"] and "JSON" in result["results"][0]["reason"]
        assert serving_sha(cloud, device) == tiny_sha
        heavy = run(cloud, device, deploy(server, served["v2"], "glm-v2", canary={"max_rss_mb": 1})["params"])
        assert heavy["status"] == "failed" and "max_rss_mb 1" in heavy["output"]["reason"], heavy
        assert heavy["output"]["canary"]["rss_mb"] > 1
        status = statuses(cloud, device)[-1]
        assert status["model"]["sha256"] == tiny_sha and status["previous_model"] is None

        same = run(cloud, device, {"action": "deploy", "name": "tiny", "url": server.url("v1.gguf"),
                                   "sha256": tiny_sha, "size": 1})
        assert same["status"] == "succeeded" and same["output"]["result"] == "unchanged"
        assert not list(models.glob("*.partial"))
        assert agent.terminate() == 0, agent.log_text()
