"""The boundary fuzzer of the bridge end (issue #13): hypothesis builds device -> cloud messages from
the wire models (Reply, StreamChunk, Status, Telemetry, Event) with values at and past each field's
edges (ints at +-2^63 and 2^64, floats NaN/inf/1e999, text with NUL, lone surrogates or 70,000
characters, naive and absurd timestamps, wrong types, extra and missing fields, payloads that are
not JSON), publishes them to a real `cloud-bridge serve` (mosquitto, SQLite or PostgreSQL) and checks:

- every published message is stored or dead-lettered (the bridge's outcome counts add up to what
  was published; the dead letters are exactly the payloads published);
- the bridge never stops acknowledging: a ping sent through `cloud-bridge send` to a scripted device
  afterwards succeeds;
- no reconnect, no traceback in the bridge's log.

CI publishes 2,000 messages per backend; `-m slow` (or EDGE_AGENT_SLOW_TESTS=1) 10,000.
Figures go to $EDGE_AGENT_FAULT_REPORT as the fault suite's do (`bridge_poison`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import types
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from annotated_types import Ge, Le
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel

from autoglm_wire.protocol import (
    INT64_MAX,
    Event,
    Reply,
    Status,
    StreamChunk,
    Telemetry,
    format_ts,
    to_bytes,
    utc_now,
)
from autoglm_wire.topics import DeviceTopics
from cloud_bridge.config import load_config
from cloud_bridge.store.registry import Registry
from tests.faults.harness import report

from .conftest import BridgeProcess, launch_bridge, stop_process, wait_until, write_bridge_config
from .fake_device import FakeDevice

pytestmark = pytest.mark.integration

BATCH = 200
DEVICES = [f"fz-{i}" for i in range(4)]
RAW_1E999 = "__raw_1e999__"  # a JSON number Python reads as inf: written into the text after json.dumps
MODELS: dict[str, type[BaseModel]] = {
    "reply": Reply, "stream": StreamChunk, "status": Status, "telemetry": Telemetry, "event": Event,
}
NOW = format_ts(utc_now())
TIMES = ["2026-11-21T10:00:00", "2026-11-21T10:00:00+02:00", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
         "1969-12-31T23:59:59Z", "2200-01-01T00:00:00Z", "yesterday", "", NOW]
TEXTS = ["", "\x00", "a\x00b", "\ud800", "x\udfffy", "x" * 70_000, "é\u2028\U0001F600", "../../etc", "+/#"]
WRONG_TYPES = [None, [], {}, "1", 1.5, True, [1, 2], {"a": None}]
FLOATS = [math.nan, math.inf, -math.inf, RAW_1E999, 1e308, -0.0, 5e-324]
INTS = [0, -1, 1, INT64_MAX, INT64_MAX + 1, -(2**63), -(2**63) - 1, 2**64, 10**30]


def _valid(channel: str, device_id: str, n: int) -> dict[str, Any]:
    """A message of `channel` the bridge stores, as a device would send it."""
    common = {"v": 1, "device_id": device_id, "ts": NOW}
    if channel == "reply":
        return {**common, "command_id": f"job-{n}", "status": "accepted", "seq": n + 1, "metrics": {}}
    if channel == "stream":
        return {"v": 1, "command_id": f"job-{n}", "index": n, "delta": "hi", "done": False}
    if channel == "status":
        return {**common, "state": "online", "agent_version": "0.0-fuzz", "kinds": ["ping"], "groups": [],
                "model": {"name": "m", "sha256": "ab" * 32, "arch": "glm4", "quant": "Q4_0", "n_gpu_layers": 0}}
    if channel == "telemetry":
        return {**common, "queue_depth": 0, "outbox_depth": 0, "outbox_bytes": 0, "tokens_per_s_ewma": None,
                "rss_mb": 1.0, "gpu_layers": 0, "uptime_s": 1.0, "dropped": {}}
    return {**common, "level": "info", "code": "tick", "message": f"m{n}", "data": {}}


def _bounds(metadata: list[Any]) -> list[int]:
    """The values at and past an int field's Ge/Le constraints."""
    values = []
    for item in metadata:
        if isinstance(item, Ge):
            values += [item.ge, item.ge - 1]
        if isinstance(item, Le):
            values += [item.le, item.le + 1]
    return values


def edge_values(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    """Values at and past the edges of a field's type, and values of other types."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([edge_values(arg, []) for arg in typing.get_args(annotation) if arg is not type(None)])
    if origin is typing.Literal:
        return st.sampled_from([*typing.get_args(annotation), "bogus", 2])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return st.fixed_dictionaries({name: edge_values(f.annotation, f.metadata)
                                      for name, f in annotation.model_fields.items()}) | st.sampled_from(WRONG_TYPES)
    if annotation is bool:
        return st.sampled_from([True, False, 0, 1, "true", None])
    if annotation is int:
        return st.sampled_from(INTS + _bounds(metadata)) | st.integers()
    if annotation is float:
        return st.sampled_from(FLOATS) | st.floats()
    if annotation is str:
        return st.sampled_from(TEXTS + TIMES) | st.text(max_size=30)
    if origin in (dict, list):
        return st.sampled_from([{}, [], {"n": math.nan}, {"k": "\x00"}, {"big": 2**64}, {"tokens_per_s": "fast"},
                                {"tokens_per_s": 10**400}, {"a": {"b": [RAW_1E999]}}, ["\ud800"], {"": None}])
    return st.sampled_from(WRONG_TYPES)


def _dumps(obj: Any, ascii_only: bool) -> bytes:
    text = json.dumps(obj, allow_nan=True, ensure_ascii=ascii_only).replace(f'"{RAW_1E999}"', "1e999")
    return text.encode("utf-8", "surrogatepass")  # ensure_ascii=False: a lone surrogate becomes invalid UTF-8


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(channel, device id, payload): a device -> cloud message with at most a few things wrong."""
    channel = draw(st.sampled_from(sorted(MODELS)))
    device_id = draw(st.sampled_from(DEVICES))
    obj = _valid(channel, device_id, draw(st.integers(0, 10**6)))
    fields = MODELS[channel].model_fields
    mutation = draw(st.sampled_from(["none", "fields", "fields", "fields", "extra", "drop", "device", "raw"]))
    if mutation == "fields":
        for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True)):
            obj[name] = draw(edge_values(fields[name].annotation, fields[name].metadata))
    elif mutation == "extra":
        obj[draw(st.sampled_from(["extra", "__proto__", "v2", "\x00", "\ud800"]))] = draw(edge_values(Any, []))
    elif mutation == "drop":
        obj.pop(draw(st.sampled_from(sorted(obj))))
    elif mutation == "device":
        obj["device_id"] = draw(st.sampled_from([d for d in DEVICES if d != device_id] + ["", "a/b", "x" * 65]))
    elif mutation == "raw":
        return channel, device_id, draw(st.sampled_from([b"", b"null", b"[]", b"{", b"\xff\xfe{}", b"1e999",
                                                         b"NaN", b"[" * 100_000, b'{"a": 1, "a": 2}'])
                                        | st.binary(max_size=64))
    return channel, device_id, _dumps(obj, draw(st.booleans()))


def _topic(prefix: str, channel: str, device_id: str, payload: bytes) -> str:
    topics = DeviceTopics(prefix, device_id)
    if channel != "stream":
        return getattr(topics, channel)
    try:
        command_id = json.loads(payload).get("command_id")
        return topics.stream(command_id)
    except (ValueError, AttributeError, TypeError, RecursionError):
        return topics.stream("job-0")


class Publisher:
    """One paho client publishing at QoS 1 and waiting for every PUBACK."""

    def __init__(self, port: int) -> None:
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="fuzzer",
                                   protocol=mqtt.MQTTv5)
        self._client.max_inflight_messages_set(100)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        self.sent: list[tuple[str, bytes]] = []
        self._infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes) -> None:
        self._infos.append(self._client.publish(topic, payload, qos=1))
        self.sent.append((topic, payload))

    def close(self) -> None:
        for info in self._infos:
            info.wait_for_publish(60)
        self._client.disconnect()
        self._client.loop_stop()


def _outcomes(log: str) -> Counter[str]:
    found = re.search(r"stopped \((.*)\)", log)
    assert found, "the bridge did not log its outcome counts"
    return Counter({k: int(v) for k, v in (item.split("=") for item in found.group(1).split(", "))})


def _fuzz(backend: str, batches: int, mosquitto, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    folder = tmp_path / "bridge"
    prefix = "z" + os.urandom(3).hex()
    config = write_bridge_config(folder, mosquitto.port, prefix)
    if backend == "postgresql":
        url = request.getfixturevalue("scratch_pg_url")
        config.write_text(config.read_text().replace('path = "registry.db"', f'url = "{url}"'))
    log_path = folder / "bridge.log"
    bridge = BridgeProcess(config, folder / "registry.db", prefix, launch_bridge(config, log_path), log_path)
    publisher = Publisher(mosquitto.port)
    started = time.monotonic()

    registry = Registry.from_config(load_config(config).store, create=False)
    markers: list[str] = []

    def caught_up() -> None:
        """Publish a marker event and wait until it is stored: the bridge has dealt with all before it
        (and the broker never drops what its queue for the bridge cannot hold)."""
        marker = Event(device_id=DEVICES[0], ts=NOW, level="info", code="fuzz_marker", message=f"marker {len(markers)}")
        markers.append(marker.message)
        publisher.publish(DeviceTopics(prefix, DEVICES[0]).event, to_bytes(marker))
        wait_until(lambda: any(e.code == marker.code and e.message == marker.message
                               for e in registry.events.recent(DEVICES[0], 5)), 120,
                   f"the bridge to store {len(publisher.sent)} messages")

    @settings(max_examples=batches, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(messages(), min_size=BATCH, max_size=BATCH))
    def publish_batch(batch: list[tuple[str, str, bytes]]) -> None:
        for channel, device_id, payload in batch:
            publisher.publish(_topic(prefix, channel, device_id, payload), payload)
        caught_up()

    device = None
    try:
        publish_batch()
        publisher.close()
        cases = len(publisher.sent) - len(markers)
        device = FakeDevice(mosquitto.port, prefix, "fz-ping").start()
        ping = bridge.cli("send", "fz-ping", "ping", "--timeout", "30")
        assert ping.returncode == 0, f"{ping.stdout}\n{ping.stderr}\n{log_path.read_text()[-3000:]}"
        device.stop()
        device = None
        dead = registry.dead_letters.recent(limit=10 * cases)
        counters = registry.counters.all()
    finally:
        if device is not None:
            device.stop()
        registry.close()
        code = stop_process(bridge.process)
    log = log_path.read_text()
    outcomes = _outcomes(log)
    published = len(publisher.sent) + 1 + 3  # + the fake device's status and its replies to the ping (3)
    figures = {"backend": backend, "cases": cases, "dead_letters": len(dead), "outcomes": dict(outcomes),
               "reconnects": log.count("connected to") - 1, "seconds": round(time.monotonic() - started, 1)}
    report("bridge_poison", **figures)
    print(figures)
    assert code == 0 and "Traceback" not in log, log[-5000:]
    assert figures["reconnects"] == 0
    assert outcomes["lost"] == 0 and sum(outcomes.values()) == published, (outcomes, published)
    cleared = sum(1 for topic, payload in publisher.sent if topic.endswith("/status") and not payload)
    assert outcomes["ignored"] == cleared, "only a cleared retained status is ignored"
    assert outcomes["dead_lettered"] == len(dead) == counters.get("dead_letters", 0)
    assert Counter((d.topic, d.payload) for d in dead) <= Counter(publisher.sent)
    assert outcomes["dead_lettered"] > cases // 4 and outcomes["stored"] > cases // 10, "a fuzzer that tests both ends"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_thousand_boundary_messages_are_each_stored_or_dead_lettered_and_the_bridge_keeps_serving(
        backend, mosquitto, tmp_path, request):
    _fuzz(backend, 10, mosquitto, tmp_path, request)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_ten_thousand_boundary_messages_are_each_stored_or_dead_lettered_and_the_bridge_keeps_serving(
        backend, mosquitto, tmp_path, request):
    _fuzz(backend, 50, mosquitto, tmp_path, request)
