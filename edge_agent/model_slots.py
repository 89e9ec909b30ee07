"""Model slots and the activation journal, in the device's SQLite file (issue #14).

A slot is a verified GGUF the device has served: name, path, sha256, size, when it was activated.
One slot is active (the agent loads it at start); the others are previous ones, newest first;
`[models] slots` of them are kept and the files of older ones (inside the models directory only)
are deleted. The journal holds the one model change in progress (`download` -> `loading` ->
`canary` -> `active`): a restart reads it to answer the interrupted command (`Journal.outcome`
in edge_agent/model_deploy.py). The switch of the active slot and the journal's `active` phase are
one transaction, so a crash leaves either the old model active (the new one had not passed) or
the new one (it had).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from edge_agent.sqlite_file import SqliteFile

log = logging.getLogger(__name__)

_SELECT_SLOTS = ("SELECT name, path, sha256, size, activated_at FROM model_slots "
                 "ORDER BY active DESC, activated_at DESC")
Phase = Literal["download", "loading", "canary", "active"]
ROLLOUT_META = "model_rollout"  # the rollout id of the last model command that changed the model


@dataclass(frozen=True)
class Slot:
    name: str
    path: Path
    sha256: str
    size: int
    activated_at: float = 0.0

    def ref(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "path": str(self.path)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Slot:
        data = json.loads(text)
        return cls(data["name"], Path(data["path"]), data["sha256"], int(data["size"]), float(data["activated_at"]))


@dataclass(frozen=True)
class JournalEntry:
    command_id: str
    action: str
    phase: Phase
    target: Slot
    rollout: str | None


class ModelSlots:
    """The slots table and the journal of one SQLite file. Thread-safe (the file's lock)."""

    def __init__(self, file: SqliteFile, models_dir: Path, keep: int) -> None:
        self._file, self.models_dir, self.keep = file, models_dir.resolve(), keep

    # --- slots -----------------------------------------------------------------------------------

    def slots(self) -> list[Slot]:
        """The active slot first, then the previous ones, newest first."""
        with self._file.lock:
            rows = self._file.db.execute(_SELECT_SLOTS).fetchall()
        return _slots(rows)

    def active(self) -> Slot | None:
        with self._file.lock:
            row = self._file.db.execute("SELECT COUNT(*) FROM model_slots WHERE active = 1").fetchone()
        return self.slots()[0] if row[0] else None

    def previous(self) -> Slot | None:
        slots = self.slots()
        start = 1 if self.active() is not None else 0
        return slots[start] if len(slots) > start else None

    def rollout(self) -> str | None:
        return self._file.meta(ROLLOUT_META) or None

    def activate(self, slot: Slot, rollout: str | None = None, command_id: str | None = None) -> list[Path]:
        """Make `slot` the active one (and, for `command_id`, its journal `active`) in one transaction;
        then drop the slots beyond `keep` and delete their files. Returns the files deleted."""
        now = time.time()
        with self._file.write():
            db = self._file.db
            db.execute("UPDATE model_slots SET active = 0")
            db.execute("INSERT INTO model_slots (sha256, name, path, size, activated_at, active) "
                       "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT(sha256) DO UPDATE SET name = excluded.name, "
                       "path = excluded.path, size = excluded.size, activated_at = excluded.activated_at, active = 1",
                       [slot.sha256, slot.name, str(slot.path), slot.size, now])
            self._file.set_meta(ROLLOUT_META, rollout or "")
            if command_id is not None:
                db.execute("UPDATE model_journal SET phase = 'active', updated_at = ? WHERE command_id = ?",
                           [now, command_id])
        return self._prune()

    def _prune(self) -> list[Path]:
        """Forget the slots beyond `keep`; delete their files when inside the models directory and no
        kept slot uses them (a file named in the config outside it is never deleted)."""
        slots = self.slots()
        dropped, kept = slots[self.keep:], slots[:self.keep]
        if not dropped:
            return []
        with self._file.write():
            for slot in dropped:
                self._file.db.execute("DELETE FROM model_slots WHERE sha256 = ?", [slot.sha256])
        in_use = {slot.path.resolve() for slot in kept}
        deleted = []
        for slot in dropped:
            path = slot.path.resolve()
            if path.parent == self.models_dir and path not in in_use and path.exists():
                path.unlink()
                deleted.append(path)
                log.info("model slot %s (%s) pruned: deleted %s ([models] slots = %d)", slot.name,
                         slot.sha256[:12], path, self.keep)
        return deleted

    def owns(self, path: Path) -> bool:
        """Whether a slot uses this file (a file no slot uses may be deleted after a failed activation)."""
        resolved = path.resolve()
        return any(slot.path.resolve() == resolved for slot in self.slots())

    # --- the journal -----------------------------------------------------------------------------

    def begin(self, command_id: str, action: str, phase: Phase, target: Slot, rollout: str | None) -> None:
        with self._file.write():
            self._file.db.execute(
                "INSERT OR REPLACE INTO model_journal (id, command_id, action, phase, target, rollout, updated_at) "
                "VALUES (1, ?, ?, ?, ?, ?, ?)", [command_id, action, phase, target.to_json(), rollout, time.time()])

    def advance(self, command_id: str, phase: Phase) -> None:
        with self._file.write():
            self._file.db.execute("UPDATE model_journal SET phase = ?, updated_at = ? WHERE command_id = ?",
                                  [phase, time.time(), command_id])

    def journal(self) -> JournalEntry | None:
        with self._file.lock:
            row = self._file.db.execute(
                "SELECT command_id, action, phase, target, rollout FROM model_journal WHERE id = 1").fetchone()
        if row is None:
            return None
        return JournalEntry(row[0], row[1], row[2], Slot.from_json(row[3]), row[4])

    def end(self, command_id: str) -> None:
        with self._file.write():
            self._file.db.execute("DELETE FROM model_journal WHERE command_id = ?", [command_id])


def _slots(rows: list[tuple[Any, ...]]) -> list[Slot]:
    return [Slot(name, Path(path), sha, int(size), float(at)) for name, path, sha, size, at in rows]


def read_slots(store: Path) -> list[Slot]:
    """The slots of a store, read-only (`edge-agent model list`, while the agent runs or not); []
    for a store that does not exist yet or has no slots table."""
    if not store.exists():
        return []
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return _slots(conn.execute(_SELECT_SLOTS).fetchall())
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def slot_rows(slots: list[Slot]) -> list[dict[str, Any]]:
    """The slots as `list` answers them (the first one is the active one)."""
    return [{"name": s.name, "sha256": s.sha256, "size": s.size, "path": str(s.path),
             "role": "active" if i == 0 else "previous", "activated_at": round(s.activated_at, 3)}
            for i, s in enumerate(slots)]
