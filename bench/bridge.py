"""Throughput of the cloud bridge against a raw paho baseline, on a private mosquitto.

  (a) ingest: N replies (QoS 1, 10 devices) are queued in the broker for a consumer's persistent
      session while it is away; time from its (re)connect until it has stored all of them, so the
      publisher's speed does not enter the figure:
        raw     a paho subscriber that only counts (auto-ack, same session settings)
        sqlite  `BridgeService` storing into a SQLite registry (WAL, synchronous=FULL, batched commits)
        pg      the same into PostgreSQL (when --pg-url or the local server is reachable)
      The figure is each store's rate as a fraction of the raw rate.
  (b) dispatch: M commands queued in the registry for 100 simulated devices (one paho client
      subscribed to `P/+/cmd` that counts them); time from the bridge's start until all arrived.
  (c) replicas (with --replicas K, PostgreSQL): N replies of 1,000 devices published while 1, then
      K `cloud-bridge serve` processes share the subscription (`mqtt.shared_group`); replies/s from
      the first publish until all are stored, and K replicas as a multiple of one.

  python bench/bridge.py                                    # 5000 replies, 2000 commands
  python bench/bridge.py --replies 20000 --commands 5000 --pg-url postgresql://postgres@127.0.0.1/postgres
  python bench/bridge.py --replies 10000 --broker-inflight 1000   # the broker's window to the consumer
  python bench/bridge.py --replies 20000 --broker-inflight 1000 --replicas 2   # and 2 replicas vs 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoglm_wire.mqtt_session import disable_nagle  # noqa: E402
from autoglm_wire.protocol import Reply, Status, format_ts, to_bytes, utc_now  # noqa: E402
from cloud_bridge.commands import CommandRequest, queue_command  # noqa: E402
from cloud_bridge.config import BridgeConfig  # noqa: E402
from cloud_bridge.service import BridgeService  # noqa: E402
from cloud_bridge.store.registry import Registry  # noqa: E402
from tests.support.broker import Broker  # noqa: E402

DEVICES = 10
TARGETS = 100
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


def _client(port: int, name: str) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(20)
    client.on_socket_open = disable_nagle
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    return client


def _payloads(n: int, devices: int = DEVICES) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        device, seq = f"gw-{i % devices:04d}", i // devices + 1
        reply = Reply(command_id=f"job-{seq}", device_id=device, status="succeeded", seq=seq, ts=format_ts(utc_now()),
                      output={"text": "x" * 64}, metrics={"tokens_per_s": 10.0})
        out.append((device, to_bytes(reply)))
    return out


def _publish_all(port: int, prefix: str, payloads: list[tuple[str, bytes]]) -> float:
    client = _client(port, f"bench-pub-{os.urandom(3).hex()}")
    start = time.monotonic()
    infos = [client.publish(f"{prefix}/{device}/reply", body, qos=1) for device, body in payloads]
    infos[-1].wait_for_publish(120)
    client.loop_stop()
    client.disconnect()
    return start


def _wait(done: Callable[[], bool], timeout_s: float = 600) -> float:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the consumer did not get everything in time")
        time.sleep(0.005)
    return time.monotonic()


def _raw_subscriber(port: int, prefix: str, count: list[int]) -> mqtt.Client:
    """A persistent-session subscriber to `P/+/reply` that only counts; returns once subscribed."""
    ready = threading.Event()
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{prefix}",
                      protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: count.__setitem__(0, count[0] + 1)
    sub.on_subscribe = lambda *a: ready.set()
    sub.on_connect = lambda c, u, f, r, p: c.subscribe(f"{prefix}/+/reply", qos=1)
    sub.on_socket_open = disable_nagle
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    sub.connect("127.0.0.1", port, clean_start=False, properties=props)
    sub.loop_start()
    ready.wait(10)
    return sub


def raw_ingest(port: int, n: int) -> float:
    prefix, count = "raw" + os.urandom(2).hex(), [0]
    first = _raw_subscriber(port, prefix, count)
    first.disconnect()
    first.loop_stop()
    _publish_all(port, prefix, _payloads(n))
    start = time.monotonic()
    sub = _raw_subscriber(port, prefix, count)
    end = _wait(lambda: count[0] >= n)
    sub.loop_stop()
    sub.disconnect()
    return n / (end - start)


def _config(port: int, prefix: str, store: dict) -> BridgeConfig:
    return BridgeConfig.model_validate({"mqtt": {"port": port, "topic_prefix": prefix,
                                                 "client_id": f"bench-{prefix}"}, "store": store,
                                        "alerts": {"check_interval_s": 3600}})


def _running(config: BridgeConfig, registry: Registry,
             settle_s: float = 0.5) -> tuple[threading.Event, threading.Thread, BridgeService]:
    stop = threading.Event()
    service = BridgeService(config, registry)
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    service.wait_connected(10)
    time.sleep(settle_s)  # SUBACK
    return stop, thread, service


def bridge_ingest(port: int, n: int, store: dict, registry: Registry) -> float:
    prefix = "br" + os.urandom(2).hex()
    config = _config(port, prefix, store)
    stop, thread, _ = _running(config, registry)  # creates the bridge's persistent session
    stop.set()
    thread.join(30)
    _publish_all(port, prefix, _payloads(n))
    start = time.monotonic()
    stop, thread, service = _running(config, registry, settle_s=0)
    try:
        # the bridge's own count of replies stored (committed, then acknowledged), read from memory as
        # the raw counter's is: a count(*) query every poll would take the registry from the ingest
        end = _wait(lambda: service.stats.received.get("stored", 0) >= n)
    finally:
        stop.set()
        thread.join(30)
    stored = registry.replies.count()
    if stored != n:
        raise RuntimeError(f"the bridge counted {n} replies stored but the registry holds {stored}")
    return n / (end - start)


def dispatch(port: int, m: int, folder: Path) -> float:
    prefix = "dp" + os.urandom(2).hex()
    registry = Registry.open(folder / "dispatch.db")
    for i in range(TARGETS):
        registry.devices.record_status(Status(device_id=f"dev-{i:03d}", state="online", ts=format_ts(utc_now())))
    with registry.transaction():
        for i in range(m):
            queue_command(registry, CommandRequest(target=f"dev-{i % TARGETS:03d}", kind="ping"))
    count, ready = [0], threading.Event()
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-devices",
                      protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, msg: count.__setitem__(0, count[0] + 1)
    sub.on_subscribe = lambda *a: ready.set()
    sub.on_socket_open = disable_nagle
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe(f"{prefix}/+/cmd", qos=1)
    ready.wait(10)
    config = _config(port, prefix, {"path": str(folder / "dispatch.db")})
    start = time.monotonic()
    stop, thread, _ = _running(config, registry)
    try:
        end = _wait(lambda: count[0] >= m)
    finally:
        stop.set()
        thread.join(30)
        sub.loop_stop()
        sub.disconnect()
        registry.close()
    return m / (end - start)


def replica_ingest(port: int, n: int, admin_url: str, replicas: int, folder: Path) -> float | None:
    """(c): replies/s stored by `replicas` bridge processes sharing the subscription, into a scratch
    PostgreSQL database (None if unreachable)."""
    from bench.fleet import _start_bridges

    scratch = pg_scratch_database(admin_url)
    if scratch is None:
        return None
    url, drop = scratch
    folder.mkdir(exist_ok=True)
    prefix = "rp" + os.urandom(2).hex()
    registry = Registry.connect(url)
    procs = _start_bridges(folder, port, prefix, url, replicas, None)
    try:
        time.sleep(4.0)  # connected and subscribed (a shared subscription drops what precedes it)
        if any(proc.poll() is not None for proc in procs):
            raise RuntimeError(f"a bridge replica exited; see {folder}/bridge-*.log")
        start = _publish_all(port, prefix, _payloads(n, devices=1000))
        end = _wait(lambda: registry.replies.count() >= n)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        registry.close()
        drop()
    return n / (end - start)


def pg_scratch_database(admin_url: str) -> tuple[str, Callable[[], None]] | None:
    """A scratch database made with `admin_url` (its URL, and how to drop it); None if unreachable."""
    try:
        import psycopg

        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure just skips the PostgreSQL run
        print(f"PostgreSQL skipped: {exc}")
        return None
    name = f"autoglm_bench_{os.urandom(4).hex()}"
    admin.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()

    return admin_url.rsplit("/", 1)[0] + f"/{name}", drop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=int, default=5000)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--broker-inflight", type=int, default=20,
                        help="mosquitto max_inflight_messages (20, its default): the bridge acknowledges after its "
                             "commit, so this window over the commit time bounds its ingest")
    parser.add_argument("--pg-url", default=PG_DEFAULT, help="an admin URL; a scratch database is made and dropped")
    parser.add_argument("--replicas", type=int, default=0, help="also (c): this many replicas against one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        broker = Broker(folder / "broker")
        with broker.config.open("a") as config:  # the broker -> consumer window (mosquitto's default is 20)
            config.write(f"max_inflight_messages {args.broker_inflight}\n")
        broker.start()
        try:
            raw = raw_ingest(broker.port, args.replies)
            print(f"ingest  raw paho counter   {raw:9.0f} replies/s")
            sqlite = Registry.open(folder / "ingest.db")
            rate = bridge_ingest(broker.port, args.replies, {"path": str(folder / "ingest.db")}, sqlite)
            sqlite.close()
            print(f"ingest  bridge -> SQLite   {rate:9.0f} replies/s  ({rate / raw:.2f} x raw)")
            pg = pg_scratch_database(args.pg_url)
            if pg is not None:
                url, drop = pg
                try:
                    registry = Registry.connect(url)
                    rate = bridge_ingest(broker.port, args.replies, {"url": url}, registry)
                    registry.close()
                    print(f"ingest  bridge -> Postgres {rate:9.0f} replies/s  ({rate / raw:.2f} x raw)")
                finally:
                    drop()
            rate = dispatch(broker.port, args.commands, folder)
            print(f"dispatch {args.commands} commands to {TARGETS} devices: {rate:9.0f} commands/s")
            if args.replicas:
                one = replica_ingest(broker.port, args.replies, args.pg_url, 1, folder / "one")
                many = replica_ingest(broker.port, args.replies, args.pg_url, args.replicas, folder / "many")
                if one is not None and many is not None:
                    print(f"ingest  Postgres, 1 replica  {one:9.0f} replies/s (published while it runs)")
                    print(f"ingest  Postgres, {args.replicas} replicas {many:9.0f} replies/s  ({many / one:.2f} x one)")
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
