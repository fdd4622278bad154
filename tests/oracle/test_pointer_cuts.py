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
