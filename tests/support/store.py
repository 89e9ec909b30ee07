"""The agent's SQLite file opened as the agent wires it: the file, its outbox and its inbox."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from autoglm_wire.topics import DeviceTopics
from edge_agent.inbox import SqliteInbox
from edge_agent.outbox import OutboxLimits, SqliteOutbox
from edge_agent.sqlite_file import SqliteFile


@dataclass(frozen=True)
class OpenStore:
    file: SqliteFile
    outbox: SqliteOutbox
    inbox: SqliteInbox

    def close(self) -> None:
        self.file.close()


def open_store(path: Path, topics: DeviceTopics, synchronous: Literal["full", "normal"] = "full",
               limits: OutboxLimits | None = None) -> OpenStore:
    file = SqliteFile(path, synchronous)
    outbox = SqliteOutbox(file, topics, limits)
    return OpenStore(file, outbox, SqliteInbox(file, outbox))
