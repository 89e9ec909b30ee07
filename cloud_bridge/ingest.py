"""Device -> cloud messages into the registry: topic routing, payload validation, dead letters. No MQTT here.

Every message is stored or dead-lettered; either way the caller acknowledges it:

- A message on a topic under the prefix that is not a device -> cloud topic, or whose payload does
  not validate against its protocol model, or that names another device (or command) than its
  topic, is dead-lettered (`registry.dead_letters`, in the batch's own commit): redelivering it
  would not make it valid.
- A batch is stored in one commit, with one statement per table for its replies (and one per round
  of command state advances), chunks, events and telemetry (`store.connection.Connection.rowset`),
  so one row the database refuses fails the whole statement. When the commit fails for a cause
  that retrying cannot cure (a value the database refuses, a bug), the batch is split in halves
  and each half stored on its own, down to the one message at fault, which is dead-lettered with
  the error: its neighbours are stored (a 256-message batch with one bad row takes about 16
  commits, not 256), and no single message stalls the fleet's ingest.
- A transient failure (connection lost, lock timeout, disk full: `Registry.is_transient`) raises
  RegistryUnavailable with nothing written; the caller retries the batch later, unacknowledged.

Only two messages are ignored: one on a topic outside the prefix (never subscribed), and an empty
payload on a status topic (someone cleared the retained status).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

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
from cloud_bridge.errors import BridgeError
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import wire_ts

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MODEL_PROGRESS = "model_progress"  # the Event code of a `model` deploy's progress (docs/protocol.md)

MODELS: dict[str, type[BaseModel]] = {
    "status": Status, "reply": Reply, "event": Event, "telemetry": Telemetry, "stream": StreamChunk,
}


@dataclass(frozen=True)
class Inbound:
    """One message from the broker, stripped of paho types."""

    topic: str
    payload: bytes
    retained: bool = False


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"  # a topic outside the prefix, or a cleared retained status
    DEAD_LETTERED = "dead_lettered"  # kept in `dead_letters`, not stored
    LOST = "lost"  # could not even be dead-lettered (logged with the error); never expected


class BadPayload(ValueError):
    """A payload that does not follow protocol v1; the message says what is wrong."""


class RegistryUnavailable(BridgeError):
    """The registry failed for a cause that may pass (see Registry.is_transient); nothing was written."""


@dataclass(frozen=True)
class Valid:
    """A message that follows protocol v1: its topic taken apart and its payload as a model."""

    message: Inbound
    topic: CloudTopic
    payload: Any  # the model of the topic's channel (MODELS)


@dataclass(frozen=True)
class Invalid:
    """A message to dead-letter, and why."""

    message: Inbound
    device_id: str | None
    error: str


Parsed = Valid | Invalid | None  # None: ignored


def _decode(model: type[BaseModel], payload: bytes) -> Any:
    try:
        return model.model_validate(decode_json_object(payload, MAX_PAYLOAD_BYTES))
    except ProtocolError as exc:
        raise BadPayload(str(exc)) from exc
    except ValidationError as exc:
        raise BadPayload(f"not a valid {model.__name__}: {describe_validation_error(exc, limit=3)}") from exc


def _check(topic: CloudTopic, payload: Any) -> None:
    """The payload agrees with its topic (and a status's `ts` is a time), or BadPayload."""
    if isinstance(payload, StreamChunk):
        if payload.command_id != topic.command_id:
            raise BadPayload(f"chunk names command {payload.command_id!r} but was published on "
                             f"{topic.command_id!r}'s topic")
        return
    if payload.device_id != topic.device_id:
        raise BadPayload(f"payload names device {payload.device_id!r} but was published on "
                         f"{topic.device_id!r}'s topic")
    if isinstance(payload, Status) and payload.ts is not None:
        try:
            wire_ts(payload.ts)
        except ValueError as exc:
            raise BadPayload(f"status ts {payload.ts[:40]!r} is not a time with an offset in the years "
                             "protocol v1 accepts") from exc


class Ingestor:
    """Validates device messages and writes them, or their dead letters, to the registry."""

    def __init__(self, registry: Registry, prefix: str) -> None:
        self._registry = registry
        self._prefix = prefix
        # per channel but status: store the batch's messages in order; for each, stored (or a duplicate)
        self._channels: dict[str, Callable[[list[Valid], datetime], list[bool]]] = {
            "reply": self._replies,
            "event": self._events,
            "telemetry": self._telemetry,
            "stream": self._chunks,
        }

    def handle(self, message: Inbound, now: datetime) -> Outcome:
        """Store or dead-letter one message (see handle_batch)."""
        return self.handle_batch([message], now)[0]

    def handle_batch(self, messages: list[Inbound], now: datetime) -> list[Outcome]:
        """Store or dead-letter several messages, in one commit unless one of them makes it fail.

        Raises RegistryUnavailable on a transient failure: then nothing of the batch was written.
        """
        return self._store(messages, [self._parse(m) for m in messages], now)

    def _store(self, messages: list[Inbound], parsed: list[Parsed], now: datetime) -> list[Outcome]:
        """Commit the parsed batch; when that fails for a cause retrying cannot cure, store it in
        halves (each message is parsed only once, however often its batch is split)."""
        try:
            return self._commit(parsed, now)
        except Exception as exc:
            if self._registry.is_transient(exc):
                raise self._unavailable(exc) from exc
            if len(messages) == 1:
                return [self._dead_letter_alone(messages[0], exc, now)]
            half = len(messages) // 2
            log.info("a batch of %d messages could not be stored (%s: %s); storing it in halves",
                     len(messages), type(exc).__name__, exc)
            return (self._store(messages[:half], parsed[:half], now)
                    + self._store(messages[half:], parsed[half:], now))

    def _parse(self, message: Inbound) -> Parsed:
        if not message.topic.startswith(self._prefix + "/"):
            log.debug("ignoring a message on %s: outside the topic prefix", message.topic)
            return None
        topic = parse_cloud_topic(self._prefix, message.topic)
        if topic is None:
            return Invalid(message, None, "not a device -> cloud topic of protocol v1")
        if topic.channel == "status" and not message.payload:
            return None  # someone cleared the retained status
        try:
            payload = _decode(MODELS[topic.channel], message.payload)
            _check(topic, payload)
        except BadPayload as exc:
            return Invalid(message, topic.device_id, str(exc))
        return Valid(message, topic, payload)

    def _commit(self, parsed: list[Parsed], now: datetime) -> list[Outcome]:
        """One transaction, one statement per table for the batch's replies, chunks, events and
        telemetry (each in arrival order; statuses and dead letters, rare, one by one). The devices
        are touched first, in id order, then the commands the replies answer are locked in id order:
        bridge replicas sharing one PostgreSQL (and the dispatch loop) take row locks in the same
        order and never deadlock each other."""
        valid = [p for p in parsed if isinstance(p, Valid)]
        devices = sorted({p.topic.device_id for p in valid})
        seen = {p.topic.device_id for p in valid if p.topic.channel != "status"}  # a status may be a replay or a will
        by_channel: dict[str, list[int]] = {}
        for i, p in enumerate(parsed):
            if isinstance(p, Valid):
                by_channel.setdefault(p.topic.channel, []).append(i)
        replies = by_channel.get("reply", [])
        answered = sorted({(parsed[i].payload.device_id, parsed[i].payload.command_id) for i in replies
                           if parsed[i].payload.command_id})
        outcomes = [Outcome.IGNORED] * len(parsed)
        with self._registry.transaction():
            self._registry.devices.touch(devices, seen, now)
            self._registry.commands.lock_answered(answered)
            for i, p in enumerate(parsed):
                if isinstance(p, Invalid):
                    outcomes[i] = self._dead_letter(p, now)
            for i in by_channel.get("status", []):
                outcomes[i] = self._status(parsed[i], now)
            for channel, indexes in by_channel.items():
                if channel != "status":
                    stored = self._channels[channel]([parsed[i] for i in indexes], now)
                    for i, new in zip(indexes, stored, strict=True):
                        outcomes[i] = Outcome.STORED if new else Outcome.DUPLICATE
        return outcomes

    def _dead_letter(self, invalid: Invalid, now: datetime) -> Outcome:
        log.warning("dead-lettered a message on %s: %s", invalid.message.topic, invalid.error)
        self._registry.dead_letters.record(invalid.message.topic, invalid.device_id, invalid.message.payload,
                                           invalid.error, now)
        return Outcome.DEAD_LETTERED

    def _dead_letter_alone(self, message: Inbound, exc: Exception, now: datetime) -> Outcome:
        """Dead-letter a message whose storing failed for a cause retrying cannot cure."""
        topic = parse_cloud_topic(self._prefix, message.topic)
        device_id = None if topic is None else topic.device_id
        error = f"could not be stored: {type(exc).__name__}: {exc}".strip()
        log.warning("dead-lettered a message on %s: %s", message.topic, error)
        try:
            self._registry.dead_letters.record(message.topic, device_id, message.payload, error, now)
        except Exception as again:
            if self._registry.is_transient(again):
                raise self._unavailable(again) from again
            log.error("could not dead-letter a message on %s either (%s: %s); it is dropped", message.topic,
                      type(again).__name__, again)
            return Outcome.LOST
        return Outcome.DEAD_LETTERED

    def _unavailable(self, exc: Exception) -> RegistryUnavailable:
        return RegistryUnavailable(f"the registry {self._registry.path} is unavailable: "
                                   f"{type(exc).__name__}: {exc}".strip())

    # --- the valid messages of one channel -------------------------------------------------------------

    def _status(self, valid: Valid, now: datetime) -> Outcome:
        status: Status = valid.payload
        if self._registry.devices.record_status(status, now, retained=valid.message.retained):
            log.info("device %s is %s", status.device_id, status.state)
        return Outcome.STORED

    def _replies(self, valid: list[Valid], now: datetime) -> list[bool]:
        return self._registry.replies.record_many([v.payload for v in valid], now)

    def _events(self, valid: list[Valid], now: datetime) -> list[bool]:
        events: list[Event] = [v.payload for v in valid]
        stored = self._registry.events.record_many(events, now)
        for event, new in zip(events, stored, strict=True):
            if new and event.code == MODEL_PROGRESS:  # a rollout's per-device progress bar
                self._registry.rollouts.record_progress(event.device_id, event.data, now)
        return stored

    def _telemetry(self, valid: list[Valid], now: datetime) -> list[bool]:
        self._registry.devices.record_telemetries([v.payload for v in valid], now)
        return [True] * len(valid)

    def _chunks(self, valid: list[Valid], now: datetime) -> list[bool]:
        return self._registry.chunks.record_many([(v.topic.device_id, v.payload) for v in valid], now)
