"""Hostile input: corrupted qcow2 images must fail with pyimago's errors, never crash.

Valid images are corrupted (bytes flipped or overwritten in the header, the L1 table, L2
tables, the refcount table and blocks, compressed data; the file truncated), then opened
read-only and writable, read whole, mapped and written a little.  The only exceptions allowed
are PyimagoError subclasses and OSError (from the file system): never struct.error,
IndexError, KeyError, ZeroDivisionError, MemoryError, RecursionError, and never a hang.
"""

from __future__ import annotations

import contextlib
import errno
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from hypothesis import event, given
from hypothesis import strategies as st
from pyimago.reference import (
    Buffer,
    CorruptImageError,
    EofMapping,
    FormatAccess,
    MemoryStorage,
    PreallocateMode,
    PyimagoError,
    UnsupportedFeatureError,
    create_image,
    open_image,
)
from pyimago_tests_reference_helpers import (
    KiB,
    MiB,
    get_u64,
    header_of,
    l2_entry_pos,
    patch_header,
    put_u64,
    refblock_pos,
)

#: Exceptions a hostile image may legitimately cause.
ALLOWED = (PyimagoError, OSError)

#: Most guest bytes read per open (a corrupted size may be huge).
READ_LIMIT = 256 * KiB
#: Most get_mapping calls per open.
MAPPING_LIMIT = 1024
#: Wall-clock bound of one example (generous: a hang is what we are after).
TIME_LIMIT = 10.0

# -- the valid images the corruption starts from ------------------------------------------------


@dataclass(frozen=True)
class Base:
    """A valid image and where its structures lie: ``{region name: [(start, length)]}``."""

    name: str
    data: bytes = field(repr=False)
    regions: dict[str, list[tuple[int, int]]] = field(repr=False)


class BoundedMemoryStorage(MemoryStorage):
    """A MemoryStorage of limited capacity: growing past it fails with EFBIG, as a full
    device or a file system's size limit would.

    A hostile host offset must not make the driver grow a storage to that offset; with a
    plain MemoryStorage such a bug would allocate the memory (and kill the test worker)
    instead of failing one example.  Refusals are counted in ``refused``.
    """

    CAPACITY = 32 * MiB

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.refused = 0

    def _check(self, end: int) -> None:
        if end > max(self.CAPACITY, self.size()):
            self.refused += 1
            raise OSError(errno.EFBIG, f"storage capacity exceeded (offset {end})")

    def write(self, data: Buffer, offset: int) -> None:
        self._check(offset + memoryview(data).nbytes)
        super().write(data, offset)

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        self._check(new_size)
        super().resize(new_size, prealloc)


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return bytes(zstandard.ZstdCompressor().compress(data))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _make_compressed(data: bytearray, guest: int, compression: str) -> tuple[int, int]:
    """Turn the NORMAL cluster mapping ``guest`` into a compressed one, in place; return
    where the compressed data lies."""
    h = header_of(data)
    cs, cb = h.cluster_size, h.cluster_bits
    pos = l2_entry_pos(data, guest)
    host = get_u64(data, pos) & 0x00FFFFFFFFFFFE00
    comp = _compress(bytes(data[host : host + cs]).ljust(cs, b"\0"), compression)
    assert len(comp) <= cs
    data[host : host + cs] = comp + bytes(cs - len(comp))
    shift = 62 - (cb - 8)
    sectors = -(-len(comp) // 512)
    put_u64(data, pos, 1 << 62 | (sectors - 1) << shift | host)
    return host, len(comp)


def _build(name: str, cluster_size: int, compression: str = "zlib", **opts: object) -> Base:
    storage = MemoryStorage()
    size = 64 * KiB if cluster_size == 512 else 1024 * KiB
    create_image(storage, size, cluster_size=cluster_size, compression_type=compression, **opts)
    cs = cluster_size
    pattern = bytes(range(256)) * (cs // 256 or 1)
    with open_image(storage, writable=True, backing=None) as img:
        for i in (0, 1, 2, 5, 9):
            img.write(pattern[: cs // 2] * 2, i * cs)
        img.write(b"\x42" * 100, size - 100)  # the second L2 table (512-byte clusters)
        img.write_zeroes(1 * cs, cs)  # v3: zero flag on an allocated cluster
        img.discard_to_zero(2 * cs, cs)
        img.write_zeroes(7 * cs, cs)  # v3: plain zero cluster
    data = bytearray(storage.snapshot())
    comp_host, comp_len = _make_compressed(data, 5 * cs, compression)
    h = header_of(data)
    regions: dict[str, list[tuple[int, int]]] = {
        "header": [(0, h.header_length + 64)],
        "l1": [(h.l1_table_offset, h.l1_size * 8)],
        "reftable": [(h.refcount_table_offset, 64)],
        "refblock": [(refblock_pos(data), 64)],
        "compressed": [(comp_host, comp_len)],
        "data": [(comp_host + cs, cs)] if comp_host + cs < len(data) else [(0, 8)],
    }
    l2s = []
    for li in range(h.l1_size):
        l2 = get_u64(data, h.l1_table_offset + 8 * li) & 0x00FFFFFFFFFFFE00
        if l2:
            l2s.append((l2, min(cs, 128)))
    regions["l2"] = l2s
    regions["anywhere"] = [(0, len(data))]
    return Base(name, bytes(data), regions)


BASES = [
    _build("v3-512", 512),
    _build("v2-512", 512, compat="0.10"),
    _build("v3-4k-rc4-zstd", 4096, "zstd", refcount_bits=4),
    _build("v3-4k-rc1", 4096, refcount_bits=1),
]

#: Values that tend to matter when written over metadata fields.
INTERESTING_U64 = [
    0, 1, 0x1FF, 0x200, 0x1000, 0x10000, 1 << 62, 1 << 63, (1 << 63) | 0x200, (1 << 62) | 0x200,
    (1 << 64) - 1, (1 << 63) - 1, 0x00FFFFFFFFFFFE00, 0x80000000, 0xFFFFFFFF,
]


@dataclass(frozen=True)
class Mutation:
    region: str
    where: float
    kind: str
    value: int
    width: int


mutations = st.builds(
    Mutation,
    region=st.sampled_from(["header", "l1", "l2", "reftable", "refblock", "compressed", "data",
                            "anywhere"]),
    where=st.floats(0, 1, allow_nan=False),
    kind=st.sampled_from(["flip", "byte", "u32", "u64"]),
    value=st.one_of(st.sampled_from(INTERESTING_U64), st.integers(0, (1 << 64) - 1)),
    width=st.integers(0, 63),
)


def _apply(base: Base, muts: list[Mutation], truncate: float | None) -> bytes:
    data = bytearray(base.data)
    for m in muts:
        spans = base.regions[m.region] or base.regions["anywhere"]
        start, length = spans[int(m.where * len(spans)) % len(spans)]
        pos = start + int(m.where * max(length - 1, 0))
        if m.kind == "flip":
            pos = min(pos, len(data) - 1)
            data[pos] ^= 1 << (m.width % 8)
        elif m.kind == "byte":
            pos = min(pos, len(data) - 1)
            data[pos] = m.value & 0xFF
        else:
            width = 4 if m.kind == "u32" else 8
            pos = min(pos - pos % width, len(data) - width)
            data[pos : pos + width] = (m.value & ((1 << 8 * width) - 1)).to_bytes(width, "big")
    if truncate is not None:
        del data[int(truncate * len(data)) :]
    return bytes(data)


# -- the exercise -------------------------------------------------------------------------------


def _attempt(op: Callable[[], object]) -> None:
    with contextlib.suppress(*ALLOWED):
        op()


def _walk_mappings(img: FormatAccess, end: int) -> None:
    offset = 0
    for _ in range(MAPPING_LIMIT):
        if offset >= end:
            return
        mapping, length = img.get_mapping(offset, end - offset)
        if isinstance(mapping, EofMapping):
            return
        assert length > 0
        offset += length


def _use(img: FormatAccess) -> None:
    end = min(img.size, READ_LIMIT)
    _attempt(lambda: img.read(0, end))
    _attempt(lambda: _walk_mappings(img, end))
    _attempt(lambda: img.read(img.size - 1 if img.size else 0, 1))
    if not img.writable:
        return
    if img.size >= 12 * KiB:
        _attempt(lambda: img.write(b"\xaa" * 1500, 300))
        _attempt(lambda: img.write(b"\xbb" * 512, 5 * 512))
        _attempt(lambda: img.write(b"\xcc" * 4096, 5 * 4096))
        _attempt(lambda: img.write_zeroes(1000, 3000))
        _attempt(lambda: img.discard_to_zero(0, 4096))
        _attempt(lambda: img.discard_to_any(8 * KiB, 4096))
        _attempt(lambda: img.write(b"\xdd" * 700, 10 * KiB))
    _attempt(lambda: img.resize(img.size + 64 * KiB, PreallocateMode.ZERO))
    _attempt(lambda: img.read(0, min(img.size, READ_LIMIT)))
    _attempt(img.flush)


def exercise(data: bytes) -> None:
    """Open ``data`` read-only and writable and use it; only ALLOWED errors may escape."""
    start = time.monotonic()
    result = data
    for writable in (False, True):
        storage = BoundedMemoryStorage(data)
        try:
            img = open_image(storage, writable=writable, backing=None)
        except ALLOWED:
            continue
        try:
            _use(img)
        finally:
            _attempt(img.close)
        if writable:
            result = storage.snapshot()
            if storage.refused:
                event("storage growth refused (hostile host offset)")
    # What the writable session left behind must be just as safe to open again.
    try:
        with open_image(BoundedMemoryStorage(result), backing=None) as img:
            _use(img)
    except ALLOWED:
        pass
    elapsed = time.monotonic() - start
    assert elapsed < TIME_LIMIT, f"one example took {elapsed:.1f}s"


@pytest.mark.clause("qcow2.metadata.alignment", "qcow2.metadata.overlap",
                    "qcow2.metadata.outside-file", "errors.hierarchy")
@pytest.mark.parametrize("base", BASES, ids=[b.name for b in BASES])
@given(muts=st.lists(mutations, min_size=1, max_size=4),
       truncate=st.none() | st.floats(0, 1, allow_nan=False))
def test_corrupted_images(base: Base, muts: list[Mutation], truncate: float | None) -> None:
    exercise(_apply(base, muts, truncate))


@pytest.mark.clause("qcow2.metadata.outside-file", "storage.read.past-eof-zero")
@pytest.mark.parametrize("base", BASES, ids=[b.name for b in BASES])
def test_every_truncation_point(base: Base) -> None:
    h = header_of(base.data)
    step = max(h.cluster_size // 2, 256)
    for cut in [0, 1, 4, 71, 72, 103, 104, 111, *range(512, len(base.data), step)]:
        exercise(base.data[:cut])


def test_bases_are_valid() -> None:
    for base in BASES:
        with open_image(MemoryStorage(base.data), backing=None) as img:
            h = header_of(base.data)
            cs = h.cluster_size
            pattern = (bytes(range(256)) * (cs // 256 or 1))[: cs // 2] * 2
            assert img.read(0, cs) == pattern
            assert img.read(5 * cs, cs) == pattern  # the compressed cluster
            assert img.read(cs, 2 * cs) == bytes(2 * cs)


# -- targeted cases -----------------------------------------------------------------------------


def _v3() -> bytearray:
    return bytearray(BASES[0].data)


def _open_fails(data: bytes | bytearray, error: type[Exception], match: str) -> None:
    for writable in (False, True):
        with pytest.raises(error, match=match):
            open_image(MemoryStorage(data), writable=writable, backing=None)


@pytest.mark.clause("qcow2.header.cluster-bits")
def test_cluster_bits_30() -> None:
    data = _v3()
    data[20:24] = (30).to_bytes(4, "big")
    _open_fails(data, CorruptImageError, "cluster_bits 30")


@pytest.mark.clause("qcow2.header.l1-size", "qcow2.header.limits")
def test_size_2_pow_63() -> None:
    data = _v3()
    patch_header(data, size=1 << 63)
    _open_fails(data, CorruptImageError, "l1_size")


@pytest.mark.clause("qcow2.header.backing-name")
def test_backing_file_size_5000() -> None:
    data = _v3()
    patch_header(data, backing_file_offset=200, backing_file_size=5000)
    _open_fails(data, CorruptImageError, "5000")


@pytest.mark.clause("qcow2.header.l1-size", "qcow2.header.limits")
@pytest.mark.parametrize("l1_size", [0x2000000 // 8 + 1, 0xFFFFFFFF])
def test_huge_l1_size(l1_size: int) -> None:
    data = _v3()
    data[36:40] = l1_size.to_bytes(4, "big")
    _open_fails(data, CorruptImageError, str(l1_size))


@pytest.mark.clause("qcow2.header.l1-size", "qcow2.header.limits")
def test_l1_size_at_the_limit_is_bounded() -> None:
    """The largest L1 table QEMU allows, in a tiny file: the table runs past EOF (zeroes)."""
    data = _v3()
    data[36:40] = (0x2000000 // 8).to_bytes(4, "big")
    start = time.monotonic()
    exercise(bytes(data))
    assert time.monotonic() - start < TIME_LIMIT


@pytest.mark.clause("qcow2.header.limits")
@pytest.mark.parametrize("clusters", [0x800000 // 512 + 1, 0xFFFFFFFF])
def test_huge_refcount_table_clusters(clusters: int) -> None:
    data = _v3()
    patch_header(data, refcount_table_clusters=clusters)
    _open_fails(data, CorruptImageError, str(clusters))


@pytest.mark.clause("qcow2.header.limits")
def test_refcount_table_at_the_limit_is_bounded() -> None:
    data = _v3()
    patch_header(data, refcount_table_clusters=0x800000 // 512)
    exercise(bytes(data))


@pytest.mark.clause("qcow2.metadata.outside-file")
@pytest.mark.parametrize("field", ["l1_table_offset", "refcount_table_offset"])
def test_table_beyond_eof(field: str) -> None:
    data = _v3()
    patch_header(data, **{field: 1 << 40})
    _open_fails(data, CorruptImageError, "outside")


@pytest.mark.clause("qcow2.metadata.overlap")
@pytest.mark.parametrize("field", ["l1_table_offset", "refcount_table_offset"])
def test_table_over_header(field: str) -> None:
    data = _v3()
    patch_header(data, **{field: 0})
    # Offset 0 for the refcount table is refused by header validation already.
    _open_fails(data, CorruptImageError, "header" if field == "l1_table_offset" else field)


def _point_l1(data: bytearray, target: int) -> None:
    h = header_of(data)
    put_u64(data, h.l1_table_offset, target | 1 << 63)


@pytest.mark.clause("qcow2.metadata.overlap")
@pytest.mark.parametrize("target", ["l1", "reftable"])
def test_l2_table_over_metadata(target: str) -> None:
    data = _v3()
    h = header_of(data)
    _point_l1(data, h.l1_table_offset if target == "l1" else h.refcount_table_offset)
    for writable in (False, True):
        with open_image(MemoryStorage(data), writable=writable, backing=None) as img:
            with pytest.raises(CorruptImageError, match="overlaps"):
                img.read(0, 512)
            with pytest.raises(CorruptImageError, match="overlaps"):
                img.get_mapping(0, 512)
            if writable:
                # The read of a writable image found the corruption: the image is marked
                # corrupt (qcow2.corrupt.mark) and every write is refused.
                with pytest.raises(CorruptImageError, match=r"overlaps|marked corrupt"):
                    img.write(b"x", 0)
                assert header_of(img.driver.storage.read(0, 512)).incompatible_features & 2
    exercise(bytes(data))


@pytest.mark.clause("qcow2.metadata.outside-file")
@pytest.mark.parametrize("target", [1 << 30, 1 << 55])
def test_l2_table_beyond_eof(target: int) -> None:
    data = _v3()
    _point_l1(data, target)
    with (
        open_image(MemoryStorage(data), backing=None) as img,
        pytest.raises(CorruptImageError, match="outside"),
    ):
        img.read(0, 512)
    exercise(bytes(data))


@pytest.mark.clause("qcow2.metadata.alignment")
def test_l2_table_misaligned() -> None:
    data = bytearray(BASES[2].data)  # 4 KiB clusters
    h = header_of(data)
    put_u64(data, h.l1_table_offset, get_u64(data, h.l1_table_offset) + 512)
    with (
        open_image(MemoryStorage(data), backing=None) as img,
        pytest.raises(CorruptImageError, match="aligned"),
    ):
        img.read(0, 512)
    exercise(bytes(data))


@pytest.mark.clause("qcow2.metadata.outside-file")
def test_refcount_block_beyond_eof() -> None:
    data = _v3()
    h = header_of(data)
    put_u64(data, h.refcount_table_offset, 1 << 40)
    with open_image(MemoryStorage(data), backing=None) as img:
        assert img.read(0, 4) != b"\0\0\0\0"  # reading needs no refcounts
    with (
        pytest.raises(CorruptImageError, match="outside"),
        open_image(MemoryStorage(data), writable=True, backing=None) as img,
    ):
        img.write(b"x" * 512, 20 * 512)


@pytest.mark.clause("qcow2.compressed.layout", "qcow2.compressed.zlib")
@pytest.mark.parametrize("junk", [b"\x00" * 512, b"\xff" * 512, bytes(range(256)) * 2])
def test_compressed_garbage(junk: bytes) -> None:
    data = _v3()
    entry = get_u64(data, l2_entry_pos(data, 5 * 512))
    host = entry & ((1 << 61) - 1)
    data[host : host + 512] = junk
    with (
        open_image(MemoryStorage(data), backing=None) as img,
        pytest.raises(CorruptImageError, match="compressed"),
    ):
        img.read(5 * 512, 512)
    exercise(bytes(data))


@pytest.mark.clause("qcow2.compressed.layout")
@pytest.mark.parametrize("base", [0, 2], ids=["512", "4k-zstd"])
def test_compressed_extremes(base: int) -> None:
    """Compressed descriptors with the largest offset and sector count their cluster size
    allows: memory stays bounded by the descriptor (a few MiB at most)."""
    data = bytearray(BASES[base].data)
    h = header_of(data)
    shift = 62 - (h.cluster_bits - 8)
    for host, sectors in [((1 << shift) - 1, 1 << (62 - shift)), (1, 1 << (62 - shift)),
                          (len(data) - 1, 1 << (62 - shift))]:
        put_u64(data, l2_entry_pos(data, 5 * h.cluster_size),
                1 << 62 | (sectors - 1) << shift | host)
        exercise(bytes(data))


@pytest.mark.clause("qcow2.l2.entry-layout", "qcow2.metadata.outside-file")
def test_data_cluster_beyond_eof_reads_zero() -> None:
    data = _v3()
    put_u64(data, l2_entry_pos(data, 0), 1 << 40 | 1 << 63)
    with open_image(MemoryStorage(data), backing=None) as img:
        assert img.read(0, 512) == bytes(512)
    with (
        open_image(MemoryStorage(data), writable=True, backing=None) as img,
        pytest.raises(CorruptImageError, match="outside"),
    ):
        img.write(b"x", 0)


@pytest.mark.clause("qcow2.metadata.outside-file")
def test_zero_alloc_cluster_beyond_eof_refused(tmp_path: Path) -> None:
    """A zero-flagged cluster with a host offset far past EOF: writing into it must be
    refused like the same NORMAL cluster is, not grow the file to the hostile offset (on a
    MemoryStorage an offset of 2^40 would try to allocate a TiB)."""
    data = _v3()
    put_u64(data, l2_entry_pos(data, 0), 64 << 20 | 1 << 63 | 1)
    path = tmp_path / "z.qcow2"
    path.write_bytes(data)
    with pytest.raises(CorruptImageError), open_image(path, writable=True) as img:
        img.write(b"x", 0)
    assert path.stat().st_size == len(data)


@pytest.mark.clause("qcow2.metadata.overlap")
@pytest.mark.parametrize("target", ["l1", "reftable"])
def test_copied_data_cluster_over_metadata_refused(target: str) -> None:
    data = _v3()
    h = header_of(data)
    # (A host offset of 0, the header, encodes an unallocated cluster.)
    host = {"l1": h.l1_table_offset, "reftable": h.refcount_table_offset}[target]
    put_u64(data, l2_entry_pos(data, 0), host | 1 << 63)
    with open_image(MemoryStorage(data), writable=True, backing=None) as img:
        # Reading shows the metadata bytes (as QEMU does); writing must not overwrite them.
        img.read(0, 512)
        with pytest.raises(CorruptImageError, match="overlaps"):
            img.write(b"x" * 512, 0)


@pytest.mark.clause("qcow2.metadata.overlap", "qcow2.l2.cow-shared")
@pytest.mark.parametrize("target", ["l1", "reftable", "compressed-in-header"])
def test_cow_never_frees_metadata(target: str) -> None:
    """A cluster without COPIED (or a compressed one) whose host cluster is the L1 table, the
    refcount table or the header: overwriting it must not hand that cluster out again."""
    data = _v3()
    h = header_of(data)
    pos = l2_entry_pos(data, 0)
    if target == "l1":
        put_u64(data, pos, h.l1_table_offset)
    elif target == "reftable":
        put_u64(data, pos, h.refcount_table_offset)
    else:
        put_u64(data, pos, 1 << 62 | 8)  # compressed data at byte 8 of the header
    storage = MemoryStorage(data)
    metadata = {"header": (0, 512), "l1": (h.l1_table_offset, 512),
                "reftable": (h.refcount_table_offset, 512)}
    before = {k: data[a : a + n] for k, (a, n) in metadata.items()}
    try:
        with open_image(storage, writable=True, backing=None) as img:
            img.write(b"X" * 512, 0)
            for i in range(1, 5):
                img.write(bytes([i]) * 512, (20 + i) * 512)
    except CorruptImageError:
        pass
    after = storage.snapshot()
    for name, (start, length) in metadata.items():
        if name == "l1":
            continue  # entries of the L1 table legitimately change
        assert after[start : start + length][:8] == before[name][:8], name
    assert b"X" * 512 not in after[: 3 * 512]
    for i in range(1, 5):
        assert bytes([i]) * 512 not in after[: 3 * 512] + after[h.l1_table_offset:][:512]


@pytest.mark.clause("qcow2.features.incompatible-unknown", "errors.hierarchy")
def test_errors_carry_the_feature() -> None:
    data = _v3()
    patch_header(data, incompatible_features=1 << 7)
    with pytest.raises(UnsupportedFeatureError) as info:
        open_image(MemoryStorage(data), backing=None)
    assert "bit 7" in info.value.feature
    assert isinstance(info.value, PyimagoError)
