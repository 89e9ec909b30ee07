"""A tiny paho client that plays an edge device for the bridge's integration tests."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from autoglm_wire.protocol import (
    Event,
    ModelInfo,
    ModelRef,
    Reply,
    Status,
    StreamChunk,
    format_ts,
    to_bytes,
    utc_now,
)
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


def model_agent(outcome: str = "activate") -> Behaviour:
    """A device speaking the issue #14 contract for `model` commands (docs/protocol.md, "Model deployment").

    deploy: accepted, running, then the download from the command's url in two Range requests (the
    second resumes where the first stopped), a `model_progress` Event per phase, the sha256 and size
    checked; then by `outcome`: "activate" (succeeded, activated; its Status names the new model,
    the previous one and the rollout) or "canary_fail" (failed model_error rolled_back). A download
    that fails (an HTTP error) or does not match the hash gives download_failed. rollback: back to
    the previous slot.
    Other kinds: answer_succeeded.
    """

    def behaviour(device: FakeDevice, command: dict[str, Any]) -> None:
        if command["kind"] != "model":
            answer_succeeded(device, command)
            return
        if command["id"] in device.handled:  # a resend: a device runs a command once
            return
        device.handled.add(command["id"])
        params = command["params"]
        device.reply(command["id"], "accepted")
        device.reply(command["id"], "running")
        if params["action"] == "rollback":
            device.previous, device.active = device.active, device.previous
            device.rollout = params.get("rollout")
            device.publish_status()
            device.reply(command["id"], "succeeded", output={
                "action": "rollback", "result": "activated", "active": device.active, "previous": device.previous,
                "canary": None, "rollout": params.get("rollout")})
            return
        rollout = params.get("rollout")
        try:
            body = device.download(params["url"], params["size"], command["id"], params["name"], rollout)
        except OSError as exc:
            body, reason = b"", f"HTTP error: {exc}"
        else:
            reason = "sha256 mismatch"
        if hashlib.sha256(body).hexdigest() != params["sha256"] or len(body) != params["size"]:
            error = {"code": "model_error", "message": f"download_failed: {reason}"}
            device.reply(command["id"], "failed", error=error, output={
                "action": "deploy", "result": "download_failed", "reason": reason,
                "active": device.active, "rollout": rollout})
            return
        device.progress(command["id"], params["name"], "canary", len(body), len(body), rollout)
        canary = {"passed": outcome != "canary_fail", "results": [], "tokens_per_s": 40.0,
                  "baseline_tokens_per_s": 42.0}
        if outcome == "canary_fail":
            device.reply(command["id"], "failed", error={"code": "model_error", "message": "rolled_back: canary"},
                         output={"action": "deploy", "result": "rolled_back", "reason": "canary prompt 1 failed",
                                 "active": device.active, "canary": canary, "rollout": rollout})
            return
        device.previous, device.active = device.active, {"name": params["name"], "sha256": params["sha256"]}
        device.rollout = rollout
        device.publish_status()
        device.reply(command["id"], "succeeded", output={
            "action": "deploy", "result": "activated", "active": device.active, "previous": device.previous,
            "canary": canary, "rollout": rollout})

    return behaviour


class FakeDevice:
    def __init__(self, port: int, prefix: str, device_id: str, behaviour: Behaviour = answer_succeeded) -> None:
        self.active: dict[str, str] = {"name": "fake-glm", "sha256": "cd" * 32}
        self.previous: dict[str, str] | None = None
        self.rollout: str | None = None
        self.downloads: list[int] = []  # the HTTP status of each download request
        self.groups: list[str] = []
        self.handled: set[str] = set()  # ids of the model commands run
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

    def download(self, url: str, size: int, command_id: str, name: str, rollout: str | None) -> bytes:
        """GET the url in two parts: bytes 0..size/2-1, then a Range request for the rest (a resume)."""
        half = max(1, size // 2)
        parts = []
        for first, last in ((0, half - 1), (half, size - 1)):
            if first > last:
                continue
            request = urllib.request.Request(url, headers={"Range": f"bytes={first}-{last}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                self.downloads.append(response.status)
                parts.append(response.read())
            done = sum(len(p) for p in parts)
            self.progress(command_id, name, "download", done, size, rollout)
        return b"".join(parts)

    def progress(self, command_id: str, name: str, phase: str, done: int, total: int, rollout: str | None) -> None:
        data = {"command_id": command_id, "name": name, "phase": phase, "bytes": done, "total": total,
                "percent": round(100.0 * done / total, 1) if total else 0.0, "bytes_per_s": 1000.0, "rollout": rollout}
        event = Event(device_id=self.device_id, ts=format_ts(utc_now()), level="info", code="model_progress",
                      message=f"{phase} {name}", data=data)
        self.publish(self.topics.event, to_bytes(event))

    def publish_status(self) -> None:
        self.publish(self.topics.status, to_bytes(self._online()), retain=True)

    def go_offline(self) -> None:
        """What the broker's last will would publish, without waiting for it."""
        self.publish(self.topics.status, to_bytes(Status(device_id=self.device_id, state="offline")), retain=True)

    def _online(self) -> Status:
        model = ModelInfo(name=self.active["name"], sha256=self.active["sha256"], arch="glm4", quant="Q4_0",
                          n_gpu_layers=0)
        return Status(device_id=self.device_id, state="online", ts=format_ts(utc_now()), agent_version="0.0-test",
                      model=model, kinds=["ping", "chat", "complete", "cancel", "model"], groups=self.groups,
                      previous_model=ModelRef(**self.previous) if self.previous else None, rollout=self.rollout)

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        client.subscribe(self.topics.cmd, qos=1)

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        self.publish_status()
        self._ready.set()

    def _on_message(self, client, userdata, message) -> None:
        command = json.loads(message.payload)
        self.received.append(command)
        self.behaviour(self, command)
