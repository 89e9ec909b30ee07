"""The feed behind `watch` and `/api/live` (cloud_bridge/store/feeds.py): every new row once, in id
order, also a row whose transaction took its id before a row seen already but committed after it."""

from __future__ import annotations

from cloud_bridge.store.feeds import GAP_WAIT_S, MAX_MISSING, FeedReader, TableCursor
from cloud_bridge.store.registry import Registry

from .conftest import empty_pg_registry
from .factories import at, reply


def test_ids_passed_without_their_rows_are_looked_for_until_they_turn_up() -> None:
    cursor = TableCursor(last=0)
    cursor.record([1, 2, 5], now=100.0)
    assert (cursor.last, sorted(cursor.missing)) == (5, [3, 4])
    cursor.record([3, 6], now=101.0)
    assert (cursor.last, sorted(cursor.missing)) == (6, [4])


def test_an_id_that_never_turns_up_is_given_up_after_the_wait() -> None:
    cursor = TableCursor(last=10)
    cursor.record([12], now=100.0)
    cursor.record([], now=100.0 + GAP_WAIT_S)
    assert list(cursor.missing) == [11], "still within the wait"
    cursor.record([], now=100.0 + GAP_WAIT_S + 0.001)
    assert cursor.missing == {}


def test_a_jump_in_ids_keeps_only_the_newest_missing_ones() -> None:
    cursor = TableCursor(last=0)
    cursor.record([10 * MAX_MISSING], now=0.0)
    assert len(cursor.missing) == MAX_MISSING and min(cursor.missing) == 9 * MAX_MISSING
    cursor.record([10 * MAX_MISSING + 3], now=0.0)
    assert len(cursor.missing) == MAX_MISSING and max(cursor.missing) == 10 * MAX_MISSING + 2


def test_a_reply_committed_after_a_later_one_still_reaches_the_feed(pg_url: str) -> None:
    registry = empty_pg_registry(pg_url)
    other = Registry.connect(pg_url)  # a second writer: another replica, or another thread's connection
    try:
        feed = FeedReader(registry.feeds)
        with other.transaction():
            other.replies.record(reply(1, "accepted", command_id=None, device_id="dev-1"), at(1))  # the lower id
            registry.replies.record(reply(1, "accepted", command_id=None, device_id="dev-2"), at(2))  # committed
            assert [r.device_id for r in feed.replies()] == ["dev-2"]
        assert [r.device_id for r in feed.replies()] == ["dev-1"], "the late commit is not passed by"
        assert feed.replies() == []
    finally:
        other.close()
        registry.close()


def test_a_device_filtered_feed_returns_that_device_s_rows_once(registry: Registry) -> None:
    feed = FeedReader(registry.feeds, device_id="dev-1")
    for seq, device in enumerate(["dev-2", "dev-1", "dev-2", "dev-1"], start=1):
        registry.replies.record(reply(seq, "accepted", command_id=None, device_id=device), at(seq))
    assert [(r.device_id, r.seq) for r in feed.replies()] == [("dev-1", 2), ("dev-1", 4)]
    assert feed.replies() == []
    registry.replies.record(reply(5, "accepted", command_id=None, device_id="dev-1"), at(5))
    assert [r.seq for r in feed.replies()] == [5]
