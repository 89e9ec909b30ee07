"""The reply seq's high-water mark: a small file beside the SQLite store (`<store>.seq`) holding a
number above every seq the store has handed out. A store created afresh (first start, after a
corrupt one was quarantined, or after the file was deleted) starts its seq at the mark, so replies
continue above what the cloud already holds whatever the device's clock says (a clock reading 1970
after a power cut included).

The mark is raised in blocks of SEQ_BLOCK inside the transaction that hands out the first seq past
it, before that transaction commits, and written durably: a temporary file, fsync, rename, fsync of
the directory. One fsync per SEQ_BLOCK replies; a rollback after a raise only leaves a gap.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SEQ_BLOCK = 1000


class SeqMark:
    """`<store>.seq`. Not thread-safe: used under the SQLite file's write lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.value: int | None = self._read()  # None: no mark (a new device) or an unreadable one

    def cover(self, seq: int) -> None:
        """Before `seq` is committed: raise the mark above it (durably) unless it already is."""
        if self.value is None or seq >= self.value:
            self._write(seq + SEQ_BLOCK)

    def _read(self) -> int | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return int(text)
        except ValueError:
            log.error("the seq mark %s is unreadable (%r); it is rewritten with the next reply", self.path, text[:40])
            return None

    def _write(self, value: int) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, str(value).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.value = value
