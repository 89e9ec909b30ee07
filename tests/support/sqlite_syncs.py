"""The syncs SQLite itself makes, counted per file.

SQLite fsyncs its files in C (the unix VFS's xSync), so a test that monkeypatches `os.fsync` sees
only `SqliteFile.sync`'s own fsync, never a commit's. `count_sqlite_syncs()` makes a VFS that wraps
the default one the process default for its duration: every file SQLite opens through it gets a
copy of the default's io_methods whose xSync records the file's name, then calls the real xSync.
Connections opened inside the block use it; nothing in the code under test changes.

ctypes only: it loads the libsqlite3 that Python's `sqlite3` module is linked against (the same
library, so the VFS it registers is the one Python's connections see).
"""

from __future__ import annotations

import ctypes
import os
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from ctypes import POINTER, c_char_p, c_int, c_void_p

import pytest

assert sqlite3.sqlite_version_info >= (3, 7, 0)
_LIB = ctypes.CDLL("libsqlite3.so.0")


class _File(ctypes.Structure):
    _fields_ = [("pMethods", c_void_p)]  # sqlite3_file: the VFS's own state follows


class _IoMethods(ctypes.Structure):  # sqlite3_io_methods, version 3
    _fields_ = [(name, c_int if name == "iVersion" else c_void_p) for name in (
        "iVersion", "xClose", "xRead", "xWrite", "xTruncate", "xSync", "xFileSize", "xLock", "xUnlock",
        "xCheckReservedLock", "xFileControl", "xSectorSize", "xDeviceCharacteristics", "xShmMap", "xShmLock",
        "xShmBarrier", "xShmUnmap", "xFetch", "xUnfetch")]


class _Vfs(ctypes.Structure):  # sqlite3_vfs, version 3
    _fields_ = [("iVersion", c_int), ("szOsFile", c_int), ("mxPathname", c_int), ("pNext", c_void_p),
                ("zName", c_char_p)] + [(name, c_void_p) for name in (
                    "pAppData", "xOpen", "xDelete", "xAccess", "xFullPathname", "xDlOpen", "xDlError", "xDlSym",
                    "xDlClose", "xRandomness", "xSleep", "xCurrentTime", "xGetLastError", "xCurrentTimeInt64",
                    "xSetSystemCall", "xGetSystemCall", "xNextSystemCall")]


# zName stays a raw pointer: SQLite keeps it (the WAL and SHM names, URI parameters follow it in memory)
_OPEN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, POINTER(_File), c_int, POINTER(c_int))
_SYNC = ctypes.CFUNCTYPE(c_int, POINTER(_File), c_int)
_LIB.sqlite3_vfs_find.restype = POINTER(_Vfs)
_LIB.sqlite3_vfs_find.argtypes = [c_char_p]
_LIB.sqlite3_vfs_register.argtypes = [POINTER(_Vfs), c_int]


class _SyncCounter:
    """The wrapping VFS. Registered once per process (never unregistered: a connection opened
    through it may outlive a test); `count_sqlite_syncs` makes it the default for a while."""

    def __init__(self) -> None:
        self.base = _LIB.sqlite3_vfs_find(None)
        self.syncs: Counter[str] = Counter()
        self._names: dict[int, str] = {}  # sqlite3_file address -> the file's path
        self._methods: dict[int, _IoMethods] = {}  # the base's io_methods address -> our copy
        self._real_sync: dict[int, ctypes._CFuncPtr] = {}  # our copy's address -> the base's xSync
        self._open = _OPEN(self._x_open)
        self._sync = _SYNC(self._x_sync)
        self._base_open = _OPEN(self.base.contents.xOpen)
        self.vfs = _Vfs.from_buffer_copy(self.base.contents)
        self._vfs_name = b"count-syncs"
        self.vfs.zName = self._vfs_name
        self.vfs.xOpen = ctypes.cast(self._open, c_void_p).value
        if _LIB.sqlite3_vfs_register(ctypes.byref(self.vfs), 0) != 0:
            raise RuntimeError("sqlite3_vfs_register failed")

    def make_default(self, on: bool) -> None:
        _LIB.sqlite3_vfs_register(ctypes.byref(self.vfs) if on else self.base, 1)

    def _x_open(self, vfs: int, name: int | None, file: ctypes._Pointer, flags: int, out_flags: ctypes._Pointer) -> int:
        rc = self._base_open(ctypes.cast(self.base, c_void_p).value, name, file, flags, out_flags)
        methods = file.contents.pMethods
        if rc != 0 or not methods:
            return rc
        ours = self._methods.get(methods)
        if ours is None:
            ours = _IoMethods.from_buffer_copy(_IoMethods.from_address(methods))
            self._real_sync[ctypes.addressof(ours)] = _SYNC(ours.xSync)
            ours.xSync = ctypes.cast(self._sync, c_void_p).value
            self._methods[methods] = ours
        file.contents.pMethods = ctypes.addressof(ours)
        self._names[ctypes.addressof(file.contents)] = ctypes.string_at(name).decode() if name else ""
        return rc

    def _x_sync(self, file: ctypes._Pointer, flags: int) -> int:
        self.syncs[self._names.get(ctypes.addressof(file.contents), "?")] += 1
        return self._real_sync[file.contents.pMethods](file, flags)


_COUNTER: _SyncCounter | None = None


@contextmanager
def count_sqlite_syncs() -> Iterator[Counter[str]]:
    """Inside: every SQLite file opened is counted; yields {path: xSync calls so far}, live."""
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = _SyncCounter()
    _COUNTER.syncs.clear()
    _COUNTER.make_default(True)
    try:
        yield _COUNTER.syncs
    finally:
        _COUNTER.make_default(False)


def record_os_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths `os.fsync` is called on from now (still fsyncing them): that is `SqliteFile.sync`,
    the barrier, which calls `os.fsync` itself; SQLite's own syncs are `count_sqlite_syncs`'."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced
