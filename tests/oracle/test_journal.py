"""pyimago.oracle._journal: several storages recorded in one order, and the states a power
cut can leave of them (in issue order; across files, only a sync orders writes)."""

from __future__ import annotations

import pytest
from pyimago.oracle._journal import Journal
from pyimago.reference import InvalidRequestError, MemoryStorage

pytestmark = pytest.mark.clause("crash.power-cut")


def _two() -> tuple[Journal, MemoryStorage, MemoryStorage]:
    a, b = MemoryStorage(b"a" * 8), MemoryStorage(b"b" * 8)
    return Journal(), a, b


def test_cut_states_follow_the_one_order_of_both_storages() -> None:
    journal, a, b = _two()
    ra, rb = journal.storage("a", a), journal.storage("b", b)
    ra.write(b"1", 0)  # 1
    rb.write(b"2", 1)  # 2
    ra.sync()
    rb.resize(4)  # 3
    ra.write_zeroes(6, 2)  # 4
    assert journal.mutations == 4
    assert journal.state_after(0) == {"a": b"a" * 8, "b": b"b" * 8}
    assert journal.state_after(2) == {"a": b"1" + b"a" * 7, "b": b"b2" + b"b" * 6}
    assert journal.state_after(4) == {"a": b"1aaaaa\0\0", "b": b"b2bb"}
    assert [k for k, _ in journal.cut_states(since=3)] == [3, 4]
    assert journal.describe(3) == "b: resize to 4"
    with pytest.raises(InvalidRequestError):
        list(journal.cut_states([5]))


def test_a_storage_wrapped_again_continues_its_log() -> None:
    journal, a, _ = _two()
    journal.storage("a", a).write(b"x", 0)
    again = journal.storage("a", a)  # the same file reopened: the base stays the first one
    again.write(b"y", 1)
    assert journal.state_after(1)["a"] == b"xaaaaaaa"
    assert journal.state_after(2)["a"] == b"xyaaaaaa"


def test_unsynced_names_the_storages_a_sync_did_not_cover() -> None:
    journal, a, b = _two()
    ra, rb = journal.storage("a", a), journal.storage("b", b)
    ra.write(b"1", 0)
    rb.write(b"2", 0)
    ra.sync()
    assert journal.unsynced() == {"b": 2}
    rb.sync()
    assert journal.unsynced() == {}


def test_lagging_states_lose_one_files_unsynced_writes_only() -> None:
    journal, a, b = _two()
    ra, rb = journal.storage("a", a), journal.storage("b", b)
    ra.write(b"1", 0)  # 1: a, unsynced until mutation 3
    rb.write(b"2", 0)  # 2: b
    ra.sync()
    rb.write(b"3", 1)  # 3: b
    lagging = [(k, n, {x: bytes(v) for x, v in s.items()})
               for k, n, s in journal.lagging_states(range(4))]
    # a lags at cut 2 (its write 1 lost, b's write 2 kept); b's own lag at 3 loses 2 and 3,
    # the same as the in-order cut after 1, so it is not listed.
    assert lagging == [(2, "a", {"a": b"a" * 8, "b": b"2" + b"b" * 7})]
    # Grouped, a and b lag together: never one without the other.
    assert list(journal.lagging_states(range(4), [("a", "b")])) == []
