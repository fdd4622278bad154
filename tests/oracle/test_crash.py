"""The power-cut machinery: recorded mutations, rebuilt cut states, the crash rule."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pyimago.oracle.crash import CrashTimeline, RecordingStorage, TimelinePoint
from pyimago.reference import FileStorage, InvalidRequestError, MemoryStorage


def test_cut_states_replay_every_mutation_in_order() -> None:
    inner = MemoryStorage(b"abcd")
    rec = RecordingStorage(inner)
    rec.write(b"XY", 1)
    rec.sync()
    rec.write_zeroes(3, 3)
    rec.discard(0, 1)
    rec.resize(2)
    states = [(k, bytes(s)) for k, s in rec.cut_states()]
    assert states == [
        (0, b"abcd"),
        (1, b"aXYd"),
        (2, b"aXY\0\0\0"),
        (3, b"\0XY\0\0\0"),
        (4, b"\0X"),
    ]
    assert rec.synced == 1 and rec.syncs == [1]
    assert bytes(rec.state_after(4)) == inner.snapshot()


def test_a_discard_is_rebuilt_as_the_storage_left_it(tmp_path: Path) -> None:
    # FileStorage's discard is advisory (the data stays), MemoryStorage's zeroes: each cut
    # state must be one the storage can really be left in.
    path = tmp_path / "f"
    path.write_bytes(b"abcdefgh")
    inner = FileStorage(path, writable=True)
    try:
        rec = RecordingStorage(inner)
        rec.discard(2, 4)
        rec.discard(6, 10)  # past the end: nothing beyond it is made up
        assert bytes(rec.state_after(2)) == b"abcdefgh" == inner.read(0, inner.size())
    finally:
        inner.close()
    mem = RecordingStorage(MemoryStorage(b"abcdefgh"))
    mem.discard(2, 4)
    assert bytes(mem.state_after(1)) == b"ab\0\0\0\0gh"


def test_checkpoint_keeps_numbering_and_refuses_forgotten_cuts() -> None:
    rec = RecordingStorage(MemoryStorage(b"\0" * 8))
    rec.write(b"1", 0)
    rec.checkpoint()
    rec.write(b"2", 1)
    assert rec.mutations == 2
    assert bytes(rec.state_after(2)) == b"12" + b"\0" * 6
    with pytest.raises(InvalidRequestError, match=r"only mutations 1\.\.2"):
        rec.state_after(0)


def test_sample_cuts_keeps_both_ends() -> None:
    rec = RecordingStorage(MemoryStorage())
    for i in range(50):
        rec.write(b"x", 512 + i)  # past the first sector: no header cuts join the sample
    cuts = rec.sample_cuts(10, 6, random.Random(1))
    assert len(cuts) == 6 and cuts[0] == 10 and cuts[-1] == 50


def test_reordered_state_keeps_only_the_chosen_writes() -> None:
    rec = RecordingStorage(MemoryStorage(b"...."))
    rec.write(b"a", 0)
    rec.sync()
    rec.write(b"b", 1)
    rec.write(b"c", 2)
    assert bytes(rec.reordered_state(1, keep={3})) == b"a.c."


def _timeline() -> CrashTimeline:
    s = 512
    t = CrashTimeline(TimelinePoint(0, b"A" * s + b"B" * s, durable=True, label="open"))
    t.add(TimelinePoint(3, b"C" * s + b"B" * s, label="write 0"))
    t.add(TimelinePoint(4, b"C" * s + b"B" * s, durable=True, label="sync"))
    t.add(TimelinePoint(6, b"C" * s + b"D" * s, unspecified=((0, s),), label="discard"))
    return t


def test_crash_rule_allows_old_or_later_values_only() -> None:
    t = _timeline()
    s = 512
    # Mid-write: either value of sector 0 will do, mixed with the durable rest.
    assert t.violations(2, 2 * s, b"A" * s + b"B" * s) == []
    assert t.violations(2, 2 * s, b"C" * s + b"B" * s) == []
    bad = t.violations(2, 2 * s, b"Z" * s + b"B" * s)
    assert len(bad) == 1 and "0x0" in bad[0]
    # After the sync, only the synced value or a later one will do...
    assert t.violations(5, 2 * s, b"C" * s + b"D" * s) == []
    late = t.violations(5, 2 * s, b"C" * s + b"Z" * s)
    assert len(late) == 1 and "0x200" in late[0]
    # ... except where a later operation left the contents unspecified.
    assert t.violations(5, 2 * s, b"Z" * s + b"D" * s) == []
    assert t.violations(4, 2 * s, b"A" * s + b"B" * s)
    # A size no operation gave the image is wrong however the sectors read.
    assert "disk size" in t.violations(5, 3 * s, b"C" * 3 * s)[0]
