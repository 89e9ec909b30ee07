"""A fleet of simulated devices speaking protocol v1, for measuring the bridge at fleet scale.

Each simulated device (`SimDevice`, pure: it only says what to publish) announces itself with a
retained `online` status (its last will is the retained `offline` status), sends telemetry every
`telemetry_s`, answers every command with `accepted`, `running` and a terminal reply (`succeeded`
for ping/chat/complete, `rejected` with `unknown_kind` otherwise), each reply with its own `seq`,
and now and then drops its connection and comes back. `Fleet` runs them on real MQTT connections,
all driven by one thread (paho's external loop: one socket, no thread, per connection):

- `connections` = number of devices: one MQTT connection per device, each with its own last will
  (the broker publishes the `offline` status when a connection drops);
- fewer connections: the devices are spread over them (multiplexed); a dropped connection then
  stands for its devices' wills, which the simulator publishes itself.

`run_scenario` is the measurement: a broker, `cloud-bridge serve` (one or more replicas, as
processes), the fleet, and commands queued at a steady rate through the registry; it reports
dispatch-to-reply latency (the bridge's send to the terminal reply, both bridge timestamps),
the bridge processes' CPU and the broker's connection count.

  python bench/fleet.py --devices 5000 --connections 5000 --duration 60                  # SQLite, 1 replica
  python bench/fleet.py --devices 20000 --connections 40 --replicas 2 --pg-url postgresql://postgres@127.0.0.1/postgres
  python bench/fleet.py --devices 20000 --api-only                   # GET /api/devices?limit=100 P95
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoglm_wire.errors import ErrorCode  # noqa: E402
from autoglm_wire.protocol import ModelInfo, Reply, Status, Telemetry, format_ts, to_bytes, utc_now  # noqa: E402
from autoglm_wire.topics import DeviceTopics  # noqa: E402

ANSWERED_KINDS = ("ping", "chat", "complete")
TOKEN = "fleet-bench-token"  # the bridge's API token in the measurement
MODEL = ModelInfo(name="sim-glm", sha256="5e" * 32, arch="glm4", quant="Q4_0", n_gpu_layers=0)


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass
class SimDevice:
    """One device's protocol v1 behaviour, without MQTT: what it publishes, and when."""

    prefix: str
    device_id: str
    groups: tuple[str, ...] = ()
    seq: int = 0
    commands: int = 0
    started: float = field(default_factory=time.monotonic)
    topics: DeviceTopics = field(init=False)

    def __post_init__(self) -> None:
        self.topics = DeviceTopics(self.prefix, self.device_id)

    def online(self) -> Publish:
        status = Status(device_id=self.device_id, state="online", ts=format_ts(utc_now()), agent_version="sim",
                        model=MODEL, kinds=list(ANSWERED_KINDS), groups=list(self.groups))
        return Publish(self.topics.status, to_bytes(status), retain=True)

    def will(self) -> Publish:
        """The last will: what the broker publishes when the device's connection drops."""
        return Publish(self.topics.status, to_bytes(Status(device_id=self.device_id, state="offline")), retain=True)

    def telemetry(self) -> Publish:
        telemetry = Telemetry(device_id=self.device_id, ts=format_ts(utc_now()), queue_depth=0, outbox_depth=0,
                              outbox_bytes=0, tokens_per_s_ewma=12.5, rss_mb=512.0, gpu_layers=0,
                              uptime_s=round(time.monotonic() - self.started, 1))
        return Publish(self.topics.telemetry, to_bytes(telemetry))

    def answer(self, payload: bytes) -> list[Publish]:
        """The replies to one delivered command: accepted, running, and its terminal reply (or a
        rejection for a kind it does not run); nothing for a payload that is not a command."""
        try:
            command = json.loads(payload)
            command_id, kind = command["id"], command["kind"]
        except (ValueError, KeyError, TypeError):
            return []
        self.commands += 1
        if kind not in ANSWERED_KINDS:
            return [self._reply(command_id, "rejected",
                                error={"code": ErrorCode.UNKNOWN_KIND.value, "message": f"sim runs no {kind!r}"})]
        output: dict[str, Any] = {"pong": True} if kind == "ping" else {"text": "ok", "finish_reason": "stop"}
        return [self._reply(command_id, "accepted"), self._reply(command_id, "running"),
                self._reply(command_id, "succeeded", output=output, metrics={"tokens_per_s": 12.5})]

    def _reply(self, command_id: str, status: str, **fields: Any) -> Publish:
        self.seq += 1
        reply = Reply(command_id=command_id, device_id=self.device_id, status=status, seq=self.seq,
                      ts=format_ts(utc_now()), **fields)
        return Publish(self.topics.reply, to_bytes(reply))


@dataclass(eq=False)
class _Connection:
    client: mqtt.Client
    devices: list[SimDevice]
    connected: bool = False
    down_until: float = 0.0  # a simulated drop: reconnect after this (monotonic)
    fd: int | None = None  # the socket registered with the selector


class Fleet:
    """`devices` simulated devices on `connections` MQTT connections, driven by one thread."""

    def __init__(self, port: int, prefix: str, devices: int, connections: int | None = None,
                 telemetry_s: float = 10.0, drop_every_s: float | None = None, drop_for_s: float = 3.0,
                 groups: Callable[[int], tuple[str, ...]] = lambda i: (f"g{i % 10}",), name: str = "sim") -> None:
        self.port = port
        self.telemetry_s = telemetry_s
        self.drop_every_s = drop_every_s
        self.drop_for_s = drop_for_s
        self.devices = [SimDevice(prefix, f"{name}-{i:05d}", groups(i)) for i in range(devices)]
        n = min(connections or devices, devices)
        self.per_device = n == devices
        self._connections = [self._connection(f"{name}-c{k:05d}", self.devices[k::n]) for k in range(n)]
        self._by_topic = {d.topics.cmd: (d, c) for c in self._connections for d in c.devices}
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writable: set[_Connection] = set()  # connections with packets to write
        self._asked_drops: SimpleQueue[int] = SimpleQueue()  # connections to drop, asked from other threads
        self.drops = 0
        self.errors: list[str] = []

    def _connection(self, client_id: str, devices: list[SimDevice]) -> _Connection:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        connection = _Connection(client, devices)
        if len(devices) == 1:
            will = devices[0].will()
            client.will_set(will.topic, will.payload, qos=1, retain=True)
        client.on_connect = lambda c, u, f, reason, p: self._on_connect(connection, reason)
        client.on_message = lambda c, u, message: self._on_message(message)
        client.on_disconnect = lambda c, u, f, reason, p: self._forget(connection)
        # paho then queues outgoing packets instead of writing them from wherever publish() is called;
        # the loop writes the connections that asked (no sweep over thousands of idle ones)
        client.on_socket_register_write = lambda c, u, sock: self._writable.add(connection)
        client.on_socket_unregister_write = lambda c, u, sock: self._writable.discard(connection)
        return connection

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> Fleet:
        """Connect every connection (all devices online, subscribed) and start the loop thread."""
        for connection in self._connections:
            self._open(connection)
        self._thread = threading.Thread(target=self._loop, name="fleet", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not all(c.connected for c in self._connections):
            if time.monotonic() > deadline:
                up = sum(c.connected for c in self._connections)
                raise TimeoutError(f"only {up} of {len(self._connections)} fleet connections came up")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for connection in self._connections:
            self._close(connection, with_will=False)

    def drop(self, k: int) -> list[str]:
        """Drop connection `k` soon (from the loop thread); returns the ids of the devices on it."""
        self._asked_drops.put(k)
        return [d.device_id for d in self._connections[k].devices]

    def _open(self, connection: _Connection) -> None:
        try:
            connection.client.connect("127.0.0.1", self.port, keepalive=60)
        except OSError as exc:
            self.errors.append(f"connect: {exc}")
            connection.down_until = time.monotonic() + self.drop_for_s
            return
        connection.fd = connection.client.socket().fileno()
        self._selector.register(connection.fd, selectors.EVENT_READ, connection)

    def _close(self, connection: _Connection, with_will: bool) -> None:
        """DISCONNECT (paho closes the socket once it is sent); `with_will`: reason code 0x04, so
        the broker publishes the last will as for a lost connection."""
        if connection.client.socket() is None:
            return
        reason = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message") if with_will else None
        connection.client.disconnect(reasoncode=reason)
        connection.client.loop_write()
        self._forget(connection)

    def _forget(self, connection: _Connection) -> None:
        if connection.fd is not None:
            self._selector.unregister(connection.fd)
            connection.fd = None
        connection.connected = False

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        next_misc = next_drop = time.monotonic() + 1.0
        if self.drop_every_s:
            next_drop = time.monotonic() + self.drop_every_s
        telemetry_at = {id(d): time.monotonic() + random.uniform(0, self.telemetry_s) for d in self.devices}
        due = deque(sorted(self.devices, key=lambda d: telemetry_at[id(d)]))
        owner = {id(d): c for c in self._connections for d in c.devices}
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.02):
                if key.data.fd is not None:
                    key.data.client.loop_read(100)
            now = time.monotonic()
            while due and telemetry_at[id(due[0])] <= now:  # devices come due in a fixed rotation
                device = due.popleft()
                telemetry_at[id(device)] = now + self.telemetry_s
                due.append(device)
                if owner[id(device)].connected:
                    self._send(owner[id(device)], device.telemetry())
            for connection in list(self._writable):
                if connection.client.socket() is None:
                    self._writable.discard(connection)
                else:
                    connection.client.loop_write()
            if now >= next_misc:
                next_misc = now + 1.0
                self._misc(now)
            if self.drop_every_s and now >= next_drop:
                next_drop = now + self.drop_every_s
                self._drop(random.choice(self._connections), now)
            while not self._asked_drops.empty():
                self._drop(self._connections[self._asked_drops.get()], now)

    def _misc(self, now: float) -> None:
        for connection in self._connections:
            if connection.client.socket() is not None:
                connection.client.loop_misc()
            elif now >= connection.down_until:
                self._open(connection)

    def _drop(self, connection: _Connection, now: float) -> None:
        if not connection.connected:
            return
        self.drops += 1
        if not self.per_device:  # several devices on this connection: their wills go out on another one
            other = next((c for c in self._connections if c.connected and c is not connection), None)
            for device in connection.devices if other is not None else ():
                self._send(other, device.will())
        self._close(connection, with_will=self.per_device)
        connection.down_until = now + self.drop_for_s

    def _on_connect(self, connection: _Connection, reason: Any) -> None:
        if reason.is_failure:
            self.errors.append(f"refused: {reason}")
            return
        topics = [(d.topics.cmd, 1) for d in connection.devices]
        for start in range(0, len(topics), 100):
            connection.client.subscribe(topics[start:start + 100])
        for device in connection.devices:
            self._send(connection, device.online())
        connection.connected = True

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        found = self._by_topic.get(message.topic)
        if found is None:
            return
        device, connection = found
        for publish in device.answer(message.payload):
            self._send(connection, publish)

    @staticmethod
    def _send(connection: _Connection, publish: Publish) -> None:
        connection.client.publish(publish.topic, publish.payload, qos=publish.qos, retain=publish.retain)


# --- the measurement ---------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _bridge_config(folder: Path, port: int, prefix: str, store: str, replica: int, http_port: int | None) -> Path:
    lines = ['log_level = "warning"', "[mqtt]", f"port = {port}", f'topic_prefix = "{prefix}"',
             f'client_id = "fleet-bridge-{replica}"']
    if store.startswith("postgres"):
        lines.append('shared_group = "bridges"')
        lines += ["[store]", f'url = "{store}"']
    else:
        lines += ["[store]", f'path = "{store}"']
    lines += ["[dispatch]", "resend_interval_s = 30"]
    if http_port is not None and replica == 0:
        (folder / "token").write_text(TOKEN + "\n")
        lines += ["[http]", "enabled = true", f"port = {http_port}", f'token_file = "{folder / "token"}"']
    path = folder / f"bridge-{replica}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _start_bridges(folder: Path, port: int, prefix: str, store: str, replicas: int,
                   http_port: int | None) -> list[subprocess.Popen[bytes]]:
    exe = Path(sys.executable).parent / "cloud-bridge"
    procs = []
    for replica in range(replicas):
        config = _bridge_config(folder, port, prefix, store, replica, http_port)
        log = open(folder / f"bridge-{replica}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([str(exe), "serve", "--config", str(config)], stdout=log, stderr=log))
    return procs


def _queue_commands(http_port: int, token: str, targets: list[str], rate: float, stop: threading.Event,
                    queued: list[int]) -> None:
    """Queue `rate` ping commands per second, round robin over `targets`: every 100 ms, one
    `POST /api/commands` whose filter names the devices due (the bridge queues one row per device,
    in its own process, as an operator's tool would)."""
    import httpx

    i, start = 0, time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", headers={"Authorization": f"Bearer {token}"},
                      timeout=60) as http:
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate) - queued[0]
            if due > 0:
                names = [targets[(i + k) % len(targets)] for k in range(due)]
                i += due
                http.post("/api/commands", json={"filter": {"device_ids": names}, "kind": "ping"}).raise_for_status()
                queued[0] += due
            stop.wait(0.1)


def _latencies(registry: Any, since: str) -> tuple[list[float], int, int]:
    """Dispatch-to-reply seconds of the commands queued since `since` that ended, and how many of
    them did not end (still pending or sent) or never got sent."""
    rows = registry._connection.query(
        "SELECT state, last_sent_at, updated_at FROM commands WHERE created_at >= ?", (since,))
    from datetime import datetime

    done, open_ = [], 0
    for row in rows:
        if row["state"] in ("succeeded", "failed", "rejected") and row["last_sent_at"]:
            sent = datetime.fromisoformat(row["last_sent_at"])
            done.append((datetime.fromisoformat(row["updated_at"]) - sent).total_seconds())
        else:
            open_ += 1
    return done, open_, len(rows)


def api_p95(port: int, token: str, n: int = 200) -> tuple[float, float]:
    """P50 and P95 milliseconds of GET /api/devices?limit=100 (random offsets)."""
    import httpx

    times = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}) as http:
        total = int(http.get("/api/devices", params={"limit": 1}).headers["X-Total-Count"])
        for _ in range(n):
            start = time.perf_counter()
            response = http.get("/api/devices", params={"limit": 100, "offset": random.randrange(max(1, total))})
            response.raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return _percentile(times, 50), _percentile(times, 95)


def _wait_registered(registry: Any, n: int, timeout_s: float) -> float:
    from cloud_bridge.store.devices import DeviceQuery

    start = time.monotonic()
    while registry.devices.page(DeviceQuery(state="online", limit=1))[1] < n:
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"fewer than {n} devices registered online after {timeout_s:g} s")
        time.sleep(0.5)
    return time.monotonic() - start


def _nothing() -> None:
    """No scratch database to drop (SQLite: the temporary folder goes)."""


def run_scenario(args: argparse.Namespace) -> int:
    from bench.bridge import pg_scratch_database
    from cloud_bridge.store.registry import Registry
    from tests.support.broker import Broker, free_port

    fd_limit = _raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        broker = Broker(folder / "broker")
        with broker.config.open("a") as config:  # the broker -> bridge window (mosquitto's default is 20)
            config.write(f"max_inflight_messages {args.broker_inflight}\n")
        broker.start()
        scratch = pg_scratch_database(args.pg_url) if args.pg_url else None
        if args.pg_url and scratch is None:
            return 1
        store, cleanup = scratch or (str(folder / "registry.db"), _nothing)
        prefix = "fleet"
        http_port = free_port()
        bridges: list[subprocess.Popen[bytes]] = []
        fleet: Fleet | None = None
        try:
            registry = Registry.connect(store) if args.pg_url else Registry.open(Path(store))
            bridges = _start_bridges(folder, broker.port, prefix, store, args.replicas, http_port)
            time.sleep(2.0)
            start = time.monotonic()
            fleet = Fleet(broker.port, prefix, args.devices, args.connections, telemetry_s=args.telemetry_s,
                          drop_every_s=args.drop_every_s).start(timeout_s=600)
            print(f"fleet   {args.devices} devices on {len(fleet._connections)} MQTT connections up in "
                  f"{time.monotonic() - start:.1f} s (fd limit {fd_limit})")
            waited = _wait_registered(registry, args.devices, 600)
            print(f"bridge  all {args.devices} devices registered online {waited:.1f} s later")
            if args.api_only:
                p50, p95 = api_p95(http_port, TOKEN)
                print(f"api     GET /api/devices?limit=100 with {args.devices} devices: P50 {p50:.1f} ms, "
                      f"P95 {p95:.1f} ms")
                return 0
            since = format_ts(utc_now())
            targets = [d.device_id for d in fleet.devices]
            stop, queued = threading.Event(), [0]
            cpu0, own0 = [_cpu_s(p.pid) for p in bridges], _cpu_s(os.getpid())
            t0 = time.monotonic()
            pacer = threading.Thread(target=_queue_commands, daemon=True,
                                     args=(http_port, TOKEN, targets, args.devices / args.command_s, stop, queued))
            pacer.start()
            time.sleep(args.duration)
            stop.set()
            pacer.join(30)
            elapsed = time.monotonic() - t0
            cpu = [(_cpu_s(p.pid) - c) / elapsed for p, c in zip(bridges, cpu0, strict=True)]
            drain = time.monotonic() + 30
            while time.monotonic() < drain and _latencies(registry, since)[1]:
                time.sleep(1)
            done, open_, total = _latencies(registry, since)
            p50, p95, p99 = (_percentile(done, p) for p in (50, 95, 99))
            print(f"load    {args.duration:g} s: telemetry every {args.telemetry_s:g} s and one command every "
                  f"{args.command_s:g} s per device ({args.devices / args.telemetry_s:.0f} telemetry/s, "
                  f"{args.devices / args.command_s:.0f} commands/s, {3 * args.devices / args.command_s:.0f} replies/s)")
            print(f"latency dispatch -> terminal reply over {len(done)} of {total} commands: P50 {p50 * 1000:.0f} ms, "
                  f"P95 {p95 * 1000:.0f} ms, P99 {p99 * 1000:.0f} ms; {open_} unfinished 30 s after the load")
            print("cpu     bridge " + ", ".join(f"replica {i}: {c * 100:.0f}% of a core" for i, c in enumerate(cpu))
                  + f"; simulator (and API client) {(_cpu_s(os.getpid()) - own0) / elapsed * 100:.0f}%; "
                  f"fleet drops {fleet.drops}; fleet errors {len(fleet.errors)}")
            p50, p95 = api_p95(http_port, TOKEN, n=100)
            print(f"api     GET /api/devices?limit=100 under load: P50 {p50:.1f} ms, P95 {p95:.1f} ms")
            registry.close()
        except BaseException:
            for replica in range(len(bridges)):
                print(f"--- bridge {replica} log (tail) ---\n"
                      + "\n".join((folder / f"bridge-{replica}.log").read_text(errors="replace").splitlines()[-20:]))
            raise
        finally:
            if fleet is not None:
                fleet.stop()
            for proc in bridges:
                proc.terminate()
            for proc in bridges:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.stop()
            cleanup()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=None,
                        help="MQTT connections (default: one per device, each with its last will)")
    parser.add_argument("--telemetry-s", type=float, default=10.0)
    parser.add_argument("--command-s", type=float, default=10.0, help="one command per device every this")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--drop-every-s", type=float, default=5.0, help="drop one connection this often")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--pg-url", default=None, help="an admin URL: a scratch database is made and dropped "
                                                       "(default: SQLite)")
    parser.add_argument("--broker-inflight", type=int, default=1000,
                        help="mosquitto max_inflight_messages: unacknowledged QoS 1 messages per client; the bridge "
                             "acknowledges after its commit, so this window over the commit time bounds its ingest")
    parser.add_argument("--api-only", action="store_true", help="register the fleet, then time GET /api/devices")
    return run_scenario(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
