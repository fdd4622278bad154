"""FormatAccess semantics (specs/access.toml), on in-memory images."""

from __future__ import annotations

import pytest
from pyimago.reference import (
    EofMapping,
    FormatAccess,
    IndirectMapping,
    InvalidRequestError,
    MemoryStorage,
    PreallocateMode,
    PyimagoError,
    RawMapping,
    ReadOnlyError,
    SpecialMapping,
    UnsupportedError,
    ZeroMapping,
    create_image,
    open_image,
)

CS = 4096


def new_qcow2(
    size: int = 64 * CS, *, backing: FormatAccess | None = None, compat: str = "1.1",
    cluster_size: int = CS,
) -> tuple[MemoryStorage, FormatAccess]:
    storage = MemoryStorage(name="top")
    opts: dict[str, object] = {"cluster_size": cluster_size, "compat": compat}
    if backing is not None:
        opts["backing_file"] = "base"
    create_image(storage, size, **opts)
    return storage, open_image(storage, writable=True, backing=backing)


def new_raw_base(data: bytes) -> FormatAccess:
    return open_image(MemoryStorage(data, name="base"), format="raw")


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) % 251 + 1 for i in range(n))


@pytest.mark.clause("access.read.no-short", "access.read.past-end-zero")
def test_read_past_end_reads_zeroes() -> None:
    _, img = new_qcow2(4 * CS)
    img.write(pattern(CS), 3 * CS)
    got = img.read(3 * CS, 3 * CS)
    assert len(got) == 3 * CS
    assert got == pattern(CS) + bytes(2 * CS)
    assert img.read(100 * CS, 10) == bytes(10)


@pytest.mark.clause("access.write.past-end")
@pytest.mark.parametrize("op", ["write", "write_zeroes", "discard_to_zero", "discard_to_any",
                                "discard_to_backing"])
def test_past_end_rejected_before_anything_written(op: str) -> None:
    storage, img = new_qcow2(4 * CS)
    img.write(pattern(4 * CS), 0)
    img.flush()
    before = storage.snapshot()
    with pytest.raises(InvalidRequestError, match="past the disk end"):
        if op == "write":
            img.write(pattern(2 * CS, 9), 3 * CS)
        else:
            getattr(img, op)(3 * CS, 2 * CS)
    img.flush()
    assert storage.snapshot() == before
    assert img.read(0, 4 * CS) == pattern(4 * CS)


@pytest.mark.clause("access.range.overflow")
@pytest.mark.parametrize(
    ("offset", "length"), [(-1, 1), (0, -1), ((1 << 64) - 1, 2), (1.5, 1), (True, 1)]
)
def test_bad_ranges_are_invalid_requests(offset: object, length: object) -> None:
    _, img = new_qcow2()
    with pytest.raises(InvalidRequestError):
        img.read(offset, length)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        img.get_mapping(offset, length)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        img.write_zeroes(offset, length)  # type: ignore[arg-type]


@pytest.mark.clause("access.write.read-only", "errors.hierarchy")
def test_read_only_image_refuses_every_change() -> None:
    storage, img = new_qcow2()
    img.close()
    ro = open_image(storage)
    for call in (
        lambda: ro.write(b"x", 0),
        lambda: ro.write_zeroes(0, 1),
        lambda: ro.discard_to_zero(0, CS),
        lambda: ro.discard_to_any(0, CS),
        lambda: ro.discard_to_backing(0, CS),
        lambda: ro.resize(2 * ro.size),
        lambda: ro.ensure_data_mapping(0, 1, True),
    ):
        with pytest.raises(ReadOnlyError) as info:
            call()
        assert isinstance(info.value, PermissionError)
        assert isinstance(info.value, PyimagoError)


@pytest.mark.clause("access.mapping.tiling", "access.mapping.eof-top-only")
def test_mappings_tile_the_range_and_eof_only_at_end() -> None:
    _, img = new_qcow2(10 * CS)
    img.write(pattern(CS + 100), CS - 50)
    offset, end = 0, 12 * CS
    while True:
        mapping, length = img.get_mapping(offset, end - offset)
        if isinstance(mapping, EofMapping):
            assert length == 0
            assert offset == img.size
            break
        assert 0 < length <= end - offset
        offset += length
    assert img.get_mapping(img.size, 5) == (EofMapping(), 0)


@pytest.mark.clause("access.mapping.explicit-top-only", "access.mapping.eof-top-only",
                    "backing.shorter")
def test_lower_layer_zeroes_are_never_explicit() -> None:
    base_storage = MemoryStorage(name="base")
    create_image(base_storage, 4 * CS, cluster_size=CS)
    with open_image(base_storage, writable=True) as base:
        base.write_zeroes(0, 2 * CS)
        assert base.get_mapping(0, CS) == (ZeroMapping(True), CS)
    base = open_image(base_storage)
    _, top = new_qcow2(8 * CS, backing=base)
    assert top.get_mapping(0, CS) == (ZeroMapping(False), CS)
    # Past the backing's end (backing shorter than the overlay) the rest reads as zero.
    mapping, length = top.get_mapping(5 * CS, 3 * CS)
    assert mapping == ZeroMapping(False)
    # The overlay's unallocated run resolves through the backing's EOF to the whole rest.
    assert length == 3 * CS
    top.write_zeroes(CS, CS)
    assert top.get_mapping(CS, CS) == (ZeroMapping(True), CS)
    shallow, _ = top.get_shallow_mapping(0, CS)
    assert isinstance(shallow, IndirectMapping)
    assert shallow.layer is base


@pytest.mark.clause("access.mapping.writable-gate", "access.mapping.shallow-indirect")
def test_backing_data_is_never_writable_through_the_overlay() -> None:
    base = new_raw_base(pattern(8 * CS))
    _, top = new_qcow2(8 * CS, backing=base)
    mapping, _ = top.get_mapping(0, CS)
    assert isinstance(mapping, RawMapping)
    assert not mapping.writable
    top.write(b"x", 0)
    mapping, _ = top.get_mapping(0, CS)
    assert isinstance(mapping, RawMapping) and mapping.writable


@pytest.mark.clause("access.cow.partial-cluster")
def test_partial_cluster_write_copies_the_rest_from_backing() -> None:
    data = pattern(8 * CS, 7)
    base = new_raw_base(data)
    _, top = new_qcow2(8 * CS, backing=base)
    top.write(b"\xff" * 10, CS + 100)
    expected = bytearray(data)
    expected[CS + 100 : CS + 110] = b"\xff" * 10
    assert top.read(0, 8 * CS) == bytes(expected)
    assert base.read(0, 8 * CS) == data


@pytest.mark.clause("access.write-zeroes.no-free", "qcow2.zero.preallocated")
def test_write_zeroes_keeps_the_host_cluster() -> None:
    storage, img = new_qcow2()
    img.write(pattern(2 * CS), 0)
    img.flush()
    size_before = storage.size()
    img.write_zeroes(0, 2 * CS)
    assert img.read(0, 2 * CS) == bytes(2 * CS)
    assert img.get_mapping(0, CS) == (ZeroMapping(True), CS)
    # The host cluster stays allocated: writing again reuses it instead of growing the file.
    img.write(b"a" * 10, 5)
    img.flush()
    assert storage.size() == size_before
    assert img.read(0, 20) == bytes(5) + b"a" * 10 + bytes(5)


@pytest.mark.clause("access.discard-to-zero.reads-zero", "access.discard-to-zero.frees",
                    "access.write-zeroes.soft")
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("with_backing", [False, True])
def test_discard_to_zero_zeroes_unaligned_edges(compat: str, with_backing: bool) -> None:
    base = new_raw_base(pattern(8 * CS, 3)) if with_backing else None
    _, img = new_qcow2(8 * CS, backing=base, compat=compat)
    img.write(pattern(8 * CS, 5), 0)
    img.discard_to_zero(CS + 7, 3 * CS)
    expected = bytearray(pattern(8 * CS, 5))
    expected[CS + 7 : 4 * CS + 7] = bytes(3 * CS)
    assert img.read(0, 8 * CS) == bytes(expected)


@pytest.mark.clause("access.discard-to-backing.visible", "access.discard-to-backing.partial-kept")
def test_discard_to_backing_shows_backing_in_whole_clusters_only() -> None:
    data = pattern(8 * CS, 3)
    base = new_raw_base(data)
    _, img = new_qcow2(8 * CS, backing=base)
    img.write(b"\x01" * (8 * CS), 0)
    img.discard_to_backing(CS + 1, 3 * CS)
    got = img.read(0, 8 * CS)
    assert got[CS : CS + 1] == b"\x01"  # partial head cluster kept
    assert got[2 * CS : 4 * CS] == data[2 * CS : 4 * CS]  # whole clusters from the backing
    assert got[4 * CS : 4 * CS + 1] == b"\x01"  # partial tail cluster kept


@pytest.mark.clause("access.discard-to-any.unspecified", "raw.no-backing")
def test_discard_to_any_then_write_again() -> None:
    _, img = new_qcow2()
    img.write(pattern(4 * CS), 0)
    img.discard_to_any(0, 4 * CS)
    img.write(b"z" * 3, CS)
    assert img.read(CS, 3) == b"zzz"
    raw = open_image(MemoryStorage(pattern(4 * CS)), format="raw", writable=True)
    raw.discard_to_backing(CS, CS)
    assert raw.read(CS, CS) == bytes(CS)


@pytest.mark.clause("access.unsupported")
def test_special_read_on_raw_is_unsupported() -> None:
    raw = new_raw_base(bytes(CS))
    with pytest.raises(UnsupportedError):
        raw.driver.readv_special([bytearray(10)], 0)


@pytest.mark.clause("access.resize.shrink-discards", "access.resize.grow-zero")
def test_shrink_then_grow_zero_reads_zero() -> None:
    _, img = new_qcow2(4 * CS)
    img.write(pattern(4 * CS), 0)
    img.resize(CS + 512)
    img.resize(4 * CS, PreallocateMode.ZERO)
    assert img.read(0, CS + 512) == pattern(4 * CS)[: CS + 512]
    assert img.read(CS + 512, 3 * CS - 512) == bytes(3 * CS - 512)


@pytest.mark.clause("access.resize.grow-zero")
def test_grow_zero_hides_a_longer_backing() -> None:
    base = new_raw_base(pattern(8 * CS, 4))
    _, img = new_qcow2(2 * CS, backing=base)
    img.resize(6 * CS, PreallocateMode.ZERO)
    assert img.read(2 * CS, 4 * CS) == bytes(4 * CS)


@pytest.mark.clause("access.resize.grow-none")
def test_grow_none_may_show_a_longer_backing() -> None:
    base = new_raw_base(pattern(8 * CS, 4))
    _, img = new_qcow2(2 * CS, backing=base)
    img.resize(6 * CS, PreallocateMode.NONE)
    assert img.size == 6 * CS
    # NONE leaves the contents open; with a longer backing they are the backing's.
    assert img.read(2 * CS, 4 * CS) == pattern(8 * CS, 4)[2 * CS : 6 * CS]


@pytest.mark.clause("access.resize.grow-format-allocate", "access.resize.grow-full-allocate",
                    "access.resize.grow-write-data")
@pytest.mark.parametrize("mode", [PreallocateMode.FORMAT_ALLOCATE, PreallocateMode.FULL_ALLOCATE,
                                  PreallocateMode.WRITE_DATA])
def test_grow_with_allocation_reads_zero_and_maps(mode: PreallocateMode) -> None:
    _, img = new_qcow2(2 * CS)
    img.write(pattern(2 * CS), 0)
    img.resize(CS + 512)
    img.resize(5 * CS, mode)
    assert img.read(CS + 512, 4 * CS - 512) == bytes(4 * CS - 512)
    mapping, _ = img.get_mapping(3 * CS, CS)
    assert isinstance(mapping, RawMapping)


@pytest.mark.clause("access.parallel.same-result")
def test_parallel_reads_and_writes_match_serial() -> None:
    _, a = new_qcow2(64 * CS, cluster_size=512)
    _, b = new_qcow2(64 * CS, cluster_size=512)
    b.set_read_parallelization(4)
    b.set_write_parallelization(4)
    data = pattern(40 * CS, 11)
    a.write(data, 1234)
    b.write(data, 1234)
    assert a.read(0, 64 * CS) == b.read(0, 64 * CS)
    with pytest.raises(InvalidRequestError):
        b.set_read_parallelization(0)


@pytest.mark.clause("access.close.flushes", "storage.memory.survives-reopen",
                    "access.flush.no-sync")
def test_memory_image_survives_close_and_reopen() -> None:
    storage, img = new_qcow2()
    with img:
        img.write(pattern(3 * CS), 100)
    assert img.closed
    with open_image(storage) as again:
        assert again.read(100, 3 * CS) == pattern(3 * CS)


class CountingStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__(name="counting")
        self.flushes = 0
        self.syncs = 0

    def flush(self) -> None:
        self.flushes += 1

    def sync(self) -> None:
        self.syncs += 1


@pytest.mark.clause("access.flush.no-sync", "access.sync.no-flush")
def test_flush_does_not_sync_and_sync_does_not_flush() -> None:
    storage = CountingStorage()
    create_image(storage, 16 * CS, cluster_size=CS)
    img = open_image(storage, writable=True, l2_cache_tables=4)
    storage.flushes = storage.syncs = 0
    img.write(b"x", 0)
    img.flush()
    assert (storage.flushes, storage.syncs) == (1, 0)
    snapshot = storage.snapshot()
    img.write(b"y", 0)  # in place: only data reaches storage, no metadata
    img.sync()
    assert storage.syncs == 1
    assert storage.flushes == 1
    assert storage.snapshot() != snapshot


@pytest.mark.clause("access.invalidate-cache")
def test_invalidate_cache_drops_unflushed_metadata() -> None:
    _storage, img = new_qcow2()
    img.write(b"q" * 10, 0)
    img.flush()
    img.write(b"r" * 10, 5 * CS)  # allocates: the L2 update stays in the cache
    img.invalidate_cache()
    assert img.read(0, 10) == b"q" * 10
    assert img.read(5 * CS, 10) == bytes(10)


@pytest.mark.clause("access.ensure-data-mapping")
def test_ensure_data_mapping_returns_writable_storage() -> None:
    _, img = new_qcow2()
    storage, host, length = img.ensure_data_mapping(CS + 10, 3 * CS, overwrite=False)
    assert 0 < length <= CS - 10
    storage.write(b"direct", host)
    assert img.read(CS + 10, 6) == b"direct"


@pytest.mark.clause("access.mapping.special-compressed", "qcow2.compressed.cow-overwrite")
def test_special_mapping_reads_through_the_layer() -> None:
    import zlib

    storage, img = new_qcow2(4 * CS)
    img.close()
    raw = pattern(CS, 8)
    comp = zlib.compressobj(6, zlib.DEFLATED, -12)
    data = comp.compress(raw) + comp.flush()
    # Store the compressed data in a cluster of its own and point guest cluster 1 at it.
    from pyimago.reference.qcow2.driver import Qcow2Driver
    from pyimago.reference.qcow2.tables import ClusterType, L2Entry

    driver = Qcow2Driver(storage, writable=True)
    host = driver._allocator.allocate(1) + 512
    assert len(data) < CS - 512
    storage.write(data, host)
    sectors = (len(data) + 511) // 512
    driver._replace_entry(CS, L2Entry(ClusterType.COMPRESSED, host, False, sectors))
    driver.flush()
    access = FormatAccess(driver)
    mapping, _length = access.get_mapping(CS, CS)
    assert isinstance(mapping, SpecialMapping) and mapping.layer is access
    assert access.read(CS, CS) == raw
    access.write(b"w", CS + 5)
    assert access.read(CS, CS) == raw[:5] + b"w" + raw[6:]
