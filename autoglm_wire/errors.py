"""Error tree of protocol v1, shared by the agent and the bridge.

Every protocol error code (protocol v1, Reply.error.code) has exactly one exception type, so code
that fails raises the type and the reply builder reads its code. Each error may carry the command
id it belongs to (None when no id could be read from the payload).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"
    INVALID_COMMAND = "invalid_command"
    UNKNOWN_KIND = "unknown_kind"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    EXPIRED = "expired"
    BUSY = "busy"
    MODEL_ERROR = "model_error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    UNAUTHORIZED = "unauthorized"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """Base of every error reported on the wire (Reply.error.code is its `code`)."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, command_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.command_id = command_id


class BadJson(ProtocolError):
    code = ErrorCode.BAD_JSON


class InvalidCommand(ProtocolError):
    code = ErrorCode.INVALID_COMMAND


class UnknownKind(ProtocolError):
    code = ErrorCode.UNKNOWN_KIND


class PayloadTooLarge(ProtocolError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class Expired(ProtocolError):
    code = ErrorCode.EXPIRED


class Busy(ProtocolError):
    code = ErrorCode.BUSY


class ModelError(ProtocolError):
    code = ErrorCode.MODEL_ERROR


class Timeout(ProtocolError):
    code = ErrorCode.TIMEOUT


class Cancelled(ProtocolError):
    code = ErrorCode.CANCELLED


class Unauthorized(ProtocolError):
    code = ErrorCode.UNAUTHORIZED


class Internal(ProtocolError):
    code = ErrorCode.INTERNAL


class ConfigError(Exception):
    """The configuration file or environment is invalid; the message says which key and why."""
