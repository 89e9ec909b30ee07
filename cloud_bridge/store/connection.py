"""The registry's one database connection, shared by its concerns: a lock around every use, and
transactions that nest.

One connection per process, guarded by a lock; multi-step writes run in `transaction()` and start
with a write, so SQLite takes the write lock up front and `busy_timeout` applies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from cloud_bridge.store.backends import Backend

T = TypeVar("T")


def placeholders(values: Collection[object]) -> str:
    """`?, ?, ...`: one placeholder per value (for `IN (...)`)."""
    return ", ".join("?" for _ in values)


MAX_ROWS_PER_STATEMENT = 500  # rows of one multi-row statement: far below either database's parameter cap


def slices(items: Sequence[T], size: int = MAX_ROWS_PER_STATEMENT) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def first_copies(keys: Sequence[Hashable], inserted: set[Hashable]) -> list[bool]:
    """For each key in order: whether this is the row an `INSERT ... ON CONFLICT DO NOTHING RETURNING`
    stored (`inserted`: the keys it returned); a later copy of a key in the same list is a duplicate."""
    fresh = set(inserted)
    stored = []
    for key in keys:
        stored.append(key in fresh)
        fresh.discard(key)
    return stored


class Connection:
    """A backend made thread-safe: every call takes the connection's lock."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = threading.RLock()
        self._depth = 0  # nesting of transaction() (guarded by the lock)
        self._on_end: list[Callable[[], None]] = []

    def on_transaction_end(self, hook: Callable[[], None]) -> None:
        """Call `hook` whenever an outermost transaction ends (committed or rolled back)."""
        self._on_end.append(hook)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several writes into one commit (one fsync). Nests: an inner block joins the outer
        transaction (no savepoint: on PostgreSQL each would cost two round trips), so an error
        anywhere rolls back the whole outer block."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                with self.backend.transaction():
                    yield
            finally:
                self._depth = 0
                for hook in self._on_end:
                    hook()

    def execute(self, sql: str, params: Any = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        with self._lock:
            return self.backend.execute(sql, params)

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self.backend.query(sql, params)

    def rowset(self, types: Sequence[str], rows: Sequence[Sequence[object]]) -> tuple[str, list[object]]:
        """A relation of `rows` (columns of SQL `types`: text, bigint, boolean) to name in a CTE,
        `WITH v (a, b) AS (<rowset>)`, and its parameters: one statement per table per batch instead
        of one per row, on both backends (`slices` keeps a statement's parameters under SQLite's cap)."""
        return self.backend.rowset(types, rows)

    def lock(self, select: str, params: Any = ()) -> None:
        """Lock the rows `select` returns until the transaction ends (see Backend.lock)."""
        with self._lock:
            self.backend.lock(select, params)

    def close(self) -> None:
        with self._lock:
            self.backend.close()
