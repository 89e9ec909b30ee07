"""Model artifacts the bridge knows: one row per GGUF (by sha256), under a unique name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloud_bridge.errors import InvalidRequest
from cloud_bridge.store.backends import IntegrityError
from cloud_bridge.store.connection import Connection


@dataclass(frozen=True)
class ModelRow:
    sha256: str
    name: str
    size: int
    url: str | None  # a mirror; None: served by the bridge from [models] dir
    architecture: str | None
    quantization: str | None
    parameters: int | None
    context_length: int | None
    added_at: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ModelRow:
        return cls(**row)


class UnknownModel(InvalidRequest):
    """No model of this name or sha256 is registered."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no model {key!r} is registered; list them with `cloud-bridge model list`, add one with "
                         "`cloud-bridge model add FILE`")


class Models:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def add(self, row: ModelRow) -> bool:
        """Register a model. False when this very file is already registered under this name (nothing to do).

        Raises InvalidRequest when the name or the file is registered as something else.
        """
        with self._db.transaction():
            existing = self._db.query("SELECT * FROM models WHERE sha256 = ? OR name = ?", (row.sha256, row.name))
            for other in existing:
                if other["sha256"] == row.sha256 and other["name"] == row.name:
                    if other["url"] != row.url:
                        self._db.execute("UPDATE models SET url = ? WHERE sha256 = ?", (row.url, row.sha256))
                    return False
                if other["sha256"] == row.sha256:
                    raise InvalidRequest(f"this file is already registered as {other['name']!r}; use that name "
                                         f"or `cloud-bridge model remove {other['name']}` first")
                raise InvalidRequest(f"the name {row.name!r} is taken by another file (sha256 {other['sha256'][:12]}"
                                     "...); choose another --name")
            try:
                self._db.execute(
                    "INSERT INTO models (sha256, name, size, url, architecture, quantization, parameters, "
                    "context_length, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.sha256, row.name, row.size, row.url, row.architecture, row.quantization, row.parameters,
                     row.context_length, row.added_at),
                )
            except IntegrityError as exc:  # a concurrent add of the same name or file
                raise InvalidRequest(f"model {row.name!r} was registered meanwhile; list them with "
                                     "`cloud-bridge model list`") from exc
        return True

    def find(self, key: str) -> ModelRow:
        """The model named `key`, or whose sha256 is `key`. Raises UnknownModel."""
        rows = self._db.query("SELECT * FROM models WHERE name = ? OR sha256 = ?", (key, key))
        if not rows:
            raise UnknownModel(key)
        return ModelRow.from_row(rows[0])

    def get(self, sha256: str) -> ModelRow | None:
        rows = self._db.query("SELECT * FROM models WHERE sha256 = ?", (sha256,))
        return ModelRow.from_row(rows[0]) if rows else None

    def all(self) -> list[ModelRow]:
        return [ModelRow.from_row(row) for row in self._db.query("SELECT * FROM models ORDER BY added_at, name")]

    def remove(self, key: str) -> ModelRow:
        """Forget a model. Refused while a rollout that is not finished deploys it."""
        with self._db.transaction():
            model = self.find(key)
            busy = self._db.query("SELECT id FROM rollouts WHERE model_sha256 = ? AND state IN ('running', 'paused')",
                                  (model.sha256,))
            if busy:
                raise InvalidRequest(f"model {model.name!r} is being rolled out by {busy[0]['id']}; abort it first "
                                     f"(`cloud-bridge rollout abort {busy[0]['id']}`)")
            self._db.execute("DELETE FROM models WHERE sha256 = ?", (model.sha256,))
        return model
