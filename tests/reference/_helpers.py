"""Shared helpers of the tests of ``pyimago.reference``'s qcow2 modules.

Loaded by ``tests/conftest.py`` under the name ``pyimago_tests_reference_helpers`` (``tests/`` is
not a package), so test modules import it by that name.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pyimago_tests_qemu as _qemu  # tests/fixtures/qemu.py, registered by tests/conftest.py
from pyimago.reference import MemoryStorage, create_image, open_image
from pyimago.reference.qcow2.extensions import (
    HeaderExtension,
    pack_extensions,
    parse_extensions,
)
from pyimago.reference.qcow2.header import QCowHeader, pack_header, parse_header
from pyimago.reference.qcow2.refcounts import get_block_entry
from pyimago.reference.qcow2.tables import ClusterType, decode_l2_entry

__all__ = [
    "KiB",
    "MiB",
    "assert_consistent",
    "assert_qemu_reads",
    "counted_references",
    "every_cut",
    "extensions_of",
    "get_u64",
    "header_of",
    "l2_entry_pos",
    "make_image",
    "patch_header",
    "put_u64",
    "qemu_check",
    "qemu_check_bytes",
    "qemu_img",
    "qemu_io",
    "qemu_json",
    "refblock_pos",
    "require_qemu",
    "set_extensions",
    "stored_refcounts",
]

KiB = 1 << 10
MiB = 1 << 20

# The qemu-img helpers the reference tests import from here (one copy, in
# tests/fixtures/qemu.py, registered by tests/conftest.py).
assert_qemu_reads = _qemu.assert_qemu_reads
every_cut = _qemu.every_cut
qemu_check = _qemu.qemu_check
qemu_check_bytes = _qemu.qemu_check_bytes
qemu_img = _qemu.qemu_img
qemu_io = _qemu.qemu_io
qemu_json = _qemu.qemu_json


def require_qemu() -> None:
    """Skip (or fail under CI=true) when qemu-img / qemu-io are missing."""
    _qemu.require_qemu("pyimago.reference")


def get_u64(data: bytes | bytearray, pos: int) -> int:
    return int(struct.unpack_from(">Q", data, pos)[0])


def put_u64(data: bytearray, pos: int, value: int) -> None:
    struct.pack_into(">Q", data, pos, value)


def header_of(data: bytes | bytearray) -> QCowHeader:
    return parse_header(bytes(data[: 1 << 21]))


def patch_header(data: bytearray, **changes: int) -> None:
    """Rewrite header fields in place (``pack_header`` of the changed header), unvalidated.

    Bytes past the packed header (extensions, backing name) stay as they are.
    """
    h = replace(header_of(data), **changes)
    packed = pack_header(h)
    data[: len(packed)] = packed


def make_image(
    size: int = 64 * KiB,
    *,
    cluster_size: int = 512,
    writes: Iterable[tuple[int, bytes]] = (),
    **options: Any,
) -> bytearray:
    """A qcow2 image created by pyimago in memory, with ``writes`` applied; its bytes."""
    storage = MemoryStorage()
    create_image(storage, size, cluster_size=cluster_size, **options)
    with open_image(storage, writable=True, backing=None) as img:
        for offset, data in writes:
            img.write(data, offset)
    return bytearray(storage.snapshot())


def l2_entry_pos(data: bytes | bytearray, guest_offset: int) -> int:
    """File offset of the L2 entry that maps ``guest_offset`` (its L2 table must exist)."""
    h = header_of(data)
    per_table = h.cluster_size // 8
    cluster = guest_offset >> h.cluster_bits
    l1e = get_u64(data, h.l1_table_offset + 8 * (cluster // per_table))
    l2_offset = l1e & 0x00FFFFFFFFFFFE00
    assert l2_offset, f"no L2 table maps guest offset {guest_offset}"
    return l2_offset + 8 * (cluster % per_table)


def refblock_pos(data: bytes | bytearray, index: int = 0) -> int:
    """File offset of refcount block ``index`` (from the refcount table)."""
    h = header_of(data)
    offset = get_u64(data, h.refcount_table_offset + 8 * index) & ~0x1FF
    assert offset, f"no refcount block {index}"
    return offset


def extensions_of(data: bytes | bytearray) -> list[HeaderExtension]:
    h = header_of(data)
    end = h.backing_file_offset or h.cluster_size
    return parse_extensions(bytes(data[: h.cluster_size]), h.header_length, end)


def set_extensions(data: bytearray, exts: list[HeaderExtension]) -> None:
    """Replace the extension area of an image without a backing file name."""
    h = header_of(data)
    assert not h.backing_file_offset
    packed = pack_extensions(exts)
    assert h.header_length + len(packed) <= h.cluster_size, "extensions do not fit"
    data[h.header_length : h.cluster_size] = packed + bytes(
        h.cluster_size - h.header_length - len(packed)
    )


def stored_refcounts(data: bytes | bytearray) -> dict[int, int]:
    """Non-zero refcounts as the refcount structure stores them: ``{cluster index: count}``."""
    h = header_of(data)
    cs = h.cluster_size
    entries = cs * 8 // h.refcount_bits
    out: dict[int, int] = {}
    for ti in range(h.refcount_table_clusters * cs // 8):
        block = get_u64(data, h.refcount_table_offset + 8 * ti) & ~0x1FF
        if not block:
            continue
        raw = bytes(data[block : block + cs]).ljust(cs, b"\0")
        for i in range(entries):
            value = get_block_entry(raw, i, h.refcount_order)
            if value:
                out[ti * entries + i] = value
    return out


def counted_references(data: bytes | bytearray) -> dict[int, int]:
    """References to each host cluster, counted from the header and L1/L2 tables alone."""
    h = header_of(data)
    cs, cb = h.cluster_size, h.cluster_bits
    refs: Counter[int] = Counter()

    def span(offset: int, length: int) -> None:
        for c in range(offset >> cb, (offset + length - 1 >> cb) + 1):
            refs[c] += 1

    span(0, cs)
    if h.l1_size:
        span(h.l1_table_offset, h.l1_size * 8)
    span(h.refcount_table_offset, h.refcount_table_clusters * cs)
    for ti in range(h.refcount_table_clusters * cs // 8):
        block = get_u64(data, h.refcount_table_offset + 8 * ti) & ~0x1FF
        if block:
            span(block, cs)
    for li in range(h.l1_size):
        l2 = get_u64(data, h.l1_table_offset + 8 * li) & 0x00FFFFFFFFFFFE00
        if not l2:
            continue
        span(l2, cs)
        for i in range(cs // 8):
            entry = decode_l2_entry(get_u64(data, l2 + 8 * i), cb)
            if entry.type in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                span(entry.host_offset, cs)
            elif entry.type is ClusterType.COMPRESSED:
                span(entry.host_offset, entry.compressed_length)
    return dict(refs)


def assert_consistent(data: bytes | bytearray) -> None:
    """Our own ``qemu-img check``: refcounts equal references (no leaks, no errors) and the
    COPIED flags are exact.  Images without snapshots only."""
    h = header_of(data)
    assert h.nb_snapshots == 0
    stored = stored_refcounts(data)
    counted = counted_references(data)
    assert stored == counted, {
        c: (stored.get(c, 0), counted.get(c, 0))
        for c in sorted(set(stored) | set(counted))
        if stored.get(c, 0) != counted.get(c, 0)
    }
    cs, cb = h.cluster_size, h.cluster_bits
    for li in range(h.l1_size):
        l1e = get_u64(data, h.l1_table_offset + 8 * li)
        l2 = l1e & 0x00FFFFFFFFFFFE00
        if not l2:
            continue
        assert bool(l1e >> 63) == (stored[l2 >> cb] == 1), f"L1 entry {li} COPIED flag"
        for i in range(cs // 8):
            entry = decode_l2_entry(get_u64(data, l2 + 8 * i), cb)
            if entry.type in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                assert entry.copied == (stored[entry.host_offset >> cb] == 1), (
                    f"L2 entry {li}/{i} COPIED flag"
                )
