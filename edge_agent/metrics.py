"""The agent's own numbers, one snapshot for both outlets: Telemetry (published every
`telemetry_interval_s`, always) and the Prometheus text of `GET /metrics` on the local HTTP
listener (`[http]`, edge_agent/local_api.py).

`Agent.numbers()` gathers a `Numbers` from the parts that own them (inbox, outbox, link, store file,
executor); this module only shapes them. The Prometheus collector reads a fresh snapshot at each
scrape, so the two outlets never disagree and nothing is counted twice in process. Labels are
bounded: `kind` (the protocol's command kinds) and `state` (the lifecycle's states), `what` (the
drop counters' names).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Numbers:
    """What the agent reports about itself at one instant."""

    device_id: str
    agent_version: str
    model: str
    queue_depth: int  # commands accepted, waiting for a worker
    outbox_rows: int
    outbox_bytes: int
    reconnects: int  # connections to the broker after the first, since the agent started
    connect_failures: int  # failed connection attempts and too-short sessions, since start
    store_bytes: int  # the SQLite file with its WAL
    model_load_s: float | None  # how long the last model load took
    tokens_per_s_ewma: float | None  # decode speed, exponentially weighted over generations
    rss_bytes: int
    uptime_s: float
    broker_connected: bool
    commands: dict[str, dict[str, int]] = field(default_factory=dict)  # the ledger: kind -> state -> count
    dropped: dict[str, int] = field(default_factory=dict)


def store_bytes(path: str) -> int:
    """Size on disk of the SQLite file at `path` and its `-wal` and `-shm` companions."""
    total = 0
    for name in (path, path + "-wal", path + "-shm"):
        try:
            total += os.stat(name).st_size
        except OSError:
            continue
    return total


class NumbersCollector(Collector):
    """`/metrics`: every field of a fresh `Numbers` as a Prometheus family (names in docs/operations.md)."""

    def __init__(self, numbers: Callable[[], Numbers]) -> None:
        self._numbers = numbers

    def collect(self) -> Iterator[Metric]:
        n = self._numbers()
        info = GaugeMetricFamily("autoglm_agent_info", "the agent: device id, version and model in force",
                                 labels=["device_id", "agent_version", "model"])
        info.add_metric([n.device_id, n.agent_version, n.model], 1)
        yield info
        gauges = (
            ("autoglm_agent_queue_depth", "commands accepted and waiting for a worker", n.queue_depth),
            ("autoglm_agent_outbox_rows", "messages waiting in the outbox for the broker", n.outbox_rows),
            ("autoglm_agent_outbox_bytes", "payload bytes waiting in the outbox", n.outbox_bytes),
            ("autoglm_agent_store_bytes", "size of the SQLite store with its WAL", n.store_bytes),
            ("autoglm_agent_resident_memory_bytes", "resident memory of the agent process", n.rss_bytes),
            ("autoglm_agent_uptime_seconds", "time since the agent started", n.uptime_s),
            ("autoglm_agent_broker_connected", "1 while connected to the MQTT broker", int(n.broker_connected)),
        )
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(name, help_text, value=value)
        if n.model_load_s is not None:
            yield GaugeMetricFamily("autoglm_agent_model_load_seconds", "how long the last model load took",
                                    value=n.model_load_s)
        if n.tokens_per_s_ewma is not None:
            yield GaugeMetricFamily("autoglm_agent_decode_tokens_per_second",
                                    "decode speed, exponentially weighted over recent generations",
                                    value=n.tokens_per_s_ewma)
        yield CounterMetricFamily("autoglm_agent_reconnects", "connections to the broker after the first",
                                  value=n.reconnects)
        yield CounterMetricFamily("autoglm_agent_connect_failures",
                                  "failed connection attempts and sessions that ended too soon",
                                  value=n.connect_failures)
        commands = GaugeMetricFamily("autoglm_agent_commands",
                                     "commands in the ledger (kept store.ledger_days) by kind and state",
                                     labels=["kind", "state"])
        for kind, states in sorted(n.commands.items()):
            for state, count in sorted(states.items()):
                commands.add_metric([kind, state], count)
        yield commands
        dropped = CounterMetricFamily("autoglm_agent_dropped", "what the outbox caps and a full disk cost",
                                      labels=["what"])
        for what, count in sorted(n.dropped.items()):
            dropped.add_metric([what], count)
        yield dropped


def exposition(numbers: Callable[[], Numbers]) -> Callable[[], bytes]:
    """A function answering `/metrics`: the Prometheus text of a fresh snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NumbersCollector(numbers))
    return lambda: generate_latest(registry)
