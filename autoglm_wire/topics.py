"""Topic names of protocol v1, built and parsed in one place. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from autoglm_wire.protocol import DEVICE_ID_PATTERN, is_command_id

GROUP_PATTERN = DEVICE_ID_PATTERN
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)  # compiled once: every message the bridge receives is checked


RESERVED_DEVICE_IDS = frozenset({"group"})  # `P/group/G/cmd` is the group command tree


def check_device_id(device_id: str) -> str:
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"device id {device_id!r} must be 1-64 characters of [A-Za-z0-9_.-]")
    if device_id in RESERVED_DEVICE_IDS:
        raise ValueError(f"device id {device_id!r} is reserved for group topics; choose another id")
    return device_id


def check_group(group: str) -> str:
    if not re.fullmatch(GROUP_PATTERN, group):
        raise ValueError(f"group {group!r} must be 1-64 characters of [A-Za-z0-9_.-]")
    return group


def check_prefix(prefix: str) -> str:
    if not prefix or any(c in prefix for c in "+#\0") or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"topic prefix {prefix!r} must be non-empty, without +, # or a leading/trailing /")
    return prefix


@dataclass(frozen=True)
class DeviceTopics:
    """The topics of one device under a prefix: `base` is `P/D`, each channel `P/D/<channel>`."""

    prefix: str
    device_id: str
    base: str = field(init=False)
    cmd: str = field(init=False)
    reply: str = field(init=False)
    status: str = field(init=False)
    telemetry: str = field(init=False)
    event: str = field(init=False)

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        check_device_id(self.device_id)
        base = f"{self.prefix}/{self.device_id}"
        object.__setattr__(self, "base", base)
        for channel in ("cmd", *CLOUD_CHANNELS):
            object.__setattr__(self, channel, f"{base}/{channel}")

    def stream(self, command_id: str) -> str:
        if not is_command_id(command_id):
            raise ValueError(f"command id {command_id!r} is not a valid topic level")
        return f"{self.base}/stream/{command_id}"


def group_cmd(prefix: str, group: str) -> str:
    return f"{check_prefix(prefix)}/group/{check_group(group)}/cmd"


@dataclass(frozen=True)
class CloudTopic:
    """A device -> cloud topic taken apart: which device and which channel."""

    device_id: str
    channel: str  # status | reply | event | telemetry | stream
    command_id: str | None = None


CLOUD_CHANNELS = ("status", "reply", "event", "telemetry")


def cloud_subscriptions(prefix: str) -> list[str]:
    """Wildcard subscriptions a cloud-side client needs to see every device."""
    check_prefix(prefix)
    return [f"{prefix}/+/{channel}" for channel in CLOUD_CHANNELS] + [f"{prefix}/+/stream/+"]


def parse_cloud_topic(prefix: str, topic: str) -> CloudTopic | None:
    """Return the device and channel of a device -> cloud topic, or None if it is not one."""
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1 :].split("/")
    if not parts or not _DEVICE_ID.fullmatch(parts[0]) or parts[0] == "group":
        return None
    if len(parts) == 2 and parts[1] in CLOUD_CHANNELS:
        return CloudTopic(parts[0], parts[1])
    if len(parts) == 3 and parts[1] == "stream" and is_command_id(parts[2]):
        return CloudTopic(parts[0], "stream", parts[2])
    return None
