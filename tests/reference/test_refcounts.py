"""Refcounts: entry packing at every width, the refcount table, overflow, underflow, growth."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyimago.reference import (
    CorruptImageError,
    MemoryStorage,
    RawMapping,
    UnsupportedError,
    create_image,
    open_image,
)
from pyimago.reference.qcow2.refcounts import (
    RefcountTable,
    get_block_entry,
    refcount_block_entries,
    set_block_entry,
)
from pyimago_tests_reference_helpers import (
    KiB,
    MiB,
    assert_consistent,
    header_of,
    l2_entry_pos,
    make_image,
    qemu_check,
    qemu_img,
    qemu_io,
    refblock_pos,
    stored_refcounts,
)

orders = st.integers(0, 6)


@pytest.mark.clause("qcow2.refcount.entry-width")
@given(orders, st.data())
def test_set_get_round_trip(order: int, data: st.DataObject) -> None:
    bits = 1 << order
    block_size = 64
    n = block_size * 8 // bits
    block = bytearray(data.draw(st.binary(min_size=block_size, max_size=block_size)))
    before = [get_block_entry(block, i, order) for i in range(n)]
    index = data.draw(st.integers(0, n - 1))
    value = data.draw(st.integers(0, (1 << bits) - 1))
    set_block_entry(block, index, order, value)
    after = [get_block_entry(block, i, order) for i in range(n)]
    assert after[index] == value
    # No neighbour changed.
    assert after[:index] + after[index + 1 :] == before[:index] + before[index + 1 :]


@pytest.mark.clause("qcow2.refcount.entry-width")
def test_sub_byte_layout() -> None:
    """Narrow entries are packed from the least significant bit of each byte (QEMU's
    get_refcount_ro0..ro2); 8 bits and wider are big-endian integers."""
    block = bytearray(16)
    for i in range(3):
        set_block_entry(block, i, 0, 1)
    assert block[0] == 0b0000_0111
    set_block_entry(block, 9, 0, 1)
    assert block[1] == 0b0000_0010
    block = bytearray(16)
    set_block_entry(block, 1, 1, 3)
    set_block_entry(block, 3, 1, 1)
    assert block[0] == 0b0100_1100
    block = bytearray(16)
    set_block_entry(block, 1, 2, 0xA)
    set_block_entry(block, 2, 2, 0x5)
    assert block[:2] == b"\xa0\x05"
    block = bytearray(16)
    set_block_entry(block, 1, 3, 0xAB)
    assert block[:2] == b"\x00\xab"
    set_block_entry(block, 1, 4, 0x1234)
    assert block[2:4] == b"\x12\x34"
    set_block_entry(block, 0, 5, 0x01020304)
    assert block[:4] == b"\x01\x02\x03\x04"
    set_block_entry(block, 1, 6, (1 << 64) - 2)
    assert block[8:16] == b"\xff" * 7 + b"\xfe"


@pytest.mark.clause("qcow2.refcount.entry-width")
@pytest.mark.parametrize("order", range(7))
def test_set_entry_rejects_values_that_do_not_fit(order: int) -> None:
    block = bytearray(64)
    with pytest.raises(UnsupportedError):
        set_block_entry(block, 0, order, 1 << (1 << order))
    with pytest.raises(UnsupportedError):
        set_block_entry(block, 0, order, -1)
    assert block == bytearray(64)


def test_block_entries() -> None:
    assert refcount_block_entries(16, 4) == 32768
    assert refcount_block_entries(9, 0) == 4096
    assert refcount_block_entries(9, 6) == 64


@pytest.mark.qemu
@pytest.mark.clause("qcow2.refcount.entry-width", "qcow2.refcount.table-layout",
                    "interop.qemu-check")
@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_matches_qemu_layout(tmp_path: Path, refcount_bits: int) -> None:
    """Read the first refcount block of a QEMU-made image; then change one entry with
    set_block_entry and let ``qemu-img check`` say which cluster it now disagrees on."""
    path = tmp_path / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"cluster_size=512,refcount_bits={refcount_bits}", path, "64K")
    # 5 data clusters + 1 L2 table: 10 clusters in use, not a multiple of 8.
    qemu_io(path, ["write -P 0x5a 0 2560"])
    data = bytearray(path.read_bytes())
    h = header_of(data)
    order = h.refcount_order
    assert h.refcount_bits == refcount_bits
    used = -(-len(data) // 512)
    block_pos = refblock_pos(data)
    block = bytes(data[block_pos : block_pos + 512])
    values = [get_block_entry(block, i, order) for i in range(refcount_block_entries(9, order))]
    assert values[:used] == [1] * used
    assert not any(values[used:])
    assert stored_refcounts(data) == {i: 1 for i in range(used)}

    victim = l2_entry_pos(data, 1024)  # the L2 entry of the third data cluster
    cluster = (int.from_bytes(data[victim : victim + 8], "big") & 0x00FFFFFFFFFFFE00) >> 9
    patched = bytearray(block)
    set_block_entry(patched, cluster, order, 0)
    data[block_pos : block_pos + 512] = patched
    path.write_bytes(data)
    proc = qemu_img("check", "-f", "qcow2", path, ok=(2,))
    out = proc.stdout + proc.stderr
    assert f"cluster {cluster} refcount=0 reference=1" in out, out
    if refcount_bits > 1:
        set_block_entry(patched, cluster, order, 2)
        data[block_pos : block_pos + 512] = patched
        path.write_bytes(data)
        # A leak, and (refcount 2 with COPIED set) an OFLAG_COPIED error.
        proc = qemu_img("check", "-f", "qcow2", path, ok=(2,))
        out = proc.stdout + proc.stderr
        assert f"cluster {cluster} refcount=2 reference=1" in out, out


@pytest.mark.qemu
@pytest.mark.clause("qcow2.refcount.entry-width", "qcow2.l2.copied-flag", "interop.qemu-read")
@pytest.mark.parametrize("refcount_bits", [2, 4])
def test_reads_qemu_refcount_two(tmp_path: Path, refcount_bits: int) -> None:
    """An internal snapshot shares the data clusters: QEMU stores refcount 2 for them."""
    path = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"cluster_size=512,refcount_bits={refcount_bits}", path, "64K")
    qemu_io(path, ["write -P 0x5a 0 2048"])
    qemu_img("snapshot", "-c", "snap", path)
    with open_image(path) as img:
        hosts = []
        for guest in range(0, 2048, 512):
            mapping, _ = img.get_mapping(guest, 512)
            assert isinstance(mapping, RawMapping) and not mapping.writable
            hosts.append(mapping.offset)
    data = path.read_bytes()
    stored = stored_refcounts(data)
    assert [stored[h >> 9] for h in hosts] == [2, 2, 2, 2]
    assert stored[0] == 1


def _table(storage: MemoryStorage, cluster_bits: int, order: int) -> RefcountTable:
    h = header_of(storage.snapshot())
    end = [-(-storage.size() >> cluster_bits)]

    def bump(n: int) -> int:
        first = end[0]
        end[0] += n
        return first

    return RefcountTable(
        storage,
        cluster_bits=cluster_bits,
        refcount_order=order,
        table_offset=h.refcount_table_offset,
        table_clusters=h.refcount_table_clusters,
        bump=bump,
        peek_end=lambda: end[0],
        write_header=lambda offset, clusters: None,
    )


@pytest.mark.clause("qcow2.refcount.entry-width")
@pytest.mark.parametrize("order", range(7))
def test_overflow_and_underflow(order: int) -> None:
    storage = MemoryStorage()
    create_image(storage, 64 * KiB, cluster_size=512, refcount_bits=1 << order)
    table = _table(storage, 9, order)
    before = storage.snapshot()
    top = (1 << (1 << order)) - 1
    assert table.max_refcount == top
    assert table.get(0) == 1
    if order < 6:
        table.set(0, top)
        assert table.get(0) == top
        with pytest.raises(UnsupportedError, match=str(top)):
            table.add(0, 1)
        assert table.get(0) == top
        table.set(0, 1)
    with pytest.raises(UnsupportedError):
        table.set(0, top + 1)
    # A free cluster whose refcount would drop below zero: corruption.
    free = storage.size() // 512 + 3
    with pytest.raises(CorruptImageError, match=f"cluster {free}"):
        table.add(free, -1)
    assert storage.snapshot() == before


@pytest.mark.clause("qcow2.refcount.entry-width")
def test_one_bit_refcount_cannot_share() -> None:
    """A 1-bit refcount cannot count a second reference (QEMU refuses the same way)."""
    storage = MemoryStorage()
    create_image(storage, 64 * KiB, cluster_size=512, refcount_bits=1)
    table = _table(storage, 9, 0)
    with pytest.raises(UnsupportedError, match="refcount_bits 1"):
        table.set(2, 2)


@pytest.mark.clause("qcow2.refcount.no-leaks")
def test_underflow_through_the_driver() -> None:
    """A data cluster whose stored refcount is 0: freeing it is a corrupt-image error."""
    data = make_image(writes=[(0, b"a" * 512), (512, b"b" * 512)])
    victim = int.from_bytes(data[l2_entry_pos(data, 0) : l2_entry_pos(data, 0) + 8], "big")
    cluster = (victim & 0x00FFFFFFFFFFFE00) >> 9
    pos = refblock_pos(data)
    block = bytearray(data[pos : pos + 512])
    set_block_entry(block, cluster, 4, 0)
    data[pos : pos + 512] = block
    with (
        open_image(MemoryStorage(data), writable=True, backing=None) as img,
        pytest.raises(CorruptImageError, match=f"0x{cluster << 9:x}"),
    ):
        img.discard_to_any(0, 512)


@pytest.mark.clause("qcow2.refcount.growth", "qcow2.refcount.no-leaks")
@pytest.mark.parametrize("refcount_bits", [64, 16])
def test_refcount_table_growth(tmp_path: Path, refcount_bits: int) -> None:
    """512-byte clusters: one refcount-table cluster describes 64 blocks; with 64-bit
    refcounts a block covers 64 clusters, so 2 MiB of image need a larger table."""
    path = tmp_path / "g.qcow2"
    size = 4 * MiB if refcount_bits == 64 else 12 * MiB
    create_image(path, size, cluster_size=512, refcount_bits=refcount_bits)
    written = 5 * MiB // 2 if refcount_bits == 64 else 8 * MiB + 64 * KiB
    payload = bytes(range(251)) * (written // 251 + 1)
    with open_image(path, writable=True) as img:
        img.write(payload[:written], 0)
    data = path.read_bytes()
    h = header_of(data)
    assert h.refcount_table_clusters > 1 or h.refcount_table_offset != 512
    reach = h.refcount_table_clusters * 512 // 8 * refcount_block_entries(9, h.refcount_order)
    assert reach * 512 >= len(data)
    assert_consistent(data)
    with open_image(path) as img:
        assert img.read(0, written) == payload[:written]


@pytest.mark.qemu
@pytest.mark.clause("qcow2.refcount.growth", "interop.qemu-check")
def test_refcount_table_growth_qemu_check(tmp_path: Path) -> None:
    path = tmp_path / "g.qcow2"
    create_image(path, 4 * MiB, cluster_size=512, refcount_bits=64)
    payload = bytes(range(253)) * (3 * MiB // 253)
    with open_image(path, writable=True) as img:
        img.write(payload, 512)
    qemu_check(path)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(bytes(512) + payload + bytes(4 * MiB - 512 - len(payload)))
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", path, raw)
    # QEMU can keep writing into the grown structure.
    qemu_io(path, ["write -P 0x11 3584k 512k"])
    qemu_check(path)
    with open_image(path) as img:
        assert img.read(3584 * KiB, 512 * KiB) == b"\x11" * (512 * KiB)
