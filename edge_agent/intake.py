"""Intake: what happens to one delivered command, on the link's network thread, before its PUBACK.

`Intake.handle` reads top to bottom: size cap and parse, target, signature, response topic,
limits; a payload that fails any of them gets one `rejected` reply and a `command_rejected` Event.
Then the early start (an idle worker starts the command while this commit stores it), dedupe and
store (`Inbox.accept`: a known id is answered with its last reply and never run again; a full
outbox refuses new work with `busy`), and the hand-off to the executor. No inference here: it
returns once the command is stored, and the link syncs the file and sends the PUBACK.

The invariant: every delivered command gets exactly one terminal reply (or, at the outbox's cap,
a counted drop) and is acknowledged, whatever it holds. `handle` raises only StoreUnavailable (the
store cannot write now: disk full, I/O error), so the command stays unacknowledged and the broker
redelivers it. Any other exception becomes a `rejected` reply: `invalid_command` when it comes from
interpreting the payload (a ValueError, TypeError or OverflowError in the checks), `internal`
otherwise (a bug: logged once with the command id and the traceback; the device keeps serving).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from autoglm_wire import lifecycle
from autoglm_wire.errors import ErrorCode, Internal, InvalidCommand, ProtocolError, Unauthorized
from autoglm_wire.lifecycle import State
from autoglm_wire.local_origin import LOCAL_ID_PREFIX, is_local_id
from autoglm_wire.protocol import (
    ChatParams,
    CompleteParams,
    Event,
    ParsedCommand,
    Sampling,
    decode_json_object,
    format_ts,
    is_command_id,
    parse_command,
    utc_now,
)
from autoglm_wire.signing import CommandVerifier
from autoglm_wire.topics import DeviceTopics
from edge_agent.config import AgentConfig
from edge_agent.executor import IMMEDIATE_KINDS, EarlyStart, Executor
from edge_agent.inbox import Inbox
from edge_agent.link import InboundMessage
from edge_agent.outbox import Outbox, ReplyDraft
from edge_agent.sqlite_file import StoreUnavailable

log = logging.getLogger(__name__)

# What interpreting a payload raises when a value is out of what the code can take (pydantic's
# ValidationError is a ValueError): the payload is invalid, not the code.
INTERPRETING_ERRORS = (ValueError, TypeError, OverflowError)
# The most bytes of ResponseTopic (UTF-8) and of CorrelationData a command may carry: both are stored
# with it and sent back with each of its replies.
MAX_PROPERTY_BYTES = 256


def properties_size(message: InboundMessage) -> dict[str, int]:
    """Bytes of each MQTT property the device would store and echo."""
    return {"ResponseTopic": len((message.response_topic or "").encode("utf-8")),
            "CorrelationData": len(message.correlation_data or b"")}


def prompt_chars(params: object) -> int:
    """Characters of prompt text a command brings: the prompt, or every message and template variable."""
    if isinstance(params, CompleteParams):
        return len(params.prompt)
    if isinstance(params, ChatParams):
        return sum(len(m.content) for m in params.messages) + sum(len(v) for v in params.variables.values())
    return 0


@dataclass(frozen=True)
class Intake:
    """Turns each delivered message into a stored command (handed to the executor) or a rejection."""

    config: AgentConfig
    topics: DeviceTopics
    verifier: CommandVerifier
    inbox: Inbox
    outbox: Outbox
    executor: Executor
    on_stored: Callable[[], None]  # wakes the link's pump

    def handle(self, message: InboundMessage) -> None:
        """One delivered command, from its bytes to a stored command (or a stored rejection).
        Raises only StoreUnavailable: the command is then left unacknowledged."""
        try:
            self._take(message)
            return
        except StoreUnavailable:
            raise
        except ProtocolError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a bug must not stall the device: answered `internal`
            error = self._internal(exc, message)
        try:
            self._reject(error, message)
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - not even a rejection can be stored: acknowledge, logged
            log.exception("could not store the rejection of a payload on %s (command %s); acknowledging it "
                          "without a reply", message.topic, error.command_id)

    def _take(self, message: InboundMessage) -> None:
        """Check, store and hand over one command; raises the ProtocolError its rejection carries."""
        parsed, expires_at = self._checked(message)
        early = self._start_early(parsed, expires_at)
        try:
            accepted = self.inbox.accept(
                parsed.id, parsed.kind, message.payload.decode("utf-8"), parsed.command.priority, expires_at,
                message.response_topic, message.correlation_data, claim=early is not None,
            )
        except BaseException:
            if early is not None:
                early.drop()  # decided on every path: the worker waits for it
            raise  # Busy (the outbox is at its cap) is rejected by `handle`, like any ProtocolError
        if early is not None:
            if accepted.command is None:
                early.drop()
            else:
                early.stored(accepted.command)
        self.on_stored()
        if accepted.duplicate:
            log.info("duplicate delivery of command %s (state %s); re-sent its last reply", parsed.id, accepted.state)
            return
        assert accepted.command is not None
        if early is not None:
            return  # the worker is already running it
        if parsed.kind in IMMEDIATE_KINDS:
            self.executor.run_immediate(accepted.command, parsed)
        else:
            self.executor.submit(accepted.command, parsed)

    def _checked(self, message: InboundMessage) -> tuple[ParsedCommand, float | None]:
        """The parsed command and its expiry (epoch seconds), or the ProtocolError of its rejection;
        a value the checks cannot interpret is `invalid_command`."""
        try:
            parsed = parse_command(message.payload, self.config.mqtt.max_payload_bytes, self.executor.kinds)
            if is_local_id(parsed.id) and not message.local:
                raise InvalidCommand(f"command ids starting with {LOCAL_ID_PREFIX!r} are reserved for this device's "
                                     "local API (docs/protocol.md, Local commands); send it under another id",
                                     parsed.id)
            self._check_properties(message, parsed.id)
            self._check_target(parsed)
            self._check_signature(parsed, message)
            if not self._response_topic_allowed(message.response_topic):
                raise Unauthorized(f"ResponseTopic {message.response_topic!r} is outside this device's reply tree "
                                   f"({self.topics.reply}/...) and security.response_topic_prefixes", parsed.id)
            self._check_limits(parsed)
            return parsed, self._expires_at(parsed, message)
        except INTERPRETING_ERRORS as exc:
            raise InvalidCommand(f"the command holds a value this device cannot interpret: {exc}",
                                 self._command_id(message)) from exc

    def _expires_at(self, parsed: ParsedCommand, message: InboundMessage) -> float | None:
        """The earlier of the command's `expires_at` and the broker's message expiry, in epoch seconds."""
        expires_at = parsed.command.expires_at.timestamp() if parsed.command.expires_at else None
        if message.message_expiry_s is not None:
            by_broker = time.time() + message.message_expiry_s
            expires_at = by_broker if expires_at is None else min(expires_at, by_broker)
        return expires_at

    def _internal(self, exc: Exception, message: InboundMessage) -> Internal:
        """A bug met while taking a command: logged once, with the traceback; answered `internal`."""
        command_id = self._command_id(message)
        log.error("intake failed on command %s from %s; answering internal and serving on", command_id,
                  message.topic, exc_info=exc)
        return Internal(f"the device failed to take this command ({type(exc).__name__}); this is a bug in the "
                        "agent, reported in its log", command_id)

    def _command_id(self, message: InboundMessage) -> str | None:
        """The payload's command id when one can be read, for a reply to an error met after parsing."""
        try:
            command_id = decode_json_object(message.payload, self.config.mqtt.max_payload_bytes).get("id")
        except (ProtocolError, *INTERPRETING_ERRORS):
            return None
        return command_id if is_command_id(command_id) else None

    def _start_early(self, parsed: ParsedCommand, expires_at: float | None) -> EarlyStart | None:
        """An idle worker starts the command now, while the intake commit stores it already
        `running`: the generation does not wait for intake. Nothing of the run leaves the device
        before the commit (and the fsync before any publish); a command not stored is dropped by
        the worker. Not for a command that has expired (the worker answers `expired`), nor for a
        redelivery of a known id (a look-up by primary key: it spares the worker a doomed prompt
        evaluation)."""
        if lifecycle.start_decision(expires_at, time.time()) is State.EXPIRED or self.inbox.known(parsed.id):
            return None
        return self.executor.start_early(parsed)

    def _check_properties(self, message: InboundMessage, command_id: str) -> None:
        """The MQTT properties the device stores and echoes are at most MAX_PROPERTY_BYTES each."""
        for name, size in properties_size(message).items():
            if size > MAX_PROPERTY_BYTES:
                raise InvalidCommand(f"{name} is {size} bytes; this device accepts at most {MAX_PROPERTY_BYTES}",
                                     command_id)

    def _check_target(self, parsed: ParsedCommand) -> None:
        target = parsed.command.target
        allowed = {self.config.device_id} | {f"group/{g}" for g in self.config.mqtt.groups}
        if target is not None and target not in allowed:
            raise Unauthorized(f"command targets {target!r}, not this device ({self.config.device_id})", parsed.id)

    def _check_signature(self, parsed: ParsedCommand, message: InboundMessage) -> None:
        """With `[security]` keys: a trusted signature, this device as target, `created_at` in the window.
        A local API command is not signed: its caller proved itself with the API's bearer token, and
        only the local API can hand intake a message marked `local`."""
        if self.verifier.enabled and not message.local:
            key_id = self.verifier.check(json.loads(message.payload), parsed.command.created_at, utc_now())
            log.debug("command %s: signature key %s", parsed.id, key_id)

    def _response_topic_allowed(self, topic: str | None) -> bool:
        """A command may send its replies to `P/D/reply` or below it, or under a configured prefix."""
        if topic is None:
            return True
        if any(c in topic for c in "+#\0"):
            return False
        own = self.topics.reply
        return topic == own or topic.startswith(own + "/") or any(
            topic.startswith(prefix) for prefix in self.config.security.response_topic_prefixes)

    def _check_limits(self, parsed: ParsedCommand) -> None:
        """`[limits]`: prompt length and max_tokens; a command asking for more is rejected, not trimmed.
        A command leaving max_tokens out takes the policy's, which is clamped by the same limit."""
        limits, params = self.config.limits, parsed.params
        if (isinstance(params, Sampling) and "max_tokens" in params.model_fields_set
                and params.max_tokens > limits.max_tokens):
            raise InvalidCommand(f"max_tokens {params.max_tokens} is above this device's limit "
                                 f"{limits.max_tokens} (limits.max_tokens)", parsed.id)
        chars = prompt_chars(params)
        if chars > limits.max_prompt_chars:
            raise InvalidCommand(f"the prompt is {chars} characters; this device accepts at most "
                                 f"{limits.max_prompt_chars} (limits.max_prompt_chars)", parsed.id)

    def _reject(self, exc: ProtocolError, message: InboundMessage) -> None:
        """One `rejected` reply and Event. A payload reusing the id of a command already in the ledger
        (one this device accepted) is answered with `command_id` null: an unverified payload never
        speaks for the accepted command's record. The payload's ResponseTopic and CorrelationData are
        used only when they are within bounds, the payload was not `unauthorized` and its id is new;
        otherwise the rejection goes to `P/D/reply` alone, without CorrelationData."""
        log.warning("rejected a payload on %s: %s: %s", message.topic, exc.code, exc.message)
        taken = exc.command_id is not None and self.inbox.known(exc.command_id)
        event = Event(
            device_id=self.config.device_id, ts=format_ts(utc_now()), level="warning", code="command_rejected",
            message=exc.message, data={"error_code": exc.code.value, "command_id": exc.command_id,
                                       "id_of_an_accepted_command": taken,
                                       "topic": message.topic, "bytes": len(message.payload)},
        )
        echo = (not taken and exc.code is not ErrorCode.UNAUTHORIZED
                and max(properties_size(message).values()) <= MAX_PROPERTY_BYTES
                and self._response_topic_allowed(message.response_topic))
        self.outbox.reject(None if taken else exc.command_id, ReplyDraft.failure("rejected", exc), event,
                           message.response_topic if echo else None, message.correlation_data if echo else None)
        self.on_stored()
