"""Compressed clusters (specs/qcow2-compressed.toml), crafted by this suite or made by QEMU."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
from pyimago.oracle.conformance._qcow2 import L2_COMPRESSED, L2_COPIED, Qcow2Bytes, deflate_raw
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    not_applicable,
    pattern,
    qemu_img,
)
from pyimago.reference import CorruptImageError, MemoryStorage, SpecialMapping

pytestmark = pytest.mark.needs("qcow2")

CS = 4096


def _compressible(seed: int) -> bytes:
    """A cluster of data that compresses well but is not trivially uniform."""
    return (pattern(seed, 64) + bytes(192)) * (CS // 256)


def _zstd() -> Callable[[bytes], bytes]:
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        not_applicable("the zstandard module is not installed")

    def compress(data: bytes) -> bytes:
        return bytes(zstandard.ZstdCompressor().compress(data))

    return compress


def _compress_in_place(image: Qcow2Bytes, guest: int, *, at: int = 0,
                       compress: Callable[[bytes], bytes] = deflate_raw,
                       trailer: bytes = b"") -> int:
    """Turn the standard cluster mapping ``guest`` into a compressed one stored ``at`` bytes
    into its own host cluster; return the compressed length."""
    host = image.host_offset(guest)
    data = bytes(image.data[host : host + CS]).ljust(CS, b"\0")
    comp = compress(data) + trailer
    assert at + len(comp) <= CS
    image.data[host : host + CS] = bytes(at) + comp + bytes(CS - at - len(comp))
    image.set_l2_entry(guest, image.compressed_entry(host + at, len(comp)))
    return len(comp)


def _image(img: ImageKit, **opts: object) -> Qcow2Bytes:
    return img.crafted(64 * KiB, cluster_size=CS, writes=[(i * CS, _compressible(i))
                                                          for i in range(4)], **opts)


@pytest.mark.clause("qcow2.compressed.layout", "qcow2.compressed.zlib",
                    "access.mapping.special-compressed")
def test_compressed_clusters_read_decompressed(img: ImageKit) -> None:
    image = _image(img)
    _compress_in_place(image, 0)
    _compress_in_place(image, CS, at=480)  # not sector-aligned, over two sectors
    _compress_in_place(image, 2 * CS, trailer=b"\xde\xad" * 50)  # trailing bytes ignored
    assert not image.errors(), image.errors()
    with img.open_bytes(image) as disk:
        for i in range(4):
            assert disk.read(i * CS, CS) == _compressible(i), f"compressed cluster {i} misread"
        for i in range(3):
            m, _ = disk.get_mapping(i * CS, CS)
            assert isinstance(m, SpecialMapping), f"compressed cluster {i} maps as {m}"
        assert disk.read(CS - 10, 20) == _compressible(0)[-10:] + _compressible(1)[:10]


@pytest.mark.needs("backing")
@pytest.mark.clause("access.mapping.special-compressed")
def test_compressed_clusters_in_a_backing_are_special(img: ImageKit) -> None:
    image = _image(img)
    _compress_in_place(image, CS)
    base = img.open_bytes(image)
    top = img.open(img.mem(64 * KiB, "qcow2", cluster_size=CS, backing_file="b",
                           backing_fmt="qcow2"), backing=base)
    with top, base:
        m, _ = top.get_mapping(CS, CS)
        assert isinstance(m, SpecialMapping), f"the backing's compressed cluster maps as {m}"
        assert top.read(CS, CS) == _compressible(1)
        top.write(b"\x01" * 10, CS + 5)  # copy-on-write from a compressed backing cluster
        assert top.read(CS, CS) == _compressible(1)[:5] + b"\x01" * 10 + _compressible(1)[15:]


@pytest.mark.clause("qcow2.compressed.zlib", "errors.corrupt-not-stdlib")
def test_malformed_zlib_streams_are_corrupt(img: ImageKit) -> None:
    image = _image(img)
    length = _compress_in_place(image, 0)
    host = image.compressed_range(image.l2_entry(0))[0]
    image.data[host : host + length] = b"\xff" * length
    img.refuses(image, CorruptImageError, "a garbage zlib stream")
    # A stream cut short that ends exactly at its sector's end: it cannot produce a cluster.
    short = _image(img)
    length = _compress_in_place(short, 0)
    host = short.compressed_range(short.l2_entry(0))[0]
    stream = bytes(short.data[host : host + length // 2])
    at = 512 - len(stream)
    short.data[host : host + 512] = bytes(at) + stream
    short.set_l2_entry(0, short.compressed_entry(host + at, len(stream)))
    img.refuses(short, CorruptImageError, "a zlib stream that ends before a full cluster")


@pytest.mark.clause("qcow2.compressed.zstd")
def test_zstd_clusters(img: ImageKit) -> None:
    compress = _zstd()
    image = _image(img, compression_type="zstd")
    _compress_in_place(image, 0, compress=compress)
    _compress_in_place(image, CS, at=1000, compress=compress)
    with img.open_bytes(image) as disk:
        assert disk.read(0, 2 * CS) == _compressible(0) + _compressible(1), "zstd cluster misread"
    length = image.compressed_range(image.l2_entry(0))[1]
    host = image.compressed_range(image.l2_entry(0))[0]
    image.data[host : host + min(length, 64)] = b"\x00" * min(length, 64)
    img.refuses(image, CorruptImageError, "a zstd frame with a zeroed head")


@pytest.mark.clause("qcow2.compressed.cow-overwrite", "qcow2.compressed.copied-clear",
                    "access.cow.partial-cluster")
def test_writing_a_compressed_cluster_decompresses_it(img: ImageKit) -> None:
    image = _image(img)
    _compress_in_place(image, 0)
    _compress_in_place(image, 2 * CS)
    host0 = image.host_offset(0) or image.compressed_range(image.l2_entry(0))[0]
    store = MemoryStorage(bytes(image.data))
    with img.open(store) as disk:
        disk.write(b"\x02" * 100, 1000)
        disk.write(pattern(9, 1000), 3 * CS + 7)  # the same L2 table, another cluster
        assert disk.read(0, CS) == _compressible(0)[:1000] + b"\x02" * 100 + _compressible(0)[1100:]
    after = img.bytes_of(store)
    entry = after.l2_entry(0)
    assert not entry & L2_COMPRESSED, f"the written cluster is still compressed: {entry:#x}"
    other = after.l2_entry(2 * CS)
    assert other & L2_COMPRESSED and not other & L2_COPIED, (
        f"the untouched compressed entry became {other:#x}"
    )
    assert after.refcount(host0 // CS) == 0 or after.host_offset(0) == host0, (
        "the compressed cluster's host cluster was not released"
    )
    assert not after.problems(), after.problems()


@pytest.mark.clause("qcow2.compressed.shared-sector")
def test_compressed_clusters_sharing_a_host_cluster(img: ImageKit) -> None:
    image = _image(img)
    host_a, host_b = image.host_offset(0), image.host_offset(CS)
    comp_a = deflate_raw(_compressible(0))
    comp_b = deflate_raw(_compressible(1))
    assert len(comp_a) + len(comp_b) < CS
    blob = comp_a + comp_b
    image.data[host_a : host_a + CS] = blob + bytes(CS - len(blob))
    image.set_l2_entry(0, image.compressed_entry(host_a, len(comp_a)))
    image.set_l2_entry(CS, image.compressed_entry(host_a + len(comp_a), len(comp_b)))
    image.set_refcount(host_a // CS, 2)
    image.set_refcount(host_b // CS, 0)
    assert not image.problems(), image.problems()
    store = MemoryStorage(bytes(image.data))
    with img.open(store) as disk:
        assert disk.read(0, 2 * CS) == _compressible(0) + _compressible(1)
        disk.write(pattern(10, CS), 0)
        assert disk.read(CS, CS) == _compressible(1), "freeing one compressed cluster broke another"
    middle = img.bytes_of(store)
    assert middle.refcount(host_a // CS) == 1, "the shared host cluster's refcount is wrong"
    assert not middle.problems(), middle.problems()
    with img.open(store) as disk:
        disk.write(pattern(11, CS), CS)
    after = img.bytes_of(store)
    assert not after.problems(), after.problems()


@pytest.mark.clause("qcow2.compressed.shared-sector", "interop.qemu-read")
def test_qemu_compressed_images(img: ImageKit) -> None:
    src = img.tmp / "src.raw"
    data = b"".join(_compressible(i) for i in range(32))
    src.write_bytes(data)
    path = img.tmp / "c.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CS}", src,
             path)
    with img.open(path) as disk:
        assert disk.read(0, len(data)) == data, "QEMU's compressed image misread"
        disk.write(b"\x03" * 10, 5 * CS + 1)
        disk.write(pattern(12, CS), 9 * CS)
        assert disk.read(4 * CS, CS) == _compressible(4)
    problems = Qcow2Bytes(path.read_bytes()).problems()
    assert not problems, problems
