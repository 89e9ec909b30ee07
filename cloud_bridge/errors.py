"""Error tree of the cloud bridge: one base, narrow subclasses whose messages say what to do next.

`ConfigError` is the wire package's (`autoglm_wire.errors.ConfigError`, raised by the shared loader in
`autoglm_wire.settings`): the CLI catches it next to `BridgeError`.
"""

from __future__ import annotations

import os

from autoglm_wire.errors import ConfigError

__all__ = [
    "BadTarget", "BridgeError", "ConfigError", "DuplicateCommand", "InvalidRequest", "RegistryMissing",
    "RegistryPermission", "UnknownCommand",
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


class RegistryPermission(BridgeError):
    """The registry file is there but this user may not open it (it belongs to the service user)."""

    def __init__(self, path: object) -> None:
        super().__init__(
            f"permission denied opening the registry {path} as uid {os.geteuid()}: it belongs to the bridge's "
            "service user; run the console as that user, e.g. "
            "`sudo -u cloud-bridge cloud-bridge devices --config /etc/cloud-bridge/cloud-bridge.toml`"
        )
        self.path = path


class CommandIdError(BridgeError):
    """An error about one command id; `explain` says what is wrong with `{id}` and what to do."""

    explain = "{id}"

    def __init__(self, command_id: str) -> None:
        super().__init__(self.explain.format(id=repr(command_id)))
        self.command_id = command_id


class UnknownCommand(CommandIdError):
    """No command with this id is in the registry."""

    explain = "no command {id} in the registry; list them with `cloud-bridge commands`"


class DuplicateCommand(CommandIdError):
    """A command with this id was already queued; ids are never reused (the device would ignore it)."""

    explain = "command id {id} is already in the registry; pick another --id or leave it out for a fresh one"


class InvalidRequest(BridgeError):
    """A command the operator asked for does not validate against protocol v1."""


class BadTarget(InvalidRequest):
    """A request that names neither or both of a target (a device or `group/G`) and a filter."""
