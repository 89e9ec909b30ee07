"""The API calls behind the console's pages, on both registry backends: statistics per time bucket
(exact percentile_cont values), fleet counts, a device's state history, commands filtered and paged
with `X-Total-Count`, alert acknowledgement (operator, first one wins, audited), the live SSE feed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.app import create_app
from cloud_bridge.stats import fleet_series
from cloud_bridge.store.registry import Registry

from .conftest import http_server
from .factories import at, command, offline, online, reply

TOKEN = "console-api-token-0123456789"
FAILED = {"code": "model_error", "message": "llama.cpp failed"}


def _replies(registry: Registry) -> None:
    """Time buckets of 600 s from T0 (a multiple of 600 s since 1970): dev-1 totals 100 and 300 ms in
    the first, a failure in the second; dev-2 one chat at 40 tokens/s in the third."""
    for device_id in ("dev-1", "dev-2"):
        registry.devices.record_status(online(device_id), at(0))
    rows = [("dev-1", 1, "succeeded", 100.0, 10.0, 100), ("dev-1", 2, "succeeded", 300.0, 20.0, 200),
            ("dev-1", 3, "failed", None, None, 700), ("dev-2", 1, "succeeded", 50.0, 40.0, 1300)]
    for device_id, seq, status, total_ms, speed, when in rows:
        command_id = f"{device_id}-chat-{seq}"
        registry.commands.add(command(command_id, kind="chat", params={"prompt": "hi"}, device_id=device_id),
                              device_id, at(when - 1))
        metrics = {} if total_ms is None else {"total_ms": total_ms, "tokens_per_s": speed}
        registry.replies.record(reply(seq, status, command_id=command_id, device_id=device_id,
                                      output={"text": "x"} if status == "succeeded" else None,
                                      error=FAILED if status == "failed" else None, metrics=metrics), at(when))


def test_series_cuts_the_window_into_buckets_with_exact_percentiles(registry):
    _replies(registry)
    fleet = fleet_series(registry, "30m", 3, None, at(1800))
    assert fleet.bucket_s == 600
    assert [(p.t, p.group, p.count, p.failed) for p in fleet.points] == [
        ("2026-11-21T10:00:00.000Z", "fleet", 2, 0), ("2026-11-21T10:10:00.000Z", "fleet", 1, 1),
        ("2026-11-21T10:20:00.000Z", "fleet", 1, 0)]
    first = fleet.points[0]
    assert (first.total_ms.p50, first.total_ms.p95, first.total_ms.p99) == pytest.approx((200.0, 290.0, 298.0))
    assert fleet.points[1].total_ms.p50 is None and fleet.points[1].error_rate == 1.0
    by_device = fleet_series(registry, "30m", 3, "device", at(1800))
    speeds = {(p.t[11:16], p.group): p.tokens_per_s.p50 for p in by_device.points}
    assert speeds == {("10:00", "dev-1"): pytest.approx(15.0), ("10:10", "dev-1"): None,
                      ("10:20", "dev-2"): pytest.approx(40.0)}


@pytest.fixture
def api(registry: Registry) -> Iterator[TestClient]:
    with TestClient(create_app(registry, BridgeConfig(), TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def test_series_and_fleet_over_http(registry, api):
    _replies(registry)
    registry.devices.record_status(offline("dev-2"), at(1400))
    registry.alerts.open("dev-2", "offline", "dev-2 offline", at(1500))
    body = api.get("/api/stats/series", params={"window": "3650d", "buckets": 1}).json()
    assert [(p["group"], p["count"]) for p in body["points"]] == [("fleet", 4)]
    assert api.get("/api/stats/series", params={"buckets": 0}).status_code == 400
    assert api.get("/api/stats/series", params={"window": "soon"}).status_code == 400
    assert api.get("/api/fleet").json() == {"devices": {"online": 1, "offline": 1}, "alerts_open": {"offline": 1},
                                            "commands": {"succeeded": 3, "failed": 1}}


def test_state_history_newest_first(registry, api):
    registry.devices.record_status(online("gw-1"), at(0))
    registry.devices.record_status(offline("gw-1"), at(60))
    registry.devices.record_status(online("gw-1"), at(120))
    states = api.get("/api/devices/gw-1/states").json()
    assert [(s["state"], s["ts"]) for s in states] == [("online", "2026-11-21T10:02:00.000Z"),
                                                       ("offline", "2026-11-21T10:01:00.000Z"),
                                                       ("online", "2026-11-21T10:00:00.000Z")]
    assert api.get("/api/devices/gw-1/states", params={"limit": 1}).json()[0]["state"] == "online"
    assert api.get("/api/devices/nobody/states").json() == []


def test_commands_are_filtered_and_paged_with_the_total_in_a_header(registry, api):
    _replies(registry)
    first = api.get("/api/commands", params={"limit": 2})
    assert first.headers["X-Total-Count"] == "4" and len(first.json()) == 2
    second = api.get("/api/commands", params={"limit": 2, "offset": 2})
    assert {c["id"] for c in first.json()}.isdisjoint({c["id"] for c in second.json()})
    assert len(second.json()) == 2
    failed = api.get("/api/commands", params={"state": "failed"})
    assert failed.headers["X-Total-Count"] == "1" and failed.json()[0]["id"] == "dev-1-chat-3"
    dev2 = api.get("/api/commands", params={"device": "dev-2", "kind": "chat"})
    assert dev2.headers["X-Total-Count"] == "1"
    assert api.get("/api/commands", params={"kind": "ping"}).json() == []
    assert api.get("/api/commands", params={"offset": -1}).status_code == 400


def test_an_operator_acknowledges_an_alert_once_a_viewer_cannot(registry):
    registry.alerts.open("dev-1", "offline", "dev-1 offline", at(0))
    registry.alerts.open("dev-2", "offline", "dev-2 offline", at(0))
    viewer, operator = registry.tokens.add("wall-screen", "viewer"), registry.tokens.add("alice", "operator")
    with http_server(create_app(registry, BridgeConfig(), TOKEN)) as url:
        def post(token: str, path: str) -> httpx.Response:
            return httpx.post(url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)

        [alert] = httpx.get(url + "/api/alerts", params={"device": "dev-1"},
                            headers={"Authorization": f"Bearer {viewer}"}, timeout=30).json()
        refused = post(viewer, f"/api/alerts/{alert['id']}/acknowledge")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_role"
        taken = post(operator, f"/api/alerts/{alert['id']}/acknowledge")
        assert taken.status_code == 200 and taken.json()["acknowledged_by"] == "alice"
        again = post(TOKEN, f"/api/alerts/{alert['id']}/acknowledge").json()
        assert again["acknowledged_by"] == "alice" and again["acknowledged_at"] == taken.json()["acknowledged_at"]
        assert post(operator, "/api/alerts/99999/acknowledge").status_code == 404
    others = [a for a in registry.alerts.recent() if a.device_id == "dev-2"]
    assert others[0].acknowledged_at is None
    audit = [(a.actor, a.action, a.target, a.outcome) for a in registry.audit.recent(10)]
    assert ("alice", f"POST /api/alerts/{alert['id']}/acknowledge", f"alert/{alert['id']}", "ok") in audit
    path = f"/api/alerts/{alert['id']}/acknowledge"
    assert ("wall-screen", f"POST {path}", path, "http 403") in audit  # refused before the route named its target


def test_live_feed_pushes_new_replies_state_changes_and_fleet_counts(registry):
    registry.devices.record_status(online("dev-1"), at(0))
    registry.commands.add(command("live-1"), "dev-1", at(0))
    with http_server(create_app(registry, BridgeConfig(), TOKEN)) as url:
        seen: list[tuple[str, dict]] = []
        with httpx.stream("GET", url + "/api/live", params={"timeout_s": 30},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: ") and event:
                    seen.append((event, json.loads(line[len("data: "):])))
                    if event == "fleet" and len(seen) == 1:  # the first counts: now change something
                        threading.Thread(target=_changes, args=(registry,)).start()
                    if {"reply", "state"} <= {name for name, _ in seen} and seen[-1][0] == "fleet":
                        break
    assert seen[0] == ("fleet", {"devices": {"online": 1}, "alerts_open": {}, "commands": {"pending": 1}})
    replies = [data for name, data in seen if name == "reply"]
    assert replies == [{"device_id": "dev-1", "command_id": "live-1", "seq": 1, "status": "succeeded",
                        "received_at": "2026-11-21T10:00:05.000Z"}]
    assert [(d["device_id"], d["state"]) for name, d in seen if name == "state"] == [("dev-1", "offline")]
    assert seen[-1] == ("fleet", {"devices": {"offline": 1}, "alerts_open": {}, "commands": {"succeeded": 1}})


def _changes(registry: Registry) -> None:
    registry.replies.record(reply(1, "succeeded", command_id="live-1", output={"pong": True}), at(5))
    registry.devices.record_status(offline("dev-1"), at(6))
