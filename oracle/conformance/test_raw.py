"""The raw format (specs/raw.toml) and storage objects (specs/storage.toml)."""

from __future__ import annotations

import pytest
from pyimago.oracle.conformance._support import ImageKit, KiB, pattern
from pyimago.reference import (
    EofMapping,
    IndirectMapping,
    MemoryStorage,
    PreallocateMode,
    RawMapping,
)

pytestmark = pytest.mark.needs("raw")


class NoGate:
    """A gate that fails the test if it is ever asked."""

    def check(self, path: str, *, format: str | None, writable: bool, referrer: str) -> None:
        raise AssertionError(f"a raw image asked the gate about {path}")


@pytest.mark.clause("raw.passthrough")
def test_raw_maps_every_offset_to_itself(img: ImageKit) -> None:
    path = img.tmp / "disk.raw"
    path.write_bytes(pattern(1, 100 * KiB + 3))
    for writable in (False, True):
        with img.open(path, writable=writable, format="raw") as disk:
            assert disk.size == 100 * KiB + 3, f"raw size {disk.size} is not the file's size"
            for offset in (0, 4097, 100 * KiB):
                m, length = disk.get_mapping(offset, 1000)
                assert isinstance(m, RawMapping), f"raw offset {offset} maps as {m}"
                assert m.offset == offset, f"raw offset {offset} maps to storage offset {m.offset}"
                assert m.writable == writable, f"writable={m.writable} on a {writable} open"
                assert length > 0
    with img.open(path, format="raw") as disk:
        disk.write(b"raw!", 5000)
    data = path.read_bytes()
    assert data[5000:5004] == b"raw!", "a raw write did not land at the same file offset"
    assert len(data) == 100 * KiB + 3


@pytest.mark.clause("raw.eof")
def test_raw_reports_eof_at_its_size(img: ImageKit) -> None:
    disk = img.open(MemoryStorage(pattern(2, 10000)), format="raw", writable=False)
    with disk:
        for offset in (10000, 20000):
            m, n = disk.get_mapping(offset, 512)
            assert isinstance(m, EofMapping) and n == 0, f"at {offset}: {m}, {n}"


@pytest.mark.clause("raw.no-backing")
def test_raw_has_no_backing(img: ImageKit) -> None:
    path = img.tmp / "disk.raw"
    path.write_bytes(pattern(3, 64 * KiB))
    with img.open(path, format="raw", gate=NoGate()) as disk:
        pos = 0
        while pos < disk.size:
            m, n = disk.get_shallow_mapping(pos, disk.size - pos)
            assert not isinstance(m, IndirectMapping), f"raw returned {m}"
            pos += n
        disk.discard_to_backing(4 * KiB, 8 * KiB)
        assert disk.read(4 * KiB, 8 * KiB) == bytes(8 * KiB), (
            "discard_to_backing on raw must leave the range reading zero"
        )
        assert disk.read(0, 4 * KiB) == pattern(3, 4 * KiB)


@pytest.mark.needs("resize")
@pytest.mark.clause("raw.resize", "access.resize.shrink-discards")
def test_raw_resize_resizes_the_storage(img: ImageKit) -> None:
    path = img.tmp / "disk.raw"
    path.write_bytes(pattern(4, 64 * KiB))
    with img.open(path, format="raw") as disk:
        disk.resize(32 * KiB)
        assert disk.size == 32 * KiB
    assert path.stat().st_size == 32 * KiB, "shrinking did not truncate the file"
    for mode in PreallocateMode:
        with img.open(path, format="raw") as disk:
            old = disk.size
            disk.resize(old + 16 * KiB, mode)
            assert disk.size == old + 16 * KiB
            if mode is not PreallocateMode.NONE:
                assert disk.read(old, 16 * KiB) == bytes(16 * KiB), f"{mode.name}: new range"
        assert path.stat().st_size == old + 16 * KiB, f"{mode.name}: the file was not grown"
    with img.open(path, format="raw", writable=False) as disk:
        assert disk.read(0, 32 * KiB) == pattern(4, 32 * KiB), "resizing changed the old data"


@pytest.mark.clause("storage.read.past-eof-zero", "qcow2.metadata.outside-file")
def test_storage_reads_past_eof_read_zeroes(img: ImageKit) -> None:
    store = MemoryStorage(b"abc")
    assert store.read(1, 10) == b"bc" + bytes(8)
    assert store.read(100, 4) == bytes(4)
    path = img.tmp / "short.raw"
    path.write_bytes(b"xyz")
    with img.open(path, format="raw", writable=False) as disk:
        assert disk.read(0, 10) == b"xyz" + bytes(7)
    if img.impl.capabilities.qcow2:
        # A qcow2 image whose last data cluster is cut by the end of the file (QEMU's end
        # mid-cluster) reads zeroes for the missing part.
        image = img.crafted(64 * KiB, writes=[(0, pattern(5, 512))])
        end = -(-len(image.data) // 512) * 512
        image.set_l2_entry(0, (1 << 63) | end)  # read-only: refcounts do not matter here
        cut = bytes(image.data[:end]).ljust(end, b"\0") + pattern(5, 100)
        with img.open_bytes(cut) as disk:
            assert disk.read(0, 512) == pattern(5, 100) + bytes(412), (
                "the part of a data cluster past the end of the file does not read zero"
            )


@pytest.mark.clause("storage.write.extends")
def test_storage_writes_past_the_end_grow_it(img: ImageKit) -> None:
    store = MemoryStorage(b"ab")
    store.write(b"cd", 6)
    assert store.size() == 8 and store.read(0, 8) == b"ab\0\0\0\0cd"
    if img.impl.capabilities.qcow2:
        # Allocation by the implementation grows its storage as needed.
        storage = img.mem(1024 * KiB, "qcow2", cluster_size=512)
        before = storage.size()
        with img.open(storage) as disk:
            disk.write(pattern(6, 100 * KiB), 900 * KiB)
        assert storage.size() > before + 100 * KiB - 512, "the image storage did not grow"
