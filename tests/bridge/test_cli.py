"""`cloud-bridge alerts|cancel|policy` and `--json`, run in process against a registry file."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from cloud_bridge.cli import EXIT_USAGE, build_parser, main
from cloud_bridge.store.registry import Registry

from .factories import T0, online, reply


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text('[store]\npath = "registry.db"\n')
    registry = Registry.open(tmp_path / "registry.db")
    for device_id in ("gw-a", "gw-b"):
        registry.devices.record_status(online(device_id, groups=["lab"]), T0)
    registry.close()
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_devices_and_commands_print_json_for_scripts(config, capsys):
    code, out, _ = run(capsys, "devices", "--config", str(config), "--json")
    assert code == 0 and [d["device_id"] for d in json.loads(out)] == ["gw-a", "gw-b"]
    run(capsys, "send", "--config", str(config), "gw-a", "ping", "--no-wait", "--id", "p1", "--priority", "7")
    code, out, _ = run(capsys, "commands", "--config", str(config), "--json")
    (row,) = json.loads(out)
    assert (row["id"], row["priority"], row["state"]) == ("p1", 7, "pending") and "raw_payload" not in row


def test_group_membership_is_managed_by_the_cli_and_exported_for_the_acl(config, capsys):
    code, out, _ = run(capsys, "group", "list", "--config", str(config), "--json")
    assert json.loads(out)["gw-a"] == {"assigned": [], "announced": ["lab"], "routed": []}
    code, out, err = run(capsys, "group", "add", "--config", str(config), "gw-a", "lab")
    assert code == 0 and "gw-a: assigned lab" in out and "make_acl.py" in err
    code, out, _ = run(capsys, "group", "add", "--config", str(config), "gw-c", "site-b")  # before it ever reports
    code, out, _ = run(capsys, "group", "list", "--config", str(config), "--toml")
    assert out.splitlines()[1:] == ["[groups]", '"lab" = ["gw-a"]', '"site-b" = ["gw-c"]']
    code, out, _ = run(capsys, "group", "list", "--config", str(config))
    assert "MISMATCH" in out  # gw-b announces lab, is assigned nothing
    assert run(capsys, "group", "add", "--config", str(config), "gw-a", "a/b")[0] == EXIT_USAGE
    assert run(capsys, "group", "remove", "--config", str(config), "gw-c", "site-b")[0] == 0
    code, _, err = run(capsys, "group", "remove", "--config", str(config), "gw-c", "site-b")
    assert code == EXIT_USAGE and "is not assigned site-b" in err
    registry = Registry.open(config.parent / "registry.db")
    audit = [(a.actor.startswith("cli:"), a.action, a.target, a.outcome.split(":")[0])
             for a in reversed(registry.audit.recent(10))]
    registry.close()
    assert audit == [(True, "group add", "group/lab gw-a", "ok"), (True, "group add", "group/site-b gw-c", "ok"),
                     (True, "group add", "group/a/b gw-a", "error"), (True, "group remove", "group/site-b gw-c", "ok"),
                     (True, "group remove", "group/site-b gw-c", "error")]


def test_import_claimed_assigns_what_each_device_announced_once(config, capsys):
    code, out, _ = run(capsys, "group", "import-claimed", "--config", str(config))
    assert code == 0 and "gw-a: assigned lab" in out and "gw-b: assigned lab" in out and "2 assignment(s)" in out
    code, out, _ = run(capsys, "group", "import-claimed", "--config", str(config))
    assert "0 assignment(s)" in out
    code, out, _ = run(capsys, "group", "list", "--config", str(config), "--json")
    assert json.loads(out)["gw-b"]["routed"] == ["lab"]
    registry = Registry.open(config.parent / "registry.db")
    assert [(a.action, a.target, a.outcome) for a in registry.audit.recent(10)] == [
        ("group import-claimed", "*", "ok")] * 2
    registry.close()


def test_devices_takes_the_filters_of_the_api(config, capsys):
    for device_id in ("gw-a", "gw-b"):
        run(capsys, "group", "add", "--config", str(config), device_id, "lab")
    code, out, _ = run(capsys, "devices", "--config", str(config), "--json", "--match", "A")
    assert code == 0 and [d["device_id"] for d in json.loads(out)] == ["gw-a"]
    code, out, _ = run(capsys, "devices", "--config", str(config), "--group", "lab", "--limit", "1", "--offset", "1")
    assert code == 0 and "gw-b" in out and "gw-a" not in out
    code, out, _ = run(capsys, "devices", "--config", str(config), "--state", "offline")
    assert code == 0 and out.strip() == "no device matches"
    code, _, err = run(capsys, "devices", "--config", str(config), "--limit", "0")
    assert code == EXIT_USAGE and "--limit must be" in err


def test_policy_set_sends_a_config_command_to_every_group_member_and_policy_shows_what_is_in_force(config, capsys):
    for device_id in ("gw-a", "gw-b"):
        run(capsys, "group", "add", "--config", str(config), device_id, "lab")
    code, out, err = run(capsys, "policy", "--config", str(config), "group/lab", "--set", '{"temperature": 0.2}',
                         "--no-wait")
    ids = out.split()
    assert code == 0 and len(ids) == 2 and all(i.endswith((".gw-a", ".gw-b")) for i in ids)
    assert "does not list kind 'config'" in err  # these devices announced ping/chat/complete/cancel only
    registry = Registry.open(config.parent / "registry.db")
    registry.replies.record(reply(1, "succeeded", ids[0].split(".")[0], "gw-a", output={"temperature": 0.2}), T0)
    registry.close()
    code, out, _ = run(capsys, "policy", "--config", str(config))
    assert '{"temperature": 0.2}' in out and "(agent defaults)" in out
    code, out, _ = run(capsys, "policy", "--config", str(config), "--json")
    assert json.loads(out) == {"gw-a": {"temperature": 0.2}, "gw-b": None}


def test_policy_set_waits_for_the_devices_answer_like_send(config, capsys):
    code, out, err = run(capsys, "policy", "--config", str(config), "gw-a", "--set", '{"max_tokens": 64}',
                         "--timeout", "0.3")
    assert code == 2 and "no terminal reply" in err

    def answer() -> None:
        registry = Registry.open(config.parent / "registry.db")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pending = [r for r in registry.commands.active() if r.device_id == "gw-b"]
            if pending:
                registry.replies.record(reply(9, "succeeded", pending[0].id, "gw-b", output={"max_tokens": 64}), T0)
                break
            time.sleep(0.05)
        registry.close()

    device = threading.Thread(target=answer)
    device.start()
    code, out, err = run(capsys, "policy", "--config", str(config), "gw-b", "--set", '{"max_tokens": 64}',
                         "--timeout", "10")
    device.join()
    assert code == 0 and 'policy in force {"max_tokens": 64}' in out, err


def test_cancel_closes_an_undelivered_command_and_refuses_a_finished_one(config, capsys):
    run(capsys, "send", "--config", str(config), "gw-a", "ping", "--no-wait", "--id", "p1")
    code, out, err = run(capsys, "cancel", "--config", str(config), "p1", "--json")
    body = json.loads(out)
    assert code == 0 and body["target"]["state"] == "cancelled" and body["cancel"]["kind"] == "cancel"
    code, _, err = run(capsys, "cancel", "--config", str(config), "p1")
    assert code == EXIT_USAGE and "nothing to cancel" in err


def test_alerts_says_when_there_are_none_and_lists_them_as_json(config, capsys):
    code, out, _ = run(capsys, "alerts", "--config", str(config))
    assert code == 0 and "no open alerts" in out
    registry = Registry.open(config.parent / "registry.db")
    registry.alerts.open("gw-a", "offline", "offline for 10 min", T0)
    registry.close()
    code, out, _ = run(capsys, "alerts", "--config", str(config), "--json")
    assert [(a["device_id"], a["kind"]) for a in json.loads(out)] == [("gw-a", "offline")]


def test_every_subcommand_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [name for name in subcommands if f"cloud-bridge {name}" not in readme]
    assert not missing, f"undocumented in README.md: {missing}"


def test_serve_stops_with_a_clear_error_when_its_http_port_is_taken(tmp_path):
    import socket
    import subprocess

    from .conftest import VENV_BIN, free_port, http_section, write_bridge_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_bridge_config(tmp_path, free_port(), "tport", extra=http_section(tmp_path, port, "t" * 24))
        done = subprocess.run([str(VENV_BIN / "cloud-bridge"), "serve", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_USAGE
    assert f"could not listen on 127.0.0.1:{port}" in done.stderr and "[http] port" in done.stderr
