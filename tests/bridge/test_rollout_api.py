"""Models and rollouts through `/api` (FastAPI's TestClient) and `cloud-bridge model|rollout` (in
process), on a real registry, and the `/rollouts` page in a headless Chromium."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud_bridge import artifacts, rollouts
from cloud_bridge.cli import EXIT_USAGE
from cloud_bridge.config import BridgeConfig, ModelsConfig
from cloud_bridge.http.app import create_app
from cloud_bridge.store.registry import Registry

from .conftest import http_server
from .factories import T0, at, online, reply, write_gguf
from .test_cli import run

TOKEN = "rollout-token-0123456789"


def lab_fleet(registry: Registry) -> None:
    """Three devices online, members of group lab (announced, and assigned by the registry)."""
    for device_id in ("gw-a", "gw-b", "gw-c"):
        registry.devices.record_status(online(device_id, groups=["lab"]), T0)
        registry.groups.add(device_id, "lab", T0)


@pytest.fixture
def api(registry, tmp_path: Path):
    config = BridgeConfig(models=ModelsConfig(dir=tmp_path / "models", secret_file=tmp_path / "secret"))
    lab_fleet(registry)
    artifacts.register(registry, config.models.dir, write_gguf(tmp_path / "glm-new.gguf"))
    with TestClient(create_app(registry, config, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def test_a_rollout_is_created_followed_and_acted_on_through_the_api(api):
    created = api.post("/api/rollouts", json={"model": "glm-new", "filter": {"group": "lab"}, "waves": [33, 100],
                                              "max_failures": 1, "id": "ra",
                                              "canary": {"prompts": [{"prompt": "hi"}], "min_speed_ratio": 0.8}})
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["state"], body["target"], body["waves"], body["counts"]) == (
        "running", "group=lab", [33, 100], {"queued": 1, "waiting": 2})
    assert body["canary"]["min_speed_ratio"] == 0.8
    assert [d["device_id"] for d in body["devices"] if d["state"] == "queued"] == ["gw-a"]
    assert api.post("/api/rollouts/ra/pause").json()["state"] == "paused"
    refused = api.post("/api/rollouts/ra/pause")
    assert refused.status_code == 400 and "only from running" in refused.json()["error"]["message"]
    assert api.post("/api/rollouts/ra/resume").json()["state"] == "running"
    assert api.post("/api/rollouts/ra/explode").status_code == 404
    assert api.post("/api/rollouts/nope/pause").status_code == 404
    assert api.get("/api/rollouts/nope").status_code == 404
    assert [r["id"] for r in api.get("/api/rollouts").json()] == ["ra"]
    busy = api.delete("/api/models/glm-new")
    assert busy.status_code == 400 and "abort it first" in busy.json()["error"]["message"]
    aborted = api.post("/api/rollouts/ra/abort").json()
    assert aborted["state"] == "aborted" and aborted["counts"] == {"queued": 1, "skipped": 2}
    assert api.delete("/api/models/glm-new").status_code == 200
    assert api.get("/api/models/glm-new").status_code == 404


def test_reading_needs_a_viewer_changing_an_admin_and_changes_are_audited(api, registry):
    viewer = {"Authorization": f"Bearer {registry.tokens.add('watcher', 'viewer')}"}
    operator = {"Authorization": f"Bearer {registry.tokens.add('ops', 'operator')}"}
    assert api.get("/api/models", headers=viewer).status_code == 200
    assert api.get("/api/rollouts", headers=viewer).status_code == 200
    body = {"model": "glm-new", "target": "group/lab", "id": "rv"}
    for headers in (viewer, operator):
        refused = api.post("/api/rollouts", json=body, headers=headers)
        assert refused.status_code == 403 and "needs admin" in refused.json()["error"]["message"]
        assert api.delete("/api/models/glm-new", headers=headers).status_code == 403
    assert api.post("/api/rollouts", json=body).status_code == 201  # the token file: admin
    assert api.post("/api/rollouts/rv/pause", headers=operator).status_code == 403
    assert api.post("/api/rollouts/rv/pause").status_code == 200
    entries = [(a.actor, a.action, a.outcome) for a in reversed(registry.audit.recent(10))]
    assert entries == [("watcher", "POST /api/rollouts", "http 403"),
                       ("watcher", "DELETE /api/models/glm-new", "http 403"),
                       ("ops", "POST /api/rollouts", "http 403"), ("ops", "DELETE /api/models/glm-new", "http 403"),
                       ("file", "POST /api/rollouts", "ok"), ("ops", "POST /api/rollouts/rv/pause", "http 403"),
                       ("file", "POST /api/rollouts/rv/pause", "ok")]


def test_a_bad_rollout_request_is_a_400_naming_the_field(api):
    for body, words in (({"model": "glm-new", "target": "group/lab", "waves": [50, 20]}, "increasing"),
                        ({"model": "glm-new", "target": "group/lab", "canary": {"prompts": [{}]}}, "prompt"),
                        ({"model": "glm-new", "target": "group/lab",
                          "canary": {"prompts": [{"prompt": "x", "regex": "("}]}}, "does not compile"),
                        ({"model": "glm-new", "target": "group/lab", "canary": {"prompts": [{"prompt": ""}]}},
                         "at least 1 character"),
                        ({"model": "glm-new"}, "exactly one of"),
                        ({"model": "nope", "target": "group/lab"}, "no model 'nope'")):
        answer = api.post("/api/rollouts", json=body)
        assert answer.status_code in (400, 404) and words in answer.json()["error"]["message"], answer.text
    assert api.post("/api/rollouts", json={"model": "glm-new", "target": "group/lab"},
                    headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_schema_valid_values_at_and_past_each_types_edge_get_a_4xx_never_a_500(api):
    big = "100000000000000000000000"  # past 64 bits
    for raw in ('{"model": "glm-new", "target": "group/lab", "waves": [NaN]}',
                '{"model": "glm-new", "target": "group/lab", "waves": [Infinity]}',
                '{"model": "glm-new", "target": "group/lab", "waves": [1e308, 100]}',
                '{"model": "glm-new", "target": "group/lab", "max_failures": ' + big + '}',
                '{"model": "glm-new", "target": "group/lab", "canary": {"max_rss_mb": ' + big + '}}',
                '{"model": "glm-new", "target": "group/lab", "canary": {"min_speed_ratio": NaN}}',
                '{"model": "glm-new", "target": "group/lab",'
                ' "canary": {"prompts": [{"prompt": "x", "timeout_s": NaN}]}}',
                '{"model": "glm-new\\u0000", "target": "group/lab"}',
                '{"model": "glm-new", "target": "group/lab\\ud800"}',
                '{"model": "glm-new", "filter": {"group": "lab\\u0000"}}',
                '{"model": "glm-new", "filter": {"device_ids": ["gw-a\\u0000"]}}',
                '{"model": "glm-new", "filter": {"model_name": "x\\u0000"}}'):
        answer = api.post("/api/rollouts", content=raw, headers={"Content-Type": "application/json"})
        assert answer.status_code in (400, 404, 422) and answer.json()["error"]["message"], (raw, answer.text)
    assert api.get("/api/rollouts").json() == []  # none of them created anything


# --- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text('[store]\npath = "registry.db"\n[models]\npublic_url = "http://bridge.lan:8080"\n')
    registry = Registry.open(tmp_path / "registry.db")
    for device_id in ("gw-a", "gw-b"):  # members of group lab
        registry.devices.record_status(online(device_id, groups=["lab"]), T0)
        registry.groups.add(device_id, "lab", T0)
    registry.close()
    return path


def test_model_add_list_remove_and_rollout_create_status_on_the_command_line(config_file, tmp_path, capsys):
    conf = ("--config", str(config_file))
    gguf = write_gguf(tmp_path / "glm-new.gguf")
    code, out, _ = run(capsys, "model", "add", str(gguf), *conf)
    assert code == 0 and out.startswith("registered glm-new ") and "glm4 Q4_0" in out
    assert (tmp_path / "models").is_dir()  # [models] dir, relative to the config's folder
    code, out, _ = run(capsys, "model", "list", *conf)
    assert code == 0 and "glm-new" in out and "2048" in out
    (tmp_path / "canary.json").write_text(json.dumps({"prompts": [{"prompt": "2+2=", "regex": "4"}]}))
    code, out, err = run(capsys, "rollout", "create", "--model", "glm-new", "--target", "group/lab", "--waves",
                         "50%,100%", "--canary", str(tmp_path / "canary.json"), "--id", "rc", *conf)
    assert code == 0, err
    assert "rollout rc: glm-new" in out and "state running, wave 1 of 2 (50%, 100%)" in out
    code, out, _ = run(capsys, "rollout", "status", *conf)
    assert code == 0 and "rc" in out and "queued=1 waiting=1" in out
    code, out, _ = run(capsys, "rollout", "status", "rc", "--json", *conf)
    view = json.loads(out)
    assert view["rollout"]["canary"]["prompts"][0]["regex"] == "4"
    registry = Registry.open(tmp_path / "registry.db")
    command = registry.commands.get("rc.gw-a")
    registry.close()
    assert command.payload["params"]["url"].startswith("http://bridge.lan:8080/artifacts/")
    code, _, err = run(capsys, "rollout", "create", "--model", "glm-new", "--target", "group/lab", "--waves",
                       "50%,20%", *conf)
    assert code == EXIT_USAGE and "increasing" in err
    (tmp_path / "bad.json").write_text('{"prompts": [{"prompt": "x", "max_tokens": 9999}]}')
    code, _, err = run(capsys, "rollout", "create", "--model", "glm-new", "--target", "group/lab", "--canary",
                       str(tmp_path / "bad.json"), *conf)
    assert code == EXIT_USAGE and "max_tokens" in err
    code, _, err = run(capsys, "model", "remove", "glm-new", *conf)
    assert code == EXIT_USAGE and "abort it first" in err
    assert run(capsys, "rollout", "abort", "rc", *conf)[0] == 0
    code, out, _ = run(capsys, "model", "remove", "glm-new", *conf)
    assert code == 0 and out.startswith("removed glm-new") and not list((tmp_path / "models").iterdir())
    registry = Registry.open(tmp_path / "registry.db")
    audit = [(a.action, a.target, a.outcome.split(":")[0]) for a in reversed(registry.audit.recent(10))]
    registry.close()
    assert audit == [("model add", "glm-new.gguf", "ok"), ("rollout create", "group/lab", "ok"),
                     ("rollout create", "group/lab", "error"), ("rollout create", "group/lab", "error"),
                     ("model remove", "glm-new", "error"),
                     ("rollout abort", "rc", "ok"), ("model remove", "glm-new", "ok")]


# --- the page --------------------------------------------------------------------------------------


@pytest.fixture
def page_url(tmp_path: Path) -> Iterator[str]:
    registry = Registry.open(tmp_path / "registry.db")
    config = BridgeConfig(models=ModelsConfig(dir=tmp_path / "models", secret_file=tmp_path / "secret"))
    lab_fleet(registry)
    artifacts.register(registry, config.models.dir, write_gguf(tmp_path / "glm-new.gguf"))
    rollouts.create(registry, config, rollouts.RolloutRequest(model="glm-new", target="group/lab", waves=[100],
                                                              id="rp"), T0)
    registry.rollouts.record_progress("gw-b", {"rollout": "rp", "phase": "download", "percent": 42.0,
                                               "bytes": 42, "total": 100}, at(1))
    registry.replies.record(reply(1, "succeeded", "rp.gw-a", device_id="gw-a", output={
        "result": "activated", "canary": {"passed": True, "tokens_per_s": 41.0, "baseline_tokens_per_s": 40.0}}), at(2))
    registry.replies.record(reply(2, "failed", "rp.gw-c", device_id="gw-c",
                                  error={"code": "model_error", "message": "rolled_back: canary"},
                                  output={"result": "rolled_back", "reason": "canary prompt 1 timed out",
                                          "canary": {"passed": False}}), at(2))
    rollouts.drive(registry, config, registry.rollouts.get("rp"), at(3))
    with http_server(create_app(registry, config, TOKEN)) as url:
        yield url
    registry.close()


def test_the_rollouts_page_shows_a_bar_per_device_with_state_percent_and_canary(page_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url + "/rollouts")
    browser.execute_script("localStorage.clear()")
    browser.get(page_url + "/rollouts")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "save-token").click()
    # The page redraws every 2 s: read what it shows in one script run, not element by element.
    snapshot = """
        const box = document.getElementById("rollout-rp");
        if (!box) return null;
        return {head: box.querySelector(".row").innerText, models: document.getElementById("models").innerText,
                bars: [...box.querySelectorAll(".bar")].map(bar => [bar.dataset.device, bar.className,
                       bar.innerText, bar.firstChild.style.width]),
                rows: [...box.querySelectorAll("tbody tr")].map(row => row.innerText)};
    """
    shown = WebDriverWait(browser, 30).until(lambda b: b.execute_script(snapshot))
    assert "halted" in shown["head"] and "glm-new to group/lab" in shown["head"] and "glm-new" in shown["models"]
    bars = {device: (kind, text, width) for device, kind, text, width in shown["bars"]}
    assert bars == {"gw-a": ("bar ok", "activated", "100%"), "gw-b": ("bar", "download 42%", "42%"),
                    "gw-c": ("bar bad", "rolled_back", "100%")}
    rows = {row.split("\t")[0]: row for row in shown["rows"]}
    assert "passed 41.0 tok/s (was 40.0)" in rows["gw-a"]
    assert "failed" in rows["gw-c"] and "canary prompt 1 timed out" in rows["gw-c"]
