"""Host cluster allocation: freed clusters are reused, runs are contiguous."""

from __future__ import annotations

import pytest
from pyimago.reference import (
    FormatAccess,
    MemoryStorage,
    PreallocateMode,
    RawMapping,
    create_image,
    open_image,
)
from pyimago.reference.qcow2.allocation import ClusterAllocator
from pyimago.reference.qcow2.refcounts import RefcountTable
from pyimago_tests_reference_helpers import KiB, assert_consistent, header_of


def _host(img: FormatAccess, guest: int) -> int:
    mapping, _ = img.get_mapping(guest, 1)
    assert isinstance(mapping, RawMapping), mapping
    return mapping.offset


def _new(size: int = 256 * KiB, cluster_size: int = 4 * KiB) -> MemoryStorage:
    storage = MemoryStorage()
    create_image(storage, size, cluster_size=cluster_size)
    return storage


@pytest.mark.clause("qcow2.refcount.no-leaks", "access.discard-to-zero.frees")
def test_freed_cluster_is_reused() -> None:
    storage = _new()
    with open_image(storage, writable=True, backing=None) as img:
        img.write(b"a" * 4096, 0)
        img.write(b"b" * 4096, 4096)
        freed = _host(img, 0)
        img.discard_to_any(0, 4096)
        end = storage.size()
        img.write(b"c" * 4096, 64 * KiB)
        assert _host(img, 64 * KiB) == freed
        assert storage.size() == end
        assert img.read(64 * KiB, 4096) == b"c" * 4096
        assert img.read(4096, 4096) == b"b" * 4096
    assert_consistent(storage.snapshot())


@pytest.mark.clause("qcow2.refcount.no-leaks")
def test_lowest_free_cluster_first() -> None:
    storage = _new()
    with open_image(storage, writable=True, backing=None) as img:
        for i in range(6):
            img.write(bytes([i + 1]) * 4096, i * 4096)
        hosts = [_host(img, i * 4096) for i in range(6)]
        img.discard_to_any(4 * 4096, 4096)
        img.discard_to_any(1 * 4096, 4096)
        img.write(b"x" * 4096, 32 * 4096)
        img.write(b"y" * 4096, 33 * 4096)
        assert [_host(img, 32 * 4096), _host(img, 33 * 4096)] == [hosts[1], hosts[4]]
    assert_consistent(storage.snapshot())


@pytest.mark.clause("qcow2.refcount.no-leaks", "qcow2.zero.v2-none")
def test_v2_discard_frees_and_reuses() -> None:
    storage = MemoryStorage()
    create_image(storage, 64 * KiB, cluster_size=512, compat="0.10")
    with open_image(storage, writable=True, backing=None) as img:
        img.write(b"a" * 512, 0)
        host = _host(img, 0)
        img.discard_to_zero(0, 512)
        img.write(b"b" * 512, 8 * KiB)
        assert _host(img, 8 * KiB) == host
    assert_consistent(storage.snapshot())


@pytest.mark.clause("create.preallocation", "access.resize.grow-full-allocate")
@pytest.mark.parametrize("prealloc", [PreallocateMode.FULL_ALLOCATE, PreallocateMode.WRITE_DATA,
                                      PreallocateMode.FORMAT_ALLOCATE])
def test_multi_cluster_runs_are_contiguous(prealloc: PreallocateMode) -> None:
    storage = _new(size=64 * KiB)
    with open_image(storage, writable=True, backing=None) as img:
        img.write(b"a" * 4096, 0)
        img.discard_to_any(0, 4096)  # a free hole: a run must not be split into it
        img.resize(512 * KiB, prealloc)
        if prealloc is PreallocateMode.FORMAT_ALLOCATE:
            assert img.read(64 * KiB, 448 * KiB) == bytes(448 * KiB)
            img.write(b"z" * 448 * KiB, 64 * KiB)
        hosts = [_host(img, g) for g in range(64 * KiB, 512 * KiB, 4096)]
        assert hosts == list(range(hosts[0], hosts[0] + len(hosts) * 4096, 4096))
    assert_consistent(storage.snapshot())


@pytest.mark.clause("qcow2.l1.growth")
def test_grown_l1_table_is_contiguous() -> None:
    storage = MemoryStorage()
    create_image(storage, 64 * KiB, cluster_size=512)
    with open_image(storage, writable=True, backing=None) as img:
        img.write(b"a", 0)
        # 64 L2 entries per table: 32 KiB per L1 entry, 64 L1 entries per cluster.
        img.resize(64 * 32 * KiB * 3)
        img.write(b"b", img.size - 1)
    data = storage.snapshot()
    h = header_of(data)
    assert h.l1_size == 64 * 3
    assert_consistent(data)
    with open_image(MemoryStorage(data), backing=None) as img:
        assert img.read(0, 1) == b"a" and img.read(img.size - 1, 1) == b"b"


def test_allocator_directly() -> None:
    storage = _new(size=64 * KiB, cluster_size=512)
    h = header_of(storage.snapshot())
    allocator = ClusterAllocator(storage, 9)
    table = RefcountTable(
        storage,
        cluster_bits=9,
        refcount_order=4,
        table_offset=h.refcount_table_offset,
        table_clusters=1,
        bump=allocator.bump,
        peek_end=allocator.peek_end,
        write_header=lambda offset, clusters: None,
    )
    allocator.attach(table)
    end = allocator.peek_end()
    first = allocator.allocate(3)
    assert first == end * 512
    assert [allocator.refcount(first + i * 512) for i in range(3)] == [1, 1, 1]
    allocator.free(first + 512)
    assert allocator.allocate(1) == first + 512
    allocator.free(first, 3)
    assert allocator.allocate(2) == (end + 3) * 512  # runs come from the end
    assert allocator.allocate(1) == first
