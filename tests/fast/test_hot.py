"""The hot read path (fast/_hot.py): a small read inside one cached cluster of plain data
answers from the storage's map in one frame; everything else falls back to the full path
with the same result and the same errors."""

from __future__ import annotations

import array
import os
import subprocess
from pathlib import Path

import pytest
from pyimago import fast, reference
from pyimago.fast import CorruptImageError, InvalidRequestError

from .conftest import assert_qemu_check_clean, require_qemu

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB


def _image(tmp_path: Path, size: int = 4 * MiB + 3 * 512, **opts: object) -> Path:
    """A qcow2 image whose last cluster is partial, with data, zero and unallocated
    clusters (and a compressed one when asked)."""
    path = tmp_path / "hot.qcow2"
    fast.create_image(str(path), size, **opts)
    with fast.open_image(str(path), writable=True) as img:
        img.write(os.urandom(2 * MiB), 0)
        img.write(os.urandom(size - 4 * MiB), 4 * MiB)
        img.write_zeroes(MiB, CS)
    return path


def _truth(path: Path, offset: int, n: int) -> bytes:
    with reference.open_image(str(path)) as ref:
        return ref.read(offset, n)


class _NoSlowPath(Exception):
    pass


def _forbid_slow_path(img: fast.FormatAccess, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise _NoSlowPath

    monkeypatch.setattr(img.driver, "readinto", refuse)


@pytest.mark.clause("access.read.no-short", "access.read.past-end-zero")
def test_hot_reads_equal_the_reference_for_every_kind_of_request(tmp_path: Path) -> None:
    path = _image(tmp_path)
    size = 4 * MiB + 3 * 512
    cases = [
        (0, 4 * KiB), (CS - 512, 512), (CS - 100, 200),  # the last crosses a cluster end
        (MiB + 4 * KiB, 4 * KiB),  # a zero cluster
        (3 * MiB, 4 * KiB),  # unallocated
        (size - 700, 700), (size - 512, 4 * KiB),  # the partial last cluster, past the end
        (size + CS, 4 * KiB), (5 * MiB, 0), (12345, 1),
    ]
    with fast.open_image(str(path)) as img:
        img.readinto(bytearray(CS), 0)  # the L2 table is cached from here on
        for offset, n in cases:
            want = _truth(path, offset, n)
            got_mv = memoryview(bytearray(n))
            img.readinto(got_mv, offset)
            got_ba = bytearray(n)
            img.readinto(got_ba, offset)
            got_arr = array.array("B", bytes(n))
            img.readinto(got_arr, offset)
            assert bytes(got_mv) == bytes(got_ba) == got_arr.tobytes() == want, (offset, n)
            assert img.read(offset, n) == want


def test_the_hot_path_serves_cached_plain_data_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _image(tmp_path)
    with fast.open_image(str(path)) as img:
        buf = bytearray(4 * KiB)
        img.readinto(buf, 0)
        _forbid_slow_path(img, monkeypatch)
        img.readinto(buf, 8 * KiB)
        assert bytes(buf) == _truth(path, 8 * KiB, 4 * KiB)
        # Not plain data, or not inside one cluster: the full path, which is refused here.
        for offset, n in ((MiB, 4 * KiB), (3 * MiB, 4 * KiB), (CS - 512, 1024)):
            with pytest.raises(_NoSlowPath):
                img.readinto(bytearray(n), offset)


def test_compressed_clusters_take_the_full_path(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    fast.create_image(str(src), MiB)
    with fast.open_image(str(src), writable=True) as img:
        img.write(b"abcd" * (MiB // 4), 0)
    require_qemu()
    comp = tmp_path / "comp.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(comp)], check=True)
    with fast.open_image(str(comp)) as img:
        img.readinto(bytearray(4 * KiB), 0)
        buf = memoryview(bytearray(4 * KiB))
        img.readinto(buf, 8 * KiB)
        assert bytes(buf) == b"abcd" * KiB


@pytest.mark.clause("access.range.overflow")
def test_bad_requests_are_refused_as_by_the_full_path(tmp_path: Path) -> None:
    path = _image(tmp_path)
    with fast.open_image(str(path)) as img:
        img.readinto(bytearray(CS), 0)
        for offset in (-4096, True, 4096.0, "4096"):
            with pytest.raises(InvalidRequestError):
                img.readinto(bytearray(4 * KiB), offset)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            img.readinto(b"read-only buffer", 0)
        # A buffer of another item size counts bytes, as the full path does.
        words = array.array("H", bytes(4 * KiB))
        img.readinto(words, 0)
        assert words.tobytes() == _truth(path, 0, 4 * KiB)


def test_writes_discards_and_cache_drops_are_seen(tmp_path: Path) -> None:
    path = _image(tmp_path)
    with fast.open_image(str(path), writable=True) as img:
        buf = bytearray(4 * KiB)
        img.readinto(buf, 0)
        img.write(b"N" * 4 * KiB, 0)
        img.readinto(buf, 0)
        assert bytes(buf) == b"N" * 4 * KiB
        img.discard_to_zero(0, CS)
        img.readinto(buf, 0)
        assert bytes(buf) == bytes(4 * KiB)
        img.write(b"M" * 4 * KiB, 0)
        img.invalidate_cache()  # unwritten metadata is forgotten: the tables on storage
        img.readinto(buf, 0)
        full_path = bytearray(4 * KiB)
        fast.FormatAccess.readinto(img, full_path, 0)
        assert buf == full_path != b"M" * 4 * KiB
        img.resize(CS // 2)
        img.readinto(buf, CS // 2 - 512)
        fast.FormatAccess.readinto(img, full_path, CS // 2 - 512)
        assert buf == full_path and buf[512:] == bytes(4 * KiB - 512)
    with fast.open_image(str(path)) as img:
        img.close()
        with pytest.raises(ValueError, match="closed"):
            img.readinto(bytearray(4 * KiB), 0)


def test_a_damaged_l1_entry_is_reported_even_when_its_table_is_cached(tmp_path: Path) -> None:
    """The cache holds tables under their plain pointer values only: an L1 entry with a
    reserved bit set does not find the cached table (qcow2.corrupt: the slow path says)."""
    path = _image(tmp_path)
    with fast.open_image(str(path)) as img:
        img.readinto(bytearray(4 * KiB), 0)
        layer = img.driver
        layer._l1[0] |= 1 << 62  # type: ignore[union-attr]  # reserved in L1 entries
        with pytest.raises(CorruptImageError):
            img.readinto(bytearray(4 * KiB), 0)


def test_storage_growth_past_the_map_falls_back_to_pread(tmp_path: Path) -> None:
    path = _image(tmp_path, size=8 * MiB)
    with fast.open_image(str(path), writable=True) as img:
        img.readinto(bytearray(4 * KiB), 0)
        # New clusters land past the end of the map made at open.
        data = os.urandom(4 * KiB)
        img.write(data, 7 * MiB)
        got = bytearray(4 * KiB)
        img.readinto(got, 7 * MiB)
        assert bytes(got) == data


def test_large_requests_of_wide_items_stay_inside_their_cluster(tmp_path: Path) -> None:
    """A buffer of 2-byte items counts 2 bytes an item: a 48 KiB request at 32 KiB into a
    64 KiB cluster crosses into the next one, whose host cluster does not follow."""
    path = tmp_path / "scattered.qcow2"
    fast.create_image(str(path), MiB)
    with fast.open_image(str(path), writable=True) as img:
        for c in (0, 2, 1):  # host order: guest clusters 0, 2, 1
            img.write(bytes([c + 1]) * CS, c * CS)
    with fast.open_image(str(path)) as img:
        img.readinto(bytearray(CS), 0)
        words = array.array("H", bytes(48 * KiB))
        img.readinto(words, 32 * KiB)
        assert words.tobytes() == _truth(path, 32 * KiB, 48 * KiB)
        big = bytearray(CS)
        img.readinto(big, 0)  # one whole cluster: read with preadv
        assert big == _truth(path, 0, CS)


# -- writes ------------------------------------------------------------------------------


def _forbid_slow_write(img: fast.FormatAccess, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise _NoSlowPath

    monkeypatch.setattr(img.driver, "write", refuse)


@pytest.mark.clause("access.write.no-short")
def test_in_place_writes_take_the_hot_path_and_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _image(tmp_path)
    want = bytearray(_truth(path, 0, 4 * MiB))
    with fast.open_image(str(path), writable=True) as img:
        img.write(b"w" * 512, 0)  # the full path: the table is cached, the index built
        want[0:512] = b"w" * 512
        _forbid_slow_write(img, monkeypatch)
        for offset, data in ((8 * KiB, b"a" * 4 * KiB), (CS - 100, b"b" * 100),
                             (2 * CS + 1, memoryview(b"c" * 3000)),
                             (3 * CS, bytearray(b"d" * CS)),
                             (4 * CS, array.array("H", b"ef" * 1000))):
            img.write(data, offset)  # type: ignore[arg-type]
            raw = bytes(memoryview(data).cast("B"))  # type: ignore[arg-type]
            want[offset : offset + len(raw)] = raw
        # Zero, unallocated, crossing a cluster end: the full path (refused here).
        for offset, n in ((MiB, 512), (3 * MiB, 512), (CS - 100, 200)):
            with pytest.raises(_NoSlowPath):
                img.write(b"x" * n, offset)
        monkeypatch.undo()
        assert img.read(0, 4 * MiB) == bytes(want)
    assert _truth(path, 0, 4 * MiB) == bytes(want)
    assert fast.check(str(path)).clean


@pytest.mark.clause("access.write.read-only", "access.write.past-end", "access.range.overflow")
def test_bad_writes_are_refused_as_by_the_full_path(tmp_path: Path) -> None:
    path = _image(tmp_path)
    size = 4 * MiB + 3 * 512
    with fast.open_image(str(path)) as img:
        img.readinto(bytearray(512), 0)
        with pytest.raises(fast.ReadOnlyError):
            img.write(b"r" * 512, 0)
    with fast.open_image(str(path), writable=True) as img:
        img.write(b"w" * 512, 0)
        for offset in (-512, True, 512.0):
            with pytest.raises(InvalidRequestError):
                img.write(b"x" * 512, offset)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="past the disk end"):
            img.write(b"x" * 1024, size - 512)
        img.write(b"", 0)
        img.close()
        with pytest.raises(ValueError, match="closed"):
            img.write(b"x" * 512, 0)
    assert _truth(path, 0, 512) == b"w" * 512


@pytest.mark.clause("qcow2.corrupt.overlap-check", "qcow2.corrupt.mark")
def test_in_place_writes_onto_metadata_are_refused(tmp_path: Path) -> None:
    """An L2 entry pointing at its own table (COPIED): the hot path must refuse the write
    as the full path does -- the image is marked corrupt, the table is not overwritten."""
    path = _image(tmp_path)
    with fast.open_image(str(path)) as img:
        l2 = img.driver._l1[0] & 0x00FFFFFFFFFFFE00  # type: ignore[union-attr]
    with path.open("r+b") as f:
        f.seek(l2 + 8)  # guest cluster 1 -> the L2 table itself
        f.write(((1 << 63) | l2).to_bytes(8, "big"))
    table = path.read_bytes()[l2 : l2 + CS]
    with fast.open_image(str(path), writable=True) as img:
        img.write(b"w" * 512, 0)  # in place, full path: the metadata index is built now
        with pytest.raises(CorruptImageError, match="would overwrite the active L2"):
            img.write(b"\xa5" * 512, CS)
        with pytest.raises(CorruptImageError, match="marked corrupt"):
            img.write(b"w" * 512, 0)
    assert path.read_bytes()[l2 : l2 + CS] == table


def test_clusters_shared_with_a_snapshot_are_copied(tmp_path: Path) -> None:
    require_qemu()
    path = _image(tmp_path)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(path)], check=True)
    before = _truth(path, 0, 2 * MiB)
    with fast.open_image(str(path), writable=True) as img:
        img.readinto(bytearray(512), 0)
        img.write(b"n" * 512, 4 * KiB)
    assert_qemu_check_clean(path)
    subprocess.run(["qemu-img", "snapshot", "-a", "s1", str(path)], check=True)
    assert _truth(path, 0, 2 * MiB) == before


@pytest.mark.clause("backing.shorter", "access.mapping.eof-top-only")
def test_unallocated_clusters_read_the_backing_through_its_hot_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A top cluster that is unallocated shows the backing (zeroes past its end); the
    request goes straight to the backing image's own readinto."""
    base = tmp_path / "base.qcow2"
    fast.create_image(str(base), 2 * MiB)
    base_data = os.urandom(2 * MiB)
    with fast.open_image(str(base), writable=True) as img:
        img.write(base_data, 0)
    top = tmp_path / "top.qcow2"
    fast.create_image(str(top), 4 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    with fast.open_image(str(top), writable=True) as img:
        img.write(b"t" * CS, 0)  # cluster 0 is the top's; the table exists from here on
    with fast.open_image(str(top)) as img:
        img.readinto(bytearray(512), 0)
        _forbid_slow_path(img, monkeypatch)
        for offset, n in ((CS + 100, 4 * KiB), (2 * MiB - 512, 512), (3 * MiB, 4 * KiB),
                          (5 * CS, CS)):
            got = bytearray(n)
            img.readinto(got, offset)
            assert bytes(got) == (base_data + bytes(2 * MiB))[offset : offset + n]
        got = bytearray(4 * KiB)
        img.readinto(got, 4 * KiB)
        assert got == b"t" * 4 * KiB


def test_an_entry_with_only_the_copied_flag_is_unallocated(tmp_path: Path) -> None:
    """QEMU reads an L2 entry with no host offset as unallocated, COPIED or not: zeroes
    here (no backing), never the header at host offset 0."""
    path = _image(tmp_path)
    with fast.open_image(str(path)) as img:
        l2 = img.driver._l1[0] & 0x00FFFFFFFFFFFE00  # type: ignore[union-attr]
    with path.open("r+b") as f:
        f.seek(l2 + 8)  # guest cluster 1
        f.write((1 << 63).to_bytes(8, "big"))
    with fast.open_image(str(path)) as img:
        img.readinto(bytearray(512), 0)
        got = bytearray(4 * KiB)
        img.readinto(got, CS)
        assert got == bytes(4 * KiB)
