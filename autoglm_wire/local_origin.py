"""Commands a device mints itself for its local API (docs/protocol.md, "Local commands"): an
additive v1 extension both sides share. The device gives them ids `local-` + 32 hex digits and
marks their terminal reply with `metrics.origin = "local"` and `metrics.kind`; a bridge that
receives such a reply for a command it never sent records the command with origin `local`.
"""

from __future__ import annotations

from typing import Any

LOCAL_ID_PREFIX = "local-"
ORIGIN_LOCAL = "local"


def is_local_id(command_id: str | None) -> bool:
    return command_id is not None and command_id.startswith(LOCAL_ID_PREFIX)


def local_marks(kind: str) -> dict[str, Any]:
    """What the device adds to the metrics of a local command's terminal reply."""
    return {"origin": ORIGIN_LOCAL, "kind": kind}


def is_local_reply(metrics: dict[str, Any]) -> bool:
    return metrics.get("origin") == ORIGIN_LOCAL and isinstance(metrics.get("kind"), str)
