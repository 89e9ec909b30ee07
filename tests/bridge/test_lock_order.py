"""Ingest and dispatch lock command rows in one order (id order): two bridge replicas on one
PostgreSQL never deadlock each other (issue #13).

The dispatch pass holds its transaction open while it publishes (a publisher that waits for the
test), ingest stores a batch answering the same two commands in the opposite order on another
connection; before the fix each held one row the other needed, and PostgreSQL killed one of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psycopg

from autoglm_wire.protocol import to_bytes
from cloud_bridge.config import BridgeConfig
from cloud_bridge.ingest import Inbound, Ingestor
from cloud_bridge.service import Dispatch
from cloud_bridge.store.registry import Registry

from .conftest import empty_pg_registry, wait_until
from .factories import T0, at, command, reply


@dataclass
class GatedPublisher:
    """Publishes nothing until `go` is set; `publishing` tells that a publish is waiting."""

    connected: bool = True
    publishing: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)
    sent: list[str] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, qos: int, expiry_s: int | None = None) -> int | None:
        self.publishing.set()
        assert self.go.wait(20), "the test never let the publish go"
        self.sent.append(topic)
        return len(self.sent)


def _waiting_on_a_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND datname = current_database()").fetchone()[0] > 0


def test_ingest_and_dispatch_on_two_connections_do_not_deadlock_on_command_rows(pg_url):
    dispatching = empty_pg_registry(pg_url)
    ingesting = Registry.connect(pg_url)
    errors: list[BaseException] = []

    def run(target, *args) -> threading.Thread:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as exc:  # reported by the test
                errors.append(exc)
        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        return thread

    try:
        dispatching.commands.add(command("a-low"), "dev-1", T0)  # dispatched last (lower priority), lower id
        dispatching.commands.add(command("b-high").model_copy(update={"priority": 10}), "dev-1", T0)
        publisher = GatedPublisher()
        config = BridgeConfig(mqtt={"topic_prefix": "P"}, dispatch={"resend_interval_s": 5})
        dispatch = run(Dispatch(dispatching, publisher, config).run_once, at(1))
        assert publisher.publishing.wait(10), "dispatch never published b-high"
        batch = [Inbound("P/dev-1/reply", to_bytes(reply(seq, "accepted", cid))) for seq, cid in
                 ((1, "a-low"), (2, "b-high"))]
        ingest = run(Ingestor(ingesting, "P").handle_batch, batch, at(2))
        wait_until(lambda: _waiting_on_a_lock(pg_url), 10, "ingest to wait for a row dispatch holds")
        publisher.go.set()
        for thread in (dispatch, ingest):
            thread.join(30)
        assert errors == []
        assert {dispatching.commands.get(cid).state for cid in ("a-low", "b-high")} == {"accepted"}
    finally:
        publisher.go.set()
        dispatching.close()
        ingesting.close()
