"""The power-cut sample always holds the states around metadata writes (issue 9's unseen
mutants: a grow that points the header at a new L1 table before writing it broke in one
state of thousands), and the refcount-growth chains are the ones a fill outgrows."""

from __future__ import annotations

import random

import pytest
from pyimago.oracle.crash import RecordingStorage
from pyimago.oracle.ops import LayerSpec
from pyimago.oracle.strategies import outgrows_refcount_table
from pyimago.reference import MemoryStorage, PreallocateMode, create_image, open_image


def _grown_past_l1() -> tuple[RecordingStorage, int]:
    storage = MemoryStorage(name="grow")
    create_image(storage, 64 << 10, format="qcow2", cluster_size=512)
    rec = RecordingStorage(storage)
    access = open_image(rec, writable=True, format="qcow2")
    access.write(b"y" * 4096, 0)
    access.flush()
    before = rec.mutations
    # 64 KiB of 512-byte clusters is two L2 tables' reach: 256 KiB needs a new L1 table.
    access.resize(256 << 10, PreallocateMode.NONE)
    access.write(b"z" * 100_000, 100_000)  # a long tail of data writes after it
    access.close()
    return rec, before


@pytest.mark.clause("crash.oracle-rule")
def test_the_cut_after_the_l1_switch_is_always_sampled() -> None:
    rec, before = _grown_past_l1()
    l1_switch = next(k for k in range(before + 1, rec.mutations + 1)
                     if rec.describe_mutation(k) == "write [0x24, 0x30)")
    assert l1_switch in rec.pointer_cuts(before)
    for seed in range(5):
        cuts = rec.sample_cuts(before, 12, random.Random(seed))
        assert l1_switch in cuts and l1_switch + 1 in cuts
        assert len(cuts) <= 12 + 2 * (RecordingStorage.HEADER_CUTS
                                      + RecordingStorage.POINTER_CUTS)


@pytest.mark.clause("crash.oracle-rule")
def test_pointer_cuts_of_a_raw_image_are_none() -> None:
    storage = MemoryStorage(bytes(4096), name="raw")
    rec = RecordingStorage(storage)
    rec.write(b"x" * 512, 0)
    assert rec.pointer_cuts(0) == []


@pytest.mark.clause("qcow2.refcount.growth")
def test_growth_chains_outgrow_their_refcount_table() -> None:
    assert outgrows_refcount_table(LayerSpec("qcow2", 4200 * 512, 512, "1.1", refcount_bits=64))
    assert outgrows_refcount_table(LayerSpec("qcow2", 8300 * 512, 512, "1.1", refcount_bits=32))
    assert not outgrows_refcount_table(LayerSpec("qcow2", 96 << 10, 512, "1.1"))
    assert not outgrows_refcount_table(LayerSpec("qcow2", 8300 * 512, 512, "0.10"))


def _written(rec: RecordingStorage, k: int) -> int:
    """Where mutation ``k`` (a write) starts."""
    return int(rec.describe_mutation(k).split("[0x")[1].split(",")[0], 16)


@pytest.mark.clause("crash.oracle-rule", "crash.order.new-structure-before-pointer")
def test_new_pointer_cuts_are_the_table_writes_that_point_somewhere_new() -> None:
    # 512-byte clusters, 64-bit refcounts: a refcount block counts 64 clusters, so 40 KiB of
    # data needs new blocks (refcount-table entries) and new L2 tables (L1 entries).
    storage = MemoryStorage(name="blocks")
    create_image(storage, 256 << 10, format="qcow2", cluster_size=512, refcount_bits=64)
    rec = RecordingStorage(storage)
    access = open_image(rec, writable=True, format="qcow2")
    header = bytes(rec.read(0, 72))
    l1 = range(int.from_bytes(header[40:48], "big"),
               int.from_bytes(header[40:48], "big") + 8 * int.from_bytes(header[36:40], "big"))
    rt = range(int.from_bytes(header[48:56], "big"), int.from_bytes(header[48:56], "big") + 512)
    access.write(b"q" * 512, 0)
    access.flush()
    before = rec.mutations
    access.write(b"r" * (40 << 10), 64 << 10)
    access.flush()
    cuts = rec.new_pointer_cuts(before)
    assert cuts == sorted(cuts, reverse=True) and all(k > before for k in cuts)
    assert all(_written(rec, k) in l1 or _written(rec, k) in rt for k in cuts)
    # The newest refcount-table and L1 writes that set a pointer, two of each at most.
    assert 1 <= sum(_written(rec, k) in rt for k in cuts) <= RecordingStorage.NEW_POINTER_CUTS
    assert 1 <= sum(_written(rec, k) in l1 for k in cuts) <= RecordingStorage.NEW_POINTER_CUTS
    newest_rt = max(k for k in range(before + 1, rec.mutations + 1) if _written(rec, k) in rt)
    assert newest_rt in cuts
    # Writes that set no new pointer are not: nothing new since the last one.
    last = rec.mutations
    access.write(b"s" * 512, 0)
    access.flush()
    assert rec.new_pointer_cuts(last) == []
    access.close()


@pytest.mark.clause("crash.oracle-rule")
def test_new_pointer_cuts_follow_a_moved_refcount_table() -> None:
    layer = LayerSpec("qcow2", 4200 * 512, 512, "1.1", refcount_bits=64)
    storage = MemoryStorage(name="moved")
    create_image(storage, layer.size, format="qcow2", cluster_size=512, refcount_bits=64)
    rec = RecordingStorage(storage)
    access = open_image(rec, writable=True, format="qcow2")
    rt_before = int.from_bytes(rec.read(48, 8), "big")
    access.write(b"m" * layer.size, 0)  # outgrows the first refcount table: it moves
    access.flush()
    rt_after = int.from_bytes(rec.read(48, 8), "big")
    assert rt_after != rt_before
    cuts = rec.new_pointer_cuts(0)
    switched = max(k for k in range(1, rec.mutations + 1) if _written(rec, k) == 48)
    # After the switch, the new table is followed (the old one's clusters are not read as a
    # table once they are reused).
    assert any(k > switched and _written(rec, k) >= rt_after for k in cuts)
    assert all(k < switched or not rt_before <= _written(rec, k) < rt_before + 512
               for k in cuts)
    access.close()
