"""Access to the bridge: named tokens with roles against each class of route, over a real HTTP server on
both registry backends, and the audit log of every mutating call, API and CLI."""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from cloud_bridge import commands
from cloud_bridge.cli import main
from cloud_bridge.config import BridgeConfig
from cloud_bridge.http import deps
from cloud_bridge.http.app import create_app
from cloud_bridge.store.access import ROLES, Role, role_allows, token_hash
from cloud_bridge.store.registry import Registry

from .conftest import http_server
from .factories import T0, offline, online

FILE_TOKEN = "file-token-0123456789abcdef"
ME = f"cli:{pwd.getpwuid(os.geteuid()).pw_name}"


@pytest.fixture
def server(registry: Registry) -> Iterator[str]:
    registry.devices.record_status(online("gw-a"), T0)
    registry.devices.record_status(offline("gw-off"), T0)
    with http_server(create_app(registry, BridgeConfig(), FILE_TOKEN)) as url:
        yield url


def call(url: str, token: str, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def queued_ping(registry: Registry) -> str:
    return commands.send(registry, commands.CommandRequest(target="gw-a", kind="ping")).rows[0].id


# Each class of route: the role it needs, and calls of it with the status each answers when allowed.
ROUTES: dict[Role, list[tuple[str, str, Any, int]]] = {
    "viewer": [("GET", "/api/devices", None, 200), ("GET", "/api/commands", None, 200),
               ("GET", "/api/alerts", None, 200), ("GET", "/v1/models", None, 200)],
    "operator": [("POST", "/api/commands", {"target": "gw-a", "kind": "ping"}, 201),
                 ("POST", "/api/commands/{queued}/cancel", None, 201),
                 ("POST", "/v1/chat/completions", {"model": "gw-off", "messages": [{"role": "user", "content": "hi"}]},
                  503)],
    "admin": [("POST", "/api/commands", {"target": "gw-a", "kind": "config", "params": {"temperature": 0.2}}, 201),
              ("GET", "/api/audit", None, 200)],
}


@pytest.mark.parametrize("role", ROLES)
def test_each_role_reaches_the_routes_of_its_level_and_below_and_gets_403_above(server, registry, role):
    token = registry.tokens.add(f"t-{role}", role)
    for needed, calls in ROUTES.items():
        for method, path, body, allowed in calls:
            response = call(server, token, method, path.format(queued=queued_ping(registry)), body)
            if role_allows(role, needed):
                assert response.status_code == allowed, (role, path, response.text)
            else:
                assert response.status_code == 403, (role, path, response.text)
                error = response.json()["error"]
                assert (error["type"], error["code"]) == ("permission_error", "insufficient_role")
                named = error["message"].split(" needs ")[1].split()[0]  # a viewer's `config` fails on operator
                assert f"has role {role}" in error["message"] and not role_allows(role, named)
                assert response.headers["x-should-retry"] == "false"


def test_the_token_file_is_an_admin_named_file_and_unknown_or_revoked_tokens_get_401(server, registry):
    assert call(server, FILE_TOKEN, "GET", "/api/audit").status_code == 200
    token = registry.tokens.add("ci", "viewer")
    assert registry.tokens.all()[0].last_used_at is None
    assert call(server, token, "GET", "/api/devices").status_code == 200
    assert registry.tokens.all()[0].last_used_at is not None
    registry.tokens.revoke("ci")
    refused = call(server, token, "GET", "/api/devices")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert call(server, "x" * 43, "GET", "/api/devices").status_code == 401
    assert httpx.get(server + "/api/devices").status_code == 401


def test_tokens_are_stored_as_their_sha256_only(registry):
    token = registry.tokens.add("ops", "operator")
    stored = registry._connection.query("SELECT * FROM api_tokens")
    assert len(token) >= 43 and token not in str(stored) and stored[0]["token_sha256"] == token_hash(token)
    with pytest.raises(Exception, match="exists; revoke it first"):
        registry.tokens.add("ops", "viewer")
    with pytest.raises(Exception, match="no token named 'nobody'"):
        registry.tokens.revoke("nobody")
    for name in ("file", "anonymous", "", "cli:root", "a b", "x" * 65):
        with pytest.raises(Exception, match="letters, digits"):
            registry.tokens.add(name, "admin")


def test_last_use_is_stamped_at_most_once_a_minute_so_pollers_do_not_write_each_call(registry):
    token = registry.tokens.add("poller", "viewer")
    first = registry.tokens.identify(token)
    stamped = registry.tokens.all()[0].last_used_at
    assert first.last_used_at is None and stamped is not None
    assert registry.tokens.identify(token).last_used_at == stamped
    assert registry.tokens.all()[0].last_used_at == stamped
    registry._connection.execute("UPDATE api_tokens SET last_used_at = '2020-01-01T00:00:00.000Z'")
    registry.tokens.identify(token)
    assert registry.tokens.all()[0].last_used_at >= stamped, "an old stamp is renewed"


def test_every_api_and_v1_route_declares_a_role(registry):
    checks = {deps.VIEWER.dependency, deps.OPERATOR.dependency, deps.ADMIN.dependency}
    for route in create_app(registry, BridgeConfig(), FILE_TOKEN).routes:
        if isinstance(route, APIRoute) and route.path.startswith(("/api", "/v1")):
            calls = {d.call for d in route.dependant.dependencies}
            assert calls & checks, f"{route.path} declares no role (use deps.VIEWER, OPERATOR or ADMIN)"


def test_mutating_api_calls_are_audited_with_the_caller_and_outcome_and_reads_are_not(server, registry):
    operator = registry.tokens.add("ops", "operator")
    viewer = registry.tokens.add("dash", "viewer")
    call(server, viewer, "GET", "/api/commands")
    sent = call(server, operator, "POST", "/api/commands", {"target": "gw-a", "kind": "ping"}).json()
    command_id = sent["commands"][0]["id"]
    call(server, operator, "POST", f"/api/commands/{command_id}/cancel")
    call(server, operator, "POST", "/api/commands", {"target": "gw-a", "kind": "config", "params": {"top_p": 0.5}})
    call(server, viewer, "POST", "/api/commands", {"target": "gw-a", "kind": "ping"})
    call(server, FILE_TOKEN, "POST", "/api/commands", {"target": "group/site-a", "kind": "config",
                                                        "params": {"temperature": 0.1}})
    httpx.post(server + "/api/commands", json={})
    log = call(server, FILE_TOKEN, "GET", "/api/audit").json()
    assert [(a["actor"], a["action"], a["target"], a["outcome"]) for a in reversed(log)] == [
        ("ops", "POST /api/commands", "gw-a", "ok"),
        ("ops", f"POST /api/commands/{command_id}/cancel", f"/api/commands/{command_id}/cancel", "ok"),
        ("ops", "POST /api/commands", "gw-a", "http 403"),
        ("dash", "POST /api/commands", "/api/commands", "http 403"),
        ("file", "POST /api/commands", "group/site-a", "http 400"),  # a group with no member
        ("anonymous", "POST /api/commands", "/api/commands", "http 401"),
    ]
    assert all(a["ts"] for a in log)


def test_retention_prunes_audit_entries_older_than_audit_days(registry):
    registry.audit.record("ops", "POST /api/commands", "gw-a", "ok")
    now = datetime.now(UTC)
    kept = registry.retention.prune(before=None, chunks_before=None, audit_before=now - timedelta(days=1))
    assert kept == {"audit_log": 0} and len(registry.audit.recent()) == 1
    gone = registry.retention.prune(before=None, chunks_before=None, audit_before=now + timedelta(days=1))
    assert gone == {"audit_log": 1} and registry.audit.recent() == []


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text('[store]\npath = "registry.db"\n')
    registry = Registry.open(tmp_path / "registry.db")
    registry.devices.record_status(online("gw-a"), T0)
    registry.close()
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_token_commands_print_the_token_once_and_list_never_shows_it(config, capsys, tmp_path):
    code, token, err = cli(capsys, "token", "add", "grafana", "--role", "viewer", "--config", str(config))
    token = token.strip()
    assert code == 0 and len(token) >= 43 and "only this once" in err
    code, table, _ = cli(capsys, "token", "list", "--config", str(config))
    assert code == 0 and "grafana" in table and "viewer" in table and token not in table
    code, listed, _ = cli(capsys, "token", "list", "--json", "--config", str(config))
    assert token not in listed and '"last_used_at": null' in listed
    assert cli(capsys, "token", "add", "grafana", "--role", "admin", "--config", str(config))[0] == 3
    assert cli(capsys, "token", "revoke", "grafana", "--config", str(config))[0] == 0
    code, _, err = cli(capsys, "token", "revoke", "grafana", "--config", str(config))
    assert code == 3 and "no token named 'grafana'" in err
    registry = Registry.open(tmp_path / "registry.db")
    assert registry.tokens.all() == []
    registry.close()


def test_cli_changes_are_audited_as_the_unix_user_and_reads_are_not(config, capsys):
    conf = ("--config", str(config))
    cli(capsys, "send", "gw-a", "ping", "--no-wait", *conf)
    command_id = cli(capsys, "commands", "--json", *conf)[1].split('"id": "')[1].split('"')[0]
    cli(capsys, "cancel", command_id, *conf)
    cli(capsys, "cancel", "no-such-command", *conf)
    cli(capsys, "policy", "gw-a", "--set", '{"temperature": 0.3}', "--no-wait", *conf)
    cli(capsys, "policy", *conf)
    cli(capsys, "devices", *conf)
    cli(capsys, "token", "add", "ops", "--role", "operator", *conf)
    cli(capsys, "token", "list", *conf)
    cli(capsys, "token", "revoke", "ops", *conf)
    code, table, _ = cli(capsys, "audit", "--limit", "3", *conf)
    assert code == 0 and table.count(ME) == 3 and "token revoke" in table and "send ping" not in table
    log = main_json(capsys, conf)
    assert [(a["actor"], a["action"], a["target"], a["outcome"].split(":")[0]) for a in reversed(log)] == [
        (ME, "send ping", "gw-a", "ok"),
        (ME, "cancel", command_id, "ok"),
        (ME, "cancel", "no-such-command", "error"),
        (ME, "policy --set", "gw-a", "ok"),
        (ME, "token add", "ops", "ok"),
        (ME, "token revoke", "ops", "ok"),
    ]


def main_json(capsys: pytest.CaptureFixture[str], conf: tuple[str, ...]) -> list[dict[str, Any]]:
    code, out, _ = cli(capsys, "audit", "--json", *conf)
    assert code == 0
    return json.loads(out)
