"""Shared fixtures of the bridge tests: a registry on a tmp file, a private mosquitto, a bridge.

The mosquitto fixture starts its own broker on a free port (the lead may move it to a shared
tests/conftest.py later).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_bridge.store.registry import Registry
from tests.faults.harness import slow_enabled

MOSQUITTO = os.environ.get("MOSQUITTO", "/usr/sbin/mosquitto")
VENV_BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long variants (`slow`) run only with -m slow or EDGE_AGENT_SLOW_TESTS=1, as in tests/faults."""
    if slow_enabled(config):
        return
    skip = pytest.mark.skip(reason="long variant: run with -m slow or EDGE_AGENT_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords and "tests/bridge/" in str(item.fspath):
            item.add_marker(skip)


PG_ADMIN_URL = os.environ.get("AUTOGLM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_TABLES = ("devices, device_states, commands, replies, stream_chunks, events, alerts, counters, dead_letters, "
             "alert_deliveries, api_tokens, audit_log, models, rollouts, rollout_devices, device_groups")


@contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh PostgreSQL database (`autoglm_test_<random>`), dropped afterwards."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (make setup installs it)")
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL} ({exc}); start it or set AUTOGLM_TEST_PG")
    name = f"autoglm_test_{os.urandom(4).hex()}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, shared by its tests."""
    with scratch_database() as url:
        yield url


@pytest.fixture
def scratch_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (one that changes the schema)."""
    with scratch_database() as url:
        yield url


def empty_pg_registry(url: str) -> Registry:
    """The registry in `url` with every table emptied (a clean slate per test, one database per run)."""
    reg = Registry.connect(url)
    reg._connection.execute(f"TRUNCATE {PG_TABLES} RESTART IDENTITY")
    return reg


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    """The registry on each store: a tmp SQLite file, and the run's PostgreSQL database."""
    if request.param == "sqlite":
        reg = Registry.open(tmp_path / "registry.db")
    else:
        reg = empty_pg_registry(request.getfixturevalue("pg_url"))
    yield reg
    reg.close()


# --- a headless Chromium --------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium (selenium) that keeps its network log (`driver.get_log("performance")`)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and not shutil.which("chromedriver"):
        pytest.skip("chromium and chromium-driver are not installed (make setup installs them with apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def requested_urls(browser: Any) -> list[str]:
    """Every URL the page requested since the last call, from Chromium's network log."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


# --- mosquitto -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@contextmanager
def http_server(app: Any) -> Iterator[str]:
    """`app` (an ASGI app) served by uvicorn on a free local port in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Broker:
    port: int
    config_path: Path
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its sessions and queues to disk first."""
        if self.process is not None:
            stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def write_mosquitto_config(folder: Path, port: int) -> Path:
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence true",
             f"persistence_location {data}/", f"log_dest file {folder / 'mosquitto.log'}", "log_type all"]
    if os.geteuid() == 0:
        lines.append("user root")
    path = folder / "mosquitto.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    if not Path(MOSQUITTO).exists():
        pytest.skip(f"mosquitto not found at {MOSQUITTO}; install it (apt-get install mosquitto) or set MOSQUITTO")
    folder = tmp_path / "broker"
    port = free_port()
    broker = Broker(port, write_mosquitto_config(folder, port), folder / "mosquitto.log")
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


def stop_process(process: subprocess.Popen, timeout_s: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


# --- the bridge as a subprocess ------------------------------------------------------------------


@dataclass
class BridgeProcess:
    config_path: Path
    registry_path: Path
    prefix: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
        """Run `cloud-bridge <sub> --config ... args` and return the finished process."""
        sub, *rest = args
        return subprocess.run([str(VENV_BIN / "cloud-bridge"), sub, "--config", str(self.config_path), *rest],
                              capture_output=True, text=True, timeout=timeout_s)


def write_bridge_config(folder: Path, port: int, prefix: str, resend_s: float = 1.0, extra: str = "") -> Path:
    """A bridge config in `folder`; `extra` is appended as is (more TOML tables)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bridge.toml"
    path.write_text(
        f"""log_level = "debug"

[mqtt]
host = "127.0.0.1"
port = {port}
topic_prefix = "{prefix}"
client_id = "bridge-{prefix}"
keepalive = 10

[reconnect]
initial_s = 0.2
max_s = 1.0

[store]
path = "registry.db"

[dispatch]
resend_interval_s = {resend_s}
default_expiry_s = 60
{extra}"""
    )
    return path


def http_section(folder: Path, port: int, token: str) -> str:
    """The `[http]` table of a bridge serving its API on `port`, with `token` in a token file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "api-token").write_text(token + "\n")
    return f'\n[http]\nenabled = true\nport = {port}\ntoken_file = "api-token"\n'


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def launch_bridge(config: Path, log_path: Path) -> subprocess.Popen:
    """Start `cloud-bridge serve` and wait until it has connected (its log says so)."""
    connects_before = log_path.read_text().count("connected to") if log_path.exists() else 0
    with log_path.open("a") as log_file:
        process = subprocess.Popen([str(VENV_BIN / "cloud-bridge"), "serve", "--config", str(config)],
                                   stdout=log_file, stderr=subprocess.STDOUT)

    def connected() -> bool:
        return process.poll() is not None or log_path.read_text().count("connected to") > connects_before

    wait_until(connected, 10.0, "the bridge to connect")
    assert process.poll() is None, f"cloud-bridge serve exited early:\n{log_path.read_text()}"
    return process


@dataclass
class HttpBridge:
    """A running `cloud-bridge serve` with its HTTP server, and an API client carrying the token."""

    process: subprocess.Popen
    log_path: Path
    url: str
    token: str
    config_path: Path
    api: httpx.Client

    def stop(self) -> int | None:
        self.api.close()
        return stop_process(self.process)


def start_http_bridge(folder: Path, broker_port: int, prefix: str, *, name: str = "",
                      store_url: str | None = None, shared_group: str | None = None, extra: str = "",
                      http_port: int | None = None) -> HttpBridge:
    """Start a bridge serving its API on `http_port` (default a free port); optionally on PostgreSQL, in
    a shared group, with `extra` TOML tables."""
    token, http_port = secrets.token_urlsafe(24), http_port or free_port()
    extra = http_section(folder, http_port, token) + "\n[alerts]\ncheck_interval_s = 60\n" + extra
    config = write_bridge_config(folder, broker_port, prefix, extra=extra)
    text = config.read_text().replace(f'client_id = "bridge-{prefix}"', f'client_id = "bridge-{prefix}{name}"'
                                      + (f'\nshared_group = "{shared_group}"' if shared_group else ""))
    if store_url is not None:
        text = text.replace('path = "registry.db"', f'url = "{store_url}"')
    config.write_text(text)
    log_path = folder / "bridge.log"
    process = launch_bridge(config, log_path)
    url = f"http://127.0.0.1:{http_port}"
    wait_for_port(http_port)
    return HttpBridge(process, log_path, url, token, config,
                      httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120))


@pytest.fixture
def bridge(mosquitto: Broker, tmp_path: Path) -> Iterator[BridgeProcess]:
    folder = tmp_path / "bridge"
    prefix = "t" + os.urandom(3).hex()
    config = write_bridge_config(folder, mosquitto.port, prefix)
    log_path = folder / "bridge.log"
    log_path.touch()
    handle = BridgeProcess(config, folder / "registry.db", prefix, launch_bridge(config, log_path), log_path)
    try:
        yield handle
    finally:
        code = stop_process(handle.process)
        assert code == 0, f"cloud-bridge serve exited {code} on SIGTERM:\n{handle.log()}"
