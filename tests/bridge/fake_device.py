"""A tiny paho client that plays an edge device for the bridge's integration tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from autoglm_wire.protocol import Event, ModelInfo, Reply, Status, StreamChunk, format_ts, to_bytes, utc_now
from autoglm_wire.topics import DeviceTopics

Behaviour = Callable[["FakeDevice", dict[str, Any]], None]


def answer_succeeded(device: FakeDevice, command: dict[str, Any]) -> None:
    """accepted, then succeeded, then the succeeded reply once more with the same seq (a redelivery)."""
    device.reply(command["id"], "accepted")
    output: dict[str, Any] = {"pong": True, "agent_version": "0.0-test", "model": "fake"}
    if command["kind"] in ("chat", "complete"):
        output = {"text": "Hello!", "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        if command["params"].get("stream"):
            for index, delta in enumerate(["Hel", "lo", "!"]):
                device.publish(device.topics.stream(command["id"]),
                               to_bytes(StreamChunk(command_id=command["id"], index=index, delta=delta)), qos=0)
    seq = device.reply(command["id"], "succeeded", output=output, metrics={"tokens_per_s": 42.0, "ttft_ms": 5.0})
    device.reply(command["id"], "succeeded", output=output, seq=seq)


def stay_silent(device: FakeDevice, command: dict[str, Any]) -> None:
    """Never answer: the bridge must keep resending."""


class FakeDevice:
    def __init__(self, port: int, prefix: str, device_id: str, behaviour: Behaviour = answer_succeeded) -> None:
        self.port = port
        self.topics = DeviceTopics(prefix, device_id)
        self.device_id = device_id
        self.behaviour = behaviour
        self.received: list[dict[str, Any]] = []
        self._seq = 0
        self._ready = threading.Event()
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"fake-{device_id}",
                                   protocol=mqtt.MQTTv5)
        self._client.will_set(self.topics.status, to_bytes(Status(device_id=device_id, state="offline")),
                              qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self, timeout_s: float = 10.0) -> FakeDevice:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        self._client.connect("127.0.0.1", self.port, keepalive=10, clean_start=False, properties=props)
        self._client.loop_start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"fake device {self.device_id} did not get its subscription granted")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=qos, retain=retain)

    def reply(self, command_id: str | None, status: str, output: dict | None = None, error: dict | None = None,
              metrics: dict | None = None, seq: int | None = None) -> int:
        if seq is None:
            self._seq += 1
            seq = self._seq
        reply = Reply(command_id=command_id, device_id=self.device_id, status=status, seq=seq,
                      ts=format_ts(utc_now()), output=output, error=error, metrics=metrics or {})
        self.publish(self.topics.reply, to_bytes(reply))
        return seq

    def event(self, code: str, message: str) -> None:
        event = Event(device_id=self.device_id, ts=format_ts(utc_now()), level="warning", code=code, message=message)
        self.publish(self.topics.event, to_bytes(event))

    def go_offline(self) -> None:
        """What the broker's last will would publish, without waiting for it."""
        self.publish(self.topics.status, to_bytes(Status(device_id=self.device_id, state="offline")), retain=True)

    def _online(self) -> Status:
        model = ModelInfo(name="fake-glm", sha256="cd" * 32, arch="glm4", quant="Q4_0", n_gpu_layers=0)
        return Status(device_id=self.device_id, state="online", ts=format_ts(utc_now()), agent_version="0.0-test",
                      model=model, kinds=["ping", "chat", "complete", "cancel"], groups=[])

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        client.subscribe(self.topics.cmd, qos=1)

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        client.publish(self.topics.status, to_bytes(self._online()), qos=1, retain=True)
        self._ready.set()

    def _on_message(self, client, userdata, message) -> None:
        command = json.loads(message.payload)
        self.received.append(command)
        self.behaviour(self, command)
