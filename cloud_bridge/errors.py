"""Error tree of the cloud bridge: one base, narrow subclasses whose messages say what to do next.

`ConfigError` is the wire package's (`autoglm_wire.errors.ConfigError`, raised by the shared loader in
`autoglm_wire.settings`): the CLI catches it next to `BridgeError`.
"""

from __future__ import annotations

from autoglm_wire.errors import ConfigError

__all__ = [
    "BadTarget", "BridgeError", "ConfigError", "DuplicateCommand", "InvalidRequest", "RegistryMissing",
    "UnknownCommand",
]


class BridgeError(Exception):
    """Base of every error the bridge reports to an operator."""


class RegistryMissing(BridgeError):
    """The registry file does not exist (the console needs a bridge that has started once)."""

    def __init__(self, path: object) -> None:
        super().__init__(
            f"no registry at {path}: is `cloud-bridge serve` running with this config? "
            "(it creates the file when it starts)"
        )
        self.path = path


class UnknownCommand(BridgeError):
    """No command with this id is in the registry."""

    def __init__(self, command_id: str) -> None:
        super().__init__(f"no command {command_id!r} in the registry; list them with `cloud-bridge commands`")
        self.command_id = command_id


class DuplicateCommand(BridgeError):
    """A command with this id was already queued; ids are never reused (the device would ignore it)."""

    def __init__(self, command_id: str) -> None:
        super().__init__(
            f"command id {command_id!r} is already in the registry; pick another --id or leave it out "
            "for a fresh one"
        )
        self.command_id = command_id


class InvalidRequest(BridgeError):
    """A command the operator asked for does not validate against protocol v1."""


class BadTarget(InvalidRequest):
    """A request that names neither or both of a target (a device or `group/G`) and a filter."""
