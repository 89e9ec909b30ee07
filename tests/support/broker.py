"""A private mosquitto on a free port, with persistence, that tests can stop and restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, up: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not come {'up' if up else 'down'} within {timeout} s")


@dataclass(frozen=True)
class TlsListener:
    """A second, authenticated listener: TLS with the given files, optional client certificates,
    password file and ACL. The plain listener on `Broker.port` stays anonymous (the test's observer)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True
    use_identity_as_username: bool = False
    password_file: Path | None = None
    acl_file: Path | None = None

    def lines(self, port: int) -> list[str]:
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous false", f"cafile {self.ca_file}",
                 f"certfile {self.cert_file}", f"keyfile {self.key_file}", "tls_version tlsv1.2",
                 f"require_certificate {str(self.require_certificate).lower()}",
                 f"use_identity_as_username {str(self.use_identity_as_username).lower()}"]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        return lines


class Broker:
    """mosquitto with `persistence true` in its own folder; `stop()` then `start()` keeps the port.
    With `tls`, it also listens on `tls_port` (per-listener authentication and ACL)."""

    def __init__(self, workdir: Path, port: int | None = None, *, tls: TlsListener | None = None) -> None:
        if not Path(MOSQUITTO).exists():
            raise RuntimeError("mosquitto is not installed: run `sudo apt-get install -y mosquitto` (make setup does)")
        self.workdir = workdir
        self.port = port or free_port()
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {workdir}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            "set_tcp_nodelay true",
            f"log_dest file {self.log}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.tls_port: int | None = None
        if tls is not None:
            self.tls_port = free_port()
            lines = ["per_listener_settings true", *lines, *tls.lines(self.tls_port)]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> Broker:
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        if self.tls_port is not None:
            wait_for_port(self.tls_port)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM saves sessions to disk; SIGKILL loses what was not autosaved."""
        if self.process is None:
            return
        self.process.send_signal(sig)
        self.process.wait(timeout=10)
        self.process = None
        wait_for_port(self.port, up=False)

    def restart(self, sig: int = signal.SIGTERM) -> Broker:
        """Stop (SIGTERM keeps sessions, SIGKILL loses unsaved ones) and start again on the same port."""
        self.stop(sig)
        return self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None
