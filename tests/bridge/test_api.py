"""The HTTP API in process (FastAPI's TestClient) on a real registry file: auth, targets, cancel, alerts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from autoglm_wire.protocol import Status
from cloud_bridge.config import BridgeConfig
from cloud_bridge.errors import ConfigError
from cloud_bridge.http.app import create_app
from cloud_bridge.http.deps import read_token

from .factories import T0, online, reply

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
def client(registry):
    app = create_app(registry, BridgeConfig(), TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as test_client:
        yield test_client


def _fleet(registry) -> None:
    for device_id in ("gw-a", "gw-b"):
        registry.devices.record_status(online(device_id, groups=["lab"]), T0)
        registry.groups.add(device_id, "lab")
    registry.devices.record_status(Status(device_id="gw-c", state="offline"), T0)


def test_every_api_call_without_the_token_gets_401_saying_where_the_token_is(registry):
    with TestClient(create_app(registry, BridgeConfig(), TOKEN)) as anonymous:
        response = anonymous.get("/api/devices")
        assert response.status_code == 401
        assert "token_file" in response.json()["error"]["message"]
        wrong = anonymous.get("/api/devices", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert anonymous.get("/").status_code == 200 and "token_file" in anonymous.get("/").text
        assert "/api/commands" in anonymous.get("/openapi.json").json()["paths"]


def test_devices_are_listed_with_their_state_model_and_groups(client, registry):
    _fleet(registry)
    devices = {d["device_id"]: d for d in client.get("/api/devices").json()}
    assert devices["gw-a"]["state"] == "online" and devices["gw-a"]["groups"] == ["lab"]
    assert devices["gw-a"]["model_sha256"] == "ab" * 32
    assert client.get("/api/devices/nope").status_code == 404


def test_devices_come_a_page_at_a_time_with_the_total_in_a_header(client, registry):
    for i in range(120):
        registry.devices.record_status(online(f"gw-{i:03d}", groups=["lab"]), T0)
        registry.groups.add(f"gw-{i:03d}", "lab", T0)
    registry.devices.record_status(Status(device_id="gw-007", state="offline"), T0)
    first = client.get("/api/devices")
    assert first.headers["X-Total-Count"] == "120" and len(first.json()) == 100  # the default page
    page = client.get("/api/devices", params={"limit": 5, "offset": 118})
    assert [d["device_id"] for d in page.json()] == ["gw-118", "gw-119"]
    found = client.get("/api/devices", params={"q": "GW-00", "state": "online", "group": "lab", "model": "glm-4-tiny"})
    assert [d["device_id"] for d in found.json()] == [f"gw-00{i}" for i in range(10) if i != 7]
    assert found.headers["X-Total-Count"] == "9"
    assert client.get("/api/devices", params={"limit": 1001}).status_code == 400
    assert client.get("/api/devices", params={"offset": -1}).status_code == 400


def test_a_group_command_is_one_command_on_the_wire_tracked_per_member(client, registry):
    _fleet(registry)
    response = client.post("/api/commands", json={"target": "group/lab", "kind": "ping", "id": "b1", "priority": 5})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["batch"] == "b1"
    assert sorted(c["id"] for c in body["commands"]) == ["b1.gw-a", "b1.gw-b"]
    assert all(c["priority"] == 5 and c["wire_id"] == "b1" for c in body["commands"])
    assert all(c["payload"]["id"] == "b1" and c["payload"]["target"] == "group/lab" for c in body["commands"])
    registry.replies.record(reply(1, "accepted", "b1", "gw-a"), T0)
    registry.replies.record(reply(2, "succeeded", "b1", "gw-a", output={"pong": True}), T0)
    states = {c["device_id"]: c["state"] for c in client.get("/api/commands?batch=b1").json()}
    assert states == {"gw-a": "succeeded", "gw-b": "pending"}
    assert [r["status"] for r in client.get("/api/commands/b1.gw-a").json()["replies"]] == ["accepted", "succeeded"]
    assert client.get("/api/commands/b1.gw-b").json()["replies"] == []


def test_cancelling_one_member_of_a_group_command_cancels_it_on_that_device_only(client, registry):
    _fleet(registry)
    client.post("/api/commands", json={"target": "group/lab", "kind": "ping", "id": "b2"})
    body = client.post("/api/commands/b2.gw-a/cancel").json()
    assert body["target"]["state"] == "cancelled"
    assert body["cancel"]["device_id"] == "gw-a" and body["cancel"]["payload"]["params"] == {"target": "b2"}
    assert client.get("/api/commands/b2.gw-b").json()["state"] == "pending"


def test_a_filter_selects_the_devices_it_names(client, registry):
    _fleet(registry)
    body = client.post("/api/commands", json={"filter": {"state": "offline"}, "kind": "ping"}).json()
    assert [c["device_id"] for c in body["commands"]] == ["gw-c"]
    empty = client.post("/api/commands", json={"filter": {"group": "nobody"}, "kind": "ping"})
    assert empty.status_code == 400 and "cloud-bridge devices" in empty.json()["error"]["message"]


def test_a_request_with_an_unknown_field_or_a_bad_kind_is_refused(client, registry):
    _fleet(registry)
    assert client.post("/api/commands", json={"target": "gw-a", "kind": "ping", "colour": 1}).status_code == 400
    bad = client.post("/api/commands", json={"target": "gw-a", "kind": "dance"})
    assert bad.status_code == 400 and "protocol v1 kinds" in bad.json()["error"]["message"]


def test_higher_priority_commands_are_dispatched_first(client, registry):
    _fleet(registry)
    client.post("/api/commands", json={"target": "gw-a", "kind": "ping", "id": "low"})
    client.post("/api/commands", json={"target": "gw-a", "kind": "ping", "id": "high", "priority": 10})
    assert [row.id for row in registry.commands.active()] == ["high", "low"]


def test_cancelling_an_undelivered_command_closes_it_and_sends_a_cancel(client, registry):
    _fleet(registry)
    client.post("/api/commands", json={"target": "gw-a", "kind": "ping", "id": "p1"})
    body = client.post("/api/commands/p1/cancel").json()
    assert body["target"]["state"] == "cancelled"
    assert body["cancel"]["kind"] == "cancel" and body["cancel"]["payload"]["params"] == {"target": "p1"}
    again = client.post("/api/commands/p1/cancel")
    assert again.status_code == 400 and "nothing to cancel" in again.json()["error"]["message"]
    assert client.post("/api/commands/nope/cancel").status_code == 404


def test_a_command_shows_its_replies_and_a_config_reply_becomes_the_policy_in_force(client, registry):
    _fleet(registry)
    client.post("/api/commands", json={"target": "gw-a", "kind": "config", "params": {"temperature": 0.2},
                                       "id": "cfg1"})
    registry.replies.record(reply(1, "accepted", "cfg1", "gw-a"), T0)
    registry.replies.record(reply(2, "succeeded", "cfg1", "gw-a", output={"temperature": 0.2}), T0)
    body = client.get("/api/commands/cfg1").json()
    assert body["state"] == "succeeded" and [r["status"] for r in body["replies"]] == ["accepted", "succeeded"]
    assert client.get("/api/devices/gw-a").json()["policy"] == {"temperature": 0.2}
    assert [r["seq"] for r in client.get("/api/replies?device=gw-a").json()] == [2, 1]


def test_the_stream_endpoint_sends_each_delta_then_the_finished_command(client, registry):
    from .factories import chunk

    _fleet(registry)
    client.post("/api/commands", json={"target": "gw-a", "kind": "chat", "prompt": "hi", "stream": True, "id": "s1"})
    for index, delta in enumerate(["Hel", "lo"]):
        registry.chunks.record("gw-a", chunk(index, delta, "s1"), T0)
    registry.replies.record(reply(1, "succeeded", "s1", "gw-a", output={"text": "Hello", "finish_reason": "stop"}), T0)
    text = client.get("/api/commands/s1/stream").text
    assert text.index('"Hel"') < text.index('"lo"') < text.index("event: done")
    assert '"state": "succeeded"' in text


def test_the_token_file_must_exist_and_hold_a_long_token(tmp_path: Path):
    with pytest.raises(ConfigError, match="secrets.token_urlsafe"):
        read_token(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(short)


def test_docs_are_swagger_ui_with_every_asset_served_here_and_no_external_url(registry):
    with TestClient(create_app(registry, BridgeConfig(), TOKEN)) as anonymous:
        page = anonymous.get("/docs")
        assert page.status_code == 200 and "SwaggerUIBundle" in page.text and "'/openapi.json'" in page.text
        links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
        assert len(links) == 3 and all(link.startswith("/docs/assets/") for link in links), links
        assert "http:" not in page.text and "https:" not in page.text and "//" not in page.text
        for link in links:
            asset = anonymous.get(link)
            assert asset.status_code == 200 and len(asset.content) > 1000, link
        script = next(link for link in links if link.endswith(".js"))
        assert "SwaggerUIBundle" in anonymous.get(script).text
        missing = anonymous.get("/docs/assets/index.html")
        assert missing.status_code == 404 and "swagger-ui-bundle.js" in missing.json()["error"]["message"]
        assert anonymous.get("/redoc").status_code == 404


def test_the_console_loads_uplot_from_the_bridge_with_its_content_types(registry):
    types = {"uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css", "LICENSE": "text/plain"}
    with TestClient(create_app(registry, BridgeConfig(), TOKEN)) as anonymous:
        page = anonymous.get("/").text
        assert re.findall(r'<(?:script src|link rel="stylesheet" href)="([^"]*)"', page) == [
            "/vendor/uplot-1.6.32/uPlot.min.css", "/vendor/uplot-1.6.32/uPlot.iife.min.js"]
        for name, content_type in types.items():
            served = anonymous.get(f"/vendor/uplot-1.6.32/{name}")
            assert served.status_code == 200 and served.headers["content-type"].startswith(content_type), name
        assert anonymous.get("/vendor/uplot-1.6.32/uPlot.iife.min.js").text.startswith(
            "/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
        assert "MIT License" in anonymous.get("/vendor/uplot-1.6.32/LICENSE").text
        missing = anonymous.get("/vendor/uplot-1.6.32/uPlot.esm.js")
        assert missing.status_code == 404 and "uPlot.iife.min.js" in missing.json()["error"]["message"]
