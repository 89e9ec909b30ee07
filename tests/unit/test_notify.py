"""systemd notifications (sd_notify) and the watchdog interval, against a real datagram socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoglm_wire.notify import sd_notify, watchdog_interval_s


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket standing in for systemd, with NOTIFY_SOCKET pointing at it."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_without_notify_socket_sd_notify_sends_nothing_and_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


def test_an_empty_notify_socket_counts_as_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sd_notify("READY=1") is False


def test_sd_notify_delivers_the_message_to_the_socket(notify_socket: socket.socket) -> None:
    assert sd_notify("READY=1\nSTATUS=serving autoglm/d1/cmd") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving autoglm/d1/cmd"


def test_each_notification_is_one_datagram(notify_socket: socket.socket) -> None:
    sd_notify("WATCHDOG=1")
    sd_notify("STOPPING=1")
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_sd_notify_reaches_an_abstract_socket_written_with_an_at_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edge-agent-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_without_watchdog_usec_there_is_no_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() is None


def test_the_watchdog_is_fed_at_half_of_watchdog_sec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 15.0


def test_the_watchdog_applies_when_watchdog_pid_is_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 1.0


def test_the_watchdog_is_ignored_when_watchdog_pid_is_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval_s() is None
