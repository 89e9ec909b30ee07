"""Fixtures of the fault suite: a private broker per test, a chaos proxy, a cloud client, and agents
that can be killed at chosen points. Long variants are marked `slow` and skipped unless asked for
(`pytest -m slow tests/faults` or EDGE_AGENT_SLOW_TESTS=1)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.chaos import ChaosProxy
from tests.faults.harness import FaultyAgent, Rig, slow_enabled
from tests.support.broker import Broker
from tests.support.cloud import CloudClient


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if slow_enabled(config):
        return
    skip = pytest.mark.skip(reason="long variant: run with -m slow or EDGE_AGENT_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords and "faults" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def fault_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker for this test alone: stop it with SIGTERM or SIGKILL, restart it on the same port."""
    broker = Broker(tmp_path / "broker").start()
    yield broker
    if broker.running:
        broker.stop()


@pytest.fixture
def proxy(fault_broker: Broker) -> Iterator[ChaosProxy]:
    chaos = ChaosProxy(fault_broker.port).start()
    yield chaos
    chaos.close()


RigFactory = Callable[..., Rig]


@pytest.fixture
def make_rig(tmp_path: Path, tiny_model: Path, fault_broker: Broker, proxy: ChaosProxy) -> Iterator[RigFactory]:
    """make_rig(fault_point=None, start=True, store=None, **env) -> an agent behind the proxy (started
    and online unless start=False) and a cloud client. `env` adds EDGE_AGENT_* overrides."""
    made: list[Rig] = []

    def make(fault_point: str | None = None, start: bool = True, store: Path | None = None, **env: str) -> Rig:
        cloud = CloudClient(fault_broker.port, client_id=f"cloud-{uuid.uuid4().hex[:8]}")
        agent = FaultyAgent(tmp_path, tiny_model, proxy.port, env=env, store=store)
        rig = Rig(fault_broker, proxy, cloud, agent)
        made.append(rig)
        if start:
            agent.start(fault_point)
            cloud.wait_online(agent.device_id)
        return rig

    yield make
    for rig in made:
        rig.agent.stop_quietly()
        rig.cloud.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only; skipped otherwise) that a test can fill and free."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)
