"""A cloud-side MQTT test client: persistent session, collects every device -> cloud message."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from autoglm_wire.mqtt_session import disable_nagle


def command(kind: str, params: dict[str, Any] | None = None, command_id: str | None = None,
            **envelope: Any) -> dict[str, Any]:
    return {"v": 1, "id": command_id or uuid.uuid4().hex, "kind": kind, "params": params or {},
            "created_at": "2026-11-21T10:00:00Z", **envelope}


def chat(prompt: str, **params: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], **params}


class CloudClient:
    """Subscribes to `P/#` with a persistent session, so replies sent while it or the broker was
    away still arrive. Thread-safe accessors; `wait_for` polls a predicate."""

    def __init__(self, port: int, prefix: str = "autoglm", client_id: str | None = None) -> None:
        self.port = port
        self.prefix = prefix
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self.messages: list[tuple[str, dict[str, Any] | bytes]] = []
        # time.perf_counter() when each message (same index) reached the callback, decoded: when a
        # user's own on_message would hold it (benchmarks time the first text by it, not by a wake-up)
        self.arrived_at: list[float] = []
        self._per_kind: Counter[str] = Counter()  # messages by the topic's last level: cheap to wait on
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=client_id or f"test-cloud-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_socket_open = disable_nagle
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, keepalive=5, clean_start=False, properties=props)
        self.client.loop_start()
        self.wait_for(lambda: self.client.is_connected(), timeout=10, what="cloud client connected")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                    properties: object) -> None:
        client.subscribe(f"{self.prefix}/#", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        body: dict[str, Any] | bytes = message.payload
        if not message.topic.endswith("/cmd"):  # P/# includes the commands we send, fuzz included: not parsed
            try:
                body = json.loads(message.payload)
            except (ValueError, RecursionError):
                body = message.payload
        arrived = time.perf_counter()
        with self._arrived:
            self.messages.append((message.topic, body))
            self.arrived_at.append(arrived)
            self._per_kind[message.topic.rsplit("/", 1)[-1]] += 1
            self._arrived.notify_all()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def send(self, device: str, payload: dict[str, Any] | bytes, qos: int = 1,
             response_topic: str | None = None, correlation: bytes | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        props = None
        if response_topic:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        self.client.publish(f"{self.prefix}/{device}/cmd", data, qos=qos, properties=props)

    def first_arrival(self, suffix: str, holds: Callable[[dict[str, Any]], Any] = lambda body: True) -> float | None:
        """`arrived_at` of the first message on a topic ending in `suffix` whose body `holds`."""
        with self._lock:
            return next((at for (topic, body), at in zip(self.messages, self.arrived_at, strict=True)
                         if topic.endswith(suffix) and isinstance(body, dict) and holds(body)), None)

    def count(self, kind: str) -> int:
        """How many messages arrived on topics ending in `/kind` (O(1), unlike `on`)."""
        with self._lock:
            return self._per_kind[kind]

    def on(self, suffix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [b for t, b in self.messages if t.endswith(suffix) and isinstance(b, dict)]

    def replies(self, command_id: str | None = None) -> list[dict[str, Any]]:
        found = self.on("/reply")
        return found if command_id is None else [r for r in found if r.get("command_id") == command_id]

    def unique_replies(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Replies deduplicated by (device_id, seq), as the protocol asks the cloud to do."""
        return {(r["device_id"], r["seq"]): r for r in self.replies()}

    def terminal(self, command_id: str) -> list[dict[str, Any]]:
        unique = {r["seq"]: r for r in self.replies(command_id)
                  if r["status"] in {"succeeded", "failed", "rejected", "expired", "cancelled"}}
        return list(unique.values())

    def wait_terminal(self, command_id: str, timeout: float = 60.0) -> dict[str, Any]:
        self.wait_for(lambda: self.terminal(command_id), timeout, f"terminal reply for {command_id}")
        return self.terminal(command_id)[0]

    def wait_online(self, device: str, timeout: float = 60.0) -> dict[str, Any]:
        def online() -> bool:
            statuses = [b for t, b in self.messages if t == f"{self.prefix}/{device}/status" and isinstance(b, dict)]
            return bool(statuses) and statuses[-1].get("state") == "online"
        self.wait_for(online, timeout, f"{device} online")
        return [b for t, b in self.messages if t == f"{self.prefix}/{device}/status"][-1]  # type: ignore[return-value]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        """Re-check `predicate` whenever a message arrives (and every 50 ms) until it holds."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._arrived.wait(timeout=min(remaining, 0.05))
