"""Groups assigned by the cloud (issue #19, attack 2): a device that claims a group in its retained
Status gets none of that group's work. Registry on SQLite and PostgreSQL, the HTTP API in process."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cloud_bridge import commands
from cloud_bridge.alerts import Progress, check_fleet
from cloud_bridge.config import AlertConfig, BridgeConfig
from cloud_bridge.errors import InvalidRequest
from cloud_bridge.http.app import create_app

from .factories import T0, at, online

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
def fleet(registry):
    """gw-a is assigned site-a, gw-b site-b; gw-a (rogue) announces site-b too, retained."""
    registry.groups.add("gw-a", "site-a", T0)
    registry.groups.add("gw-b", "site-b", T0)
    registry.devices.record_status(online("gw-a", groups=["site-a", "site-b"]), T0, retained=True)
    registry.devices.record_status(online("gw-b", groups=["site-b"]), T0)
    return registry


def test_a_rogue_device_claiming_a_group_is_not_sent_its_work(fleet):
    queued = commands.send(fleet, commands.CommandRequest(target="group/site-b", kind="chat", prompt="secret"))
    assert [row.device_id for row in queued.rows] == ["gw-b"]


def test_a_rogue_device_is_not_selected_by_a_group_filter_nor_gets_its_own_groups_work(fleet):
    selected = commands.select(fleet, commands.DeviceFilter(group="site-b"))
    assert [d.device_id for d in selected] == ["gw-b"]
    with pytest.raises(InvalidRequest, match="group membership is the registry's"):
        commands.send(fleet, commands.CommandRequest(target="group/site-a", kind="ping"))  # its only member is suspect
    queued = commands.send(fleet, commands.CommandRequest(filter=commands.DeviceFilter(group="site-b"), kind="ping"))
    assert [row.device_id for row in queued.rows] == ["gw-b"]


def test_a_device_that_does_not_announce_an_assigned_group_gets_none_of_its_work(registry):
    registry.groups.add("gw-c", "lab", T0)
    registry.groups.add("gw-c", "floor", T0)
    registry.devices.record_status(online("gw-c", groups=["lab"]), T0)
    assert registry.devices.get("gw-c").routable_groups == ["lab"]  # it does not subscribe to floor's topic


def test_the_openai_models_list_only_groups_from_the_registry(fleet):
    with TestClient(create_app(fleet, BridgeConfig(), TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        names = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert names == {"gw-a", "gw-b", "group/site-b"}  # site-a: its only member announces more than it has
        fleet.groups.remove("gw-b", "site-b")
        names = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert "group/site-b" not in names
        response = client.post("/v1/chat/completions", json={"model": "group/site-b",
                                                             "messages": [{"role": "user", "content": "secret"}]})
        assert response.status_code in (404, 503) and fleet.commands.recent() == []


def test_a_mismatch_raises_an_alert_that_clears_when_the_device_announces_its_assignment(fleet):
    progress = Progress()  # checked incrementally, as the service does: no reply comes in between
    changes = check_fleet(fleet, AlertConfig(), at(1), progress)
    assert changes == [("gw-a", "group_mismatch", True)]
    assert "announces site-b without being assigned" in fleet.alerts.recent()[0].message
    fleet.devices.record_status(online("gw-a", groups=["site-a"]).model_copy(update={"ts": "2026-11-21T10:00:05Z"}),
                                at(5))
    assert check_fleet(fleet, AlertConfig(), at(6), progress) == [("gw-a", "group_mismatch", False)]
    assert fleet.devices.get("gw-a").routable_groups == ["site-a"]
    fleet.groups.add("gw-a", "site-c", at(7))  # a membership change alone raises it again
    assert check_fleet(fleet, AlertConfig(), at(8), progress) == [("gw-a", "group_mismatch", True)]


def test_the_api_manages_membership_behind_the_token(fleet):
    app = create_app(fleet, BridgeConfig(), TOKEN)
    with TestClient(app) as anonymous:
        assert anonymous.put("/api/groups/site-b/members/gw-a").status_code == 401
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        assert client.get("/api/groups").json() == {"site-a": ["gw-a"], "site-b": ["gw-b"]}
        assert client.put("/api/groups/lab/members/gw-b").json()["added"] is True
        assert client.put("/api/groups/lab/members/gw-b").json()["added"] is False
        assert client.put("/api/groups/a+b/members/gw-b").status_code == 400
        assert client.delete("/api/groups/lab/members/gw-b").status_code == 200
        assert client.delete("/api/groups/lab/members/gw-b").status_code == 404
        device = client.get("/api/devices/gw-a").json()
        assert (device["groups"], device["claimed_groups"]) == (["site-a"], ["site-a", "site-b"])
    assert [(a.actor, a.action, a.outcome) for a in reversed(fleet.audit.recent(3))] == [
        ("file", "PUT /api/groups/a+b/members/gw-b", "http 400"), ("file", "DELETE /api/groups/lab/members/gw-b", "ok"),
        ("file", "DELETE /api/groups/lab/members/gw-b", "http 404")]


def test_reading_membership_needs_a_viewer_and_changing_it_an_admin(fleet):
    tokens = {role: fleet.tokens.add(role, role) for role in ("viewer", "operator", "admin")}
    with TestClient(create_app(fleet, BridgeConfig(), TOKEN)) as client:
        def call(method: str, path: str, role: str) -> int:
            return client.request(method, path, headers={"Authorization": f"Bearer {tokens[role]}"}).status_code

        assert call("GET", "/api/groups", "viewer") == 200
        for method in ("PUT", "DELETE"):
            assert call(method, "/api/groups/lab/members/gw-b", "viewer") == 403
            assert call(method, "/api/groups/lab/members/gw-b", "operator") == 403
        assert call("PUT", "/api/groups/lab/members/gw-b", "admin") == 200
        assert call("DELETE", "/api/groups/lab/members/gw-b", "admin") == 200
    assert fleet.groups.members() == {"site-a": ["gw-a"], "site-b": ["gw-b"]}
    path = "/api/groups/lab/members/gw-b"
    assert [(a.actor, a.action, a.outcome) for a in reversed(fleet.audit.recent(6))] == [
        ("viewer", f"PUT {path}", "http 403"), ("operator", f"PUT {path}", "http 403"),
        ("viewer", f"DELETE {path}", "http 403"), ("operator", f"DELETE {path}", "http 403"),
        ("admin", f"PUT {path}", "ok"), ("admin", f"DELETE {path}", "ok")]
