"""Refcount table and blocks (specs/qcow2-refcounts.toml)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pyimago.oracle.conformance._qcow2 import Qcow2Bytes
from pyimago.oracle.conformance._support import ImageKit, KiB, MiB, pattern
from pyimago.reference import Buffer, MemoryStorage, PreallocateMode

pytestmark = pytest.mark.needs("qcow2")


@pytest.mark.clause("qcow2.refcount.table-layout", "qcow2.refcount.index")
def test_refcount_table_and_indices(img: ImageKit) -> None:
    # 512-byte clusters with 16-bit refcounts: one block holds 256 entries (128 KiB of host).
    store = img.mem(2 * MiB, "qcow2", cluster_size=512)
    with img.open(store) as disk:
        disk.write(pattern(1, 600 * KiB), 0)
    image = img.bytes_of(store)
    cs = 512
    rt = image.get("refcount_table_offset")
    entries = [image.u64(rt + 8 * i) for i in range(image.get("refcount_table_clusters") * 64)]
    used = [e for e in entries if e]
    assert len(used) >= 5, f"only {len(used)} refcount blocks for > 600 KiB of host clusters"
    for i, e in enumerate(entries):
        assert e % cs == 0, f"refcount table entry {i} = {e:#x} is not cluster-aligned"
    # The refcount of host offset h lives at table index (h // cs) // 256, block index % 256.
    for guest in (0, 300 * KiB, 600 * KiB - 512):
        host = image.host_offset(guest)
        block = entries[(host // cs) // 256]
        assert block, f"no refcount block for host offset {host:#x}"
        index = (host // cs) % 256
        value = int.from_bytes(image.data[block + 2 * index : block + 2 * index + 2], "big")
        assert value == 1, f"host {host:#x}: refcount at the specified index is {value}"
    assert not image.problems(), image.problems()


@pytest.mark.clause("qcow2.refcount.sub-byte-order", "qcow2.refcount.entry-width")
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_sub_byte_refcounts_start_at_the_lsb(img: ImageKit, bits: int) -> None:
    store = img.mem(256 * KiB, "qcow2", cluster_size=512, refcount_bits=bits)
    with img.open(store) as disk:
        disk.write(pattern(bits, 20 * KiB), 0)
    image = img.bytes_of(store)
    block = image.u64(image.get("refcount_table_offset")) & ~0x1FF
    first = image.data[block]
    # Cluster 0 (the header) has refcount 1: the lowest bits of the first byte hold it.
    assert first & ((1 << bits) - 1) == 1, (
        f"refcount_bits={bits}: first refcount byte {first:#010b}: cluster 0's refcount is not "
        "in the least significant bits"
    )
    assert not image.problems(), image.problems()


@pytest.mark.needs("resize")
@pytest.mark.clause("qcow2.refcount.growth", "qcow2.refcount.no-leaks")
def test_refcount_table_grows(img: ImageKit) -> None:
    # 512-byte clusters, 64-bit refcounts: one block covers 64 clusters, a one-cluster table
    # 64 blocks = 2 MiB of host space.
    store = img.mem(4 * MiB, "qcow2", cluster_size=512, refcount_bits=64)
    before = img.bytes_of(store)
    old = (before.get("refcount_table_offset"), before.get("refcount_table_clusters"))
    with img.open(store) as disk:
        disk.write(pattern(4, 3 * MiB), 0)
        assert disk.read(0, 3 * MiB) == pattern(4, 3 * MiB)
        disk.resize(6 * MiB, PreallocateMode.FORMAT_ALLOCATE)
    image = img.bytes_of(store)
    new = (image.get("refcount_table_offset"), image.get("refcount_table_clusters"))
    assert new != old and new[1] * 64 * 64 * 512 >= len(image.data), (
        f"the refcount table {new} does not cover the {len(image.data)}-byte file"
    )
    assert not image.problems(), image.problems()
    with img.open(store, writable=False) as disk:
        assert disk.read(0, 3 * MiB) == pattern(4, 3 * MiB)


@dataclass(frozen=True, slots=True)
class _Write:
    offset: int
    data: bytes


class RecordingStorage(MemoryStorage):
    """A MemoryStorage that logs every write, so a crash after any of them can be replayed."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data, name="recording")
        self.log: list[_Write] = []

    def write(self, data: Buffer, offset: int) -> None:
        self.log.append(_Write(offset, bytes(data)))
        super().write(data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.log.append(_Write(offset, bytes(length)))
        super().write_zeroes(offset, length)


def _dangling(image: Qcow2Bytes) -> list[int]:
    """Referenced host clusters whose stored refcount is 0."""
    return sorted(c for c in image.references() if image.refcount(c) == 0)


@pytest.mark.clause("qcow2.refcount.order-of-updates")
def test_a_crash_after_any_write_leaves_no_dangling_reference(img: ImageKit) -> None:
    image = img.crafted(256 * KiB, writes=[(0, pattern(5, 8 * KiB))])
    initial = bytes(image.data)
    store = RecordingStorage(initial)
    with img.open(store) as disk:
        disk.write(pattern(6, 20 * KiB), 100 * KiB)  # new L2 table and data clusters
        disk.discard_to_zero(0, 4 * KiB)  # references removed, refcounts lowered
        disk.write(pattern(7, 3 * KiB), 200 * KiB - 1000)
    state = bytearray(initial)
    for step, w in enumerate(store.log, 1):
        end = w.offset + len(w.data)
        if end > len(state):
            state.extend(bytes(end - len(state)))
        state[w.offset : end] = w.data
        dangling = _dangling(Qcow2Bytes(state))
        assert not dangling, (
            f"stopping after storage write {step} of {len(store.log)} (at {w.offset:#x}, "
            f"{len(w.data)} bytes) leaves host clusters {dangling} referenced with refcount 0"
        )
