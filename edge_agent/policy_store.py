"""The policy fields `config` commands set, kept in the device's SQLite file (the `meta` row
`policy`) so they survive restarts; `policy.py` merges them over the defaults."""

from __future__ import annotations

import json
from typing import Any

from edge_agent.sqlite_file import SqliteFile


class PolicyStore:
    def __init__(self, file: SqliteFile) -> None:
        self._file = file

    def load(self) -> dict[str, Any]:
        """The policy fields `config` commands stored, or {} before the first one."""
        stored = self._file.meta("policy")
        return json.loads(stored) if stored else {}

    def save(self, fields: dict[str, Any]) -> None:
        with self._file.write():
            self._file.set_meta("policy", json.dumps(fields, sort_keys=True))
