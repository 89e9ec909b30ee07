"""Device -> cloud messages into the registry: topic routing and payload validation. No MQTT here.

Each channel (`status`, `reply`, `event`, `telemetry`, `stream`) has one handler in a table. A
payload that does not validate against its protocol model, or that names another device than its
topic, is logged and counted (`bad_payloads`) and never raises: the caller acknowledges it like any
other message, since redelivering it would not make it valid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from autoglm_wire.errors import ProtocolError
from autoglm_wire.protocol import (
    Event,
    Reply,
    Status,
    StreamChunk,
    Telemetry,
    decode_json_object,
    describe_validation_error,
)
from autoglm_wire.topics import CloudTopic, parse_cloud_topic
from cloud_bridge.store.registry import Registry

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Inbound:
    """One message from the broker, stripped of paho types."""

    topic: str
    payload: bytes
    retained: bool = False


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"  # not a device -> cloud topic, or a cleared retained status
    BAD = "bad"


class BadPayload(ValueError):
    """A payload that does not follow protocol v1; the message says what is wrong."""


def _decode(payload: bytes) -> dict:
    try:
        return decode_json_object(payload, MAX_PAYLOAD_BYTES)
    except ProtocolError as exc:
        raise BadPayload(str(exc)) from exc


def _parse(model: type[M], payload: bytes) -> M:
    try:
        return model.model_validate(_decode(payload))
    except ValidationError as exc:
        details = describe_validation_error(exc, limit=3)
        raise BadPayload(f"not a valid {model.__name__}: {details}") from exc


def _same_device(topic: CloudTopic, device_id: str) -> None:
    if device_id != topic.device_id:
        raise BadPayload(f"payload names device {device_id!r} but was published on {topic.device_id!r}'s topic")


class Ingestor:
    """Validates device messages and writes them to the registry."""

    def __init__(self, registry: Registry, prefix: str) -> None:
        self._registry = registry
        self._prefix = prefix
        self._handlers: dict[str, Callable[[CloudTopic, Inbound, datetime], Outcome]] = {
            "status": self._status,
            "reply": self._reply,
            "event": self._event,
            "telemetry": self._telemetry,
            "stream": self._stream,
        }

    def handle(self, message: Inbound, now: datetime) -> Outcome:
        """Store one message. Never raises for a bad payload (only for registry errors)."""
        topic = parse_cloud_topic(self._prefix, message.topic)
        if topic is None:
            log.debug("ignoring a message on %s: not a device -> cloud topic", message.topic)
            return Outcome.IGNORED
        try:
            return self._handlers[topic.channel](topic, message, now)
        except BadPayload as exc:
            log.warning("bad payload on %s: %s", message.topic, exc)
            self._registry.counters.bump("bad_payloads")
            return Outcome.BAD

    def handle_batch(self, messages: list[Inbound], now: datetime) -> list[Outcome]:
        """Store several messages in one commit; all or none are written.

        The batch's devices are touched first, in id order: bridge replicas sharing one PostgreSQL
        then take the device row locks in the same order and never deadlock each other.
        """
        topics = [t for t in (parse_cloud_topic(self._prefix, m.topic) for m in messages) if t is not None]
        devices = sorted({t.device_id for t in topics})
        seen = {t.device_id for t in topics if t.channel != "status"}  # a status may be a replay or a will
        with self._registry.transaction():
            self._registry.devices.touch(devices, seen, now)
            return [self.handle(message, now) for message in messages]

    def _status(self, topic: CloudTopic, message: Inbound, now: datetime) -> Outcome:
        if not message.payload:
            return Outcome.IGNORED  # someone cleared the retained status
        status = _parse(Status, message.payload)
        _same_device(topic, status.device_id)
        if self._registry.devices.record_status(status, now, retained=message.retained):
            log.info("device %s is %s", status.device_id, status.state)
        return Outcome.STORED

    def _reply(self, topic: CloudTopic, message: Inbound, now: datetime) -> Outcome:
        reply = _parse(Reply, message.payload)
        _same_device(topic, reply.device_id)
        if not self._registry.replies.record(reply, now):
            log.debug("duplicate reply %s/%d ignored", reply.device_id, reply.seq)
            return Outcome.DUPLICATE
        return Outcome.STORED

    def _event(self, topic: CloudTopic, message: Inbound, now: datetime) -> Outcome:
        event = _parse(Event, message.payload)
        _same_device(topic, event.device_id)
        self._registry.events.record(event, now)
        return Outcome.STORED

    def _telemetry(self, topic: CloudTopic, message: Inbound, now: datetime) -> Outcome:
        telemetry = _parse(Telemetry, message.payload)
        _same_device(topic, telemetry.device_id)
        self._registry.devices.record_telemetry(telemetry, now)
        return Outcome.STORED

    def _stream(self, topic: CloudTopic, message: Inbound, now: datetime) -> Outcome:
        chunk = _parse(StreamChunk, message.payload)
        if chunk.command_id != topic.command_id:
            raise BadPayload(
                f"chunk names command {chunk.command_id!r} but was published on {topic.command_id!r}'s topic"
            )
        if not self._registry.chunks.record(topic.device_id, chunk, now):
            return Outcome.DUPLICATE
        return Outcome.STORED
