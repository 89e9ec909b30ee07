"""systemd: the unit files parse, and the agent speaks sd_notify (READY, WATCHDOG, STOPPING)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_bridge.config import load_config as load_bridge_config
from edge_agent.config import load_config as load_agent_config
from tests.support.broker import Broker

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "systemd").glob("*.service"))
pytestmark = pytest.mark.integration


def test_the_shipped_config_files_load_with_every_key_they_set() -> None:
    agent = load_agent_config(ROOT / "systemd" / "edge-agent.toml")
    bridge = load_bridge_config(ROOT / "systemd" / "cloud-bridge.toml")
    assert agent.store.ledger_days == 7 and bridge.retention.days == 30 and bridge.dispatch.resend_interval_s == 5


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_the_unit_file_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = unit.read_text()
    assert "StateDirectory=" in text and "Restart=on-failure" in text and "NoNewPrivileges=yes" in text
    # verify checks that ExecStart exists: point it at this checkout's venv
    local = tmp_path / unit.name
    local.write_text(text.replace("/opt/autoglm-edge/.venv/bin/", str(Path(sys.executable).parent) + "/"))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_agent_unit_is_type_notify_with_a_watchdog() -> None:
    text = (ROOT / "systemd" / "edge-agent.service").read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text


def _receive_all(sock: socket.socket, until: str, timeout: float) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if until in messages[-1]:
            break
    return messages


def test_the_agent_sends_ready_and_feeds_the_watchdog_and_exits_0_on_sigterm(
        tmp_path: Path, own_broker: Broker, start_agent) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        agent, _, _ = start_agent(own_broker, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"})
        messages = _receive_all(sock, until="READY=1", timeout=60)
        assert any(m.startswith("READY=1") for m in messages), agent.log_text()
        watchdog = [m for m in _receive_all(sock, until="never", timeout=2.5) if m == "WATCHDOG=1"]
        assert len(watchdog) >= 2  # every WatchdogSec/2 = 0.5 s while healthy
        assert agent.terminate() == 0
        assert any("STOPPING=1" in m for m in _receive_all(sock, until="STOPPING=1", timeout=5))


def test_the_units_do_not_restart_a_broken_config_and_the_bridge_is_type_notify_too() -> None:
    agent = (ROOT / "systemd" / "edge-agent.service").read_text()
    bridge = (ROOT / "systemd" / "cloud-bridge.service").read_text()
    assert "RestartPreventExitStatus=2" in agent  # edge_agent.cli.EXIT_CONFIG
    assert "RestartPreventExitStatus=3" in bridge  # cloud_bridge.cli.EXIT_USAGE
    assert "Type=notify" in bridge and "WatchdogSec=" in bridge and "NotifyAccess=main" in bridge


def test_the_bridge_sends_ready_feeds_the_watchdog_and_says_stopping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from cloud_bridge.config import BridgeConfig
    from cloud_bridge.service import BridgeService
    from cloud_bridge.store.registry import Registry
    from tests.support.broker import free_port

    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        registry = Registry.open(tmp_path / "registry.db")
        config = BridgeConfig.model_validate({"mqtt": {"port": free_port()}})  # no broker: the link keeps trying
        stop = threading.Event()
        service = threading.Thread(target=BridgeService(config, registry).run, args=(stop,))
        service.start()
        try:
            messages = _receive_all(sock, until="READY=1", timeout=15)
            assert any(m.startswith("READY=1") for m in messages)
            assert len([m for m in _receive_all(sock, until="never", timeout=2.5) if m == "WATCHDOG=1"]) >= 2
        finally:
            stop.set()
            service.join(timeout=30)
            registry.close()
        assert any("STOPPING=1" in m for m in _receive_all(sock, until="STOPPING=1", timeout=5))
