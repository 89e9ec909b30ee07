"""Shared fixtures: the tiny GLM GGUF (built once), private mosquitto brokers, agent processes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess, write_agent_config
from tests.support.broker import Broker
from tests.support.cloud import CloudClient

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-glm4-q4_0.gguf"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny glm4 Q4_0 GGUF; built here if `make model` has not built it yet."""
    if not TINY_MODEL.exists():
        from models.build_gguf import build_model

        build_model(TINY_MODEL, preset="tiny", seed=0)
    return TINY_MODEL


@pytest.fixture(scope="session")
def session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("broker")).start()
    yield broker
    broker.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker for this test alone, so the test may stop and restart it."""
    broker = Broker(tmp_path / "broker").start()
    yield broker
    broker.stop()


AgentFactory = Callable[..., tuple[AgentProcess, str, Path]]


@pytest.fixture
def start_agent(tmp_path: Path, tiny_model: Path) -> Iterator[AgentFactory]:
    """Start `edge-agent run` subprocesses: returns (process, device_id, store path)."""
    started: list[AgentProcess] = []

    def start(broker: Broker, device_id: str | None = None, env: dict[str, str] | None = None,
              **extra: str) -> tuple[AgentProcess, str, Path]:
        device = device_id or f"gw-{uuid.uuid4().hex[:8]}"
        store = tmp_path / f"{device}.db"
        config = write_agent_config(tmp_path / f"{device}.toml", device, broker.port, tiny_model, store, **extra)
        agent = AgentProcess(config, tmp_path / f"{device}.log", env=env).start()
        started.append(agent)
        return agent, device, store

    yield start
    for agent in started:
        agent.stop_quietly()


@pytest.fixture
def cloud(session_broker: Broker) -> Iterator[CloudClient]:
    client = CloudClient(session_broker.port)
    yield client
    client.close()
