"""The qcow2 header and its validation (specs/qcow2-header.toml), on crafted images."""

from __future__ import annotations

import struct

import pytest
from pyimago.oracle.conformance._qcow2 import EXT_FEATURE_NAMES, Qcow2Bytes
from pyimago.oracle.conformance._support import ImageKit, KiB, MiB, expect_error, pattern
from pyimago.reference import (
    CorruptImageError,
    InvalidRequestError,
    MemoryStorage,
    UnsupportedFeatureError,
)

pytestmark = pytest.mark.needs("qcow2")


def _refused(img: ImageKit, image: Qcow2Bytes, exc: type[Exception], what: str,
             *, writable: bool = False) -> str:
    error = img.refuses(image, exc, what, writable=writable)
    assert str(error), f"{what}: the error has no message"
    return str(error)


@pytest.mark.clause("qcow2.header.big-endian")
def test_numbers_are_big_endian(img: ImageKit) -> None:
    store = img.mem(3 * MiB + 512, "qcow2", cluster_size=4096)
    raw = store.snapshot()
    assert raw[:4] == b"QFI\xfb"
    assert struct.unpack_from(">Q", raw, 24)[0] == 3 * MiB + 512, "size is not big-endian"
    assert struct.unpack_from(">I", raw, 20)[0] == 12, "cluster_bits is not big-endian"
    assert struct.unpack_from(">I", raw, 4)[0] == 3, "version is not big-endian"
    # And a crafted big-endian size is read as such.
    image = img.bytes_of(store)
    image.set(size=2 * MiB)
    with img.open_bytes(image) as disk:
        assert disk.size == 2 * MiB, f"a big-endian size of 2 MiB reads as {disk.size}"


@pytest.mark.clause("qcow2.header.magic", "backing.probe")
def test_the_magic_identifies_qcow2(img: ImageKit) -> None:
    image = img.crafted()
    image.data[3] = 0xFA
    with img.open_bytes(image) as disk:  # probed: not qcow2, so raw
        assert disk.read(0, 4) == b"QFI\xfa", "a file without the magic was not opened as raw"
    img.refuses(image, CorruptImageError, "no magic, opened as qcow2", format="qcow2")


@pytest.mark.clause("qcow2.header.version")
def test_only_versions_2_and_3(img: ImageKit) -> None:
    for version in (1, 4, 0xFFFFFFFF):
        image = img.crafted()
        image.set(version=version)
        message = _refused(img, image, UnsupportedFeatureError, f"version {version}")
        assert str(version) in message, f"the error does not name version {version}: {message}"


@pytest.mark.clause("qcow2.header.cluster-bits")
def test_cluster_bits_9_to_21(img: ImageKit) -> None:
    cases = {}
    for bits in (0, 8, 22, 63):
        cases[f"cluster_bits {bits}"] = image = img.crafted()
        image.set(cluster_bits=bits)
    img.refuses_all(cases, CorruptImageError)


@pytest.mark.clause("qcow2.header.v3-length")
def test_header_length(img: ImageKit) -> None:
    cases = {}
    for length in (96, 100, 105, 4096):
        cases[f"header_length {length}"] = image = img.crafted()
        image.set(header_length=length)
    img.refuses_all(cases, CorruptImageError)


@pytest.mark.clause("qcow2.header.additional-fields")
def test_unknown_additional_fields_are_preserved(img: ImageKit) -> None:
    image = img.crafted(64 * KiB, cluster_size=4096)
    exts = [(e.type, e.data) for e in image.extensions()]
    old_length = image.header_length
    image.set(header_length=120)
    image.data[old_length:120] = bytes(120 - old_length)
    image.set_extensions(exts, start=120)
    image.data[112:120] = b"FUTURE!!"
    store = MemoryStorage(bytes(image.data))
    with img.open(store) as disk:
        assert disk.read(0, 16) == bytes(16)
        disk.write(b"x", 0)
        disk.resize(128 * KiB)  # rewrites the header (size)
    after = img.bytes_of(store)
    assert after.get("size") == 128 * KiB
    assert after.header_length == 120, f"header_length became {after.header_length}"
    assert bytes(after.data[112:120]) == b"FUTURE!!", (
        f"unknown header bytes 112..119 became {bytes(after.data[112:120])!r}"
    )


@pytest.mark.clause("qcow2.header.size-512")
def test_qcow2_sizes_are_multiples_of_512(img: ImageKit) -> None:
    store = MemoryStorage()
    expect_error(InvalidRequestError, "create a 1000-byte qcow2 image",
                 lambda: img.impl.create_image(store, 1000, format="qcow2"))
    assert store.size() == 0, "a refused create wrote data"
    disk_store = img.mem(64 * KiB, "qcow2")
    before = disk_store.snapshot()
    with img.open(disk_store) as disk:
        expect_error(InvalidRequestError, "resize to 64 KiB + 100",
                     lambda: disk.resize(64 * KiB + 100))
        assert disk.size == 64 * KiB
    assert disk_store.snapshot() == before, "a refused resize changed the image"


@pytest.mark.clause("qcow2.header.backing-name")
def test_backing_name_bounds(img: ImageKit) -> None:
    image = img.crafted(64 * KiB, cluster_size=4096)
    end = max((e.pos + 8 + (len(e.data) + 7) // 8 * 8 for e in image.extensions()),
              default=image.header_length) + 8
    # Exactly backing_file_size bytes: a longer run of bytes after the name is not part of it.
    image.data[end : end + 12] = b"base.rawJUNK"
    image.set(backing_file_offset=end, backing_file_size=8)
    (img.tmp / "base.raw").write_bytes(pattern(1, 64 * KiB))
    path = img.write_file("named.qcow2", image)
    with img.open(path, writable=False) as disk:
        assert disk.read(0, 64) == pattern(1, 64), "backing name not read as exactly its size"
    too_long = Qcow2Bytes(image.data)
    too_long.set(backing_file_size=1024)
    _refused(img, too_long, CorruptImageError, "backing name of 1024 bytes")
    outside = Qcow2Bytes(image.data)
    outside.set(backing_file_offset=4096 - 4, backing_file_size=8)
    _refused(img, outside, CorruptImageError, "backing name crossing the first cluster")


@pytest.mark.clause("qcow2.header.l1-size", "qcow2.l1.index")
def test_l1_table_covers_the_size(img: ImageKit) -> None:
    image = img.crafted(1 * MiB, cluster_size=512)  # one L1 entry maps 64 * 512 B = 32 KiB
    l1 = image.get("l1_size")
    assert l1 * 64 * 512 >= 1 * MiB, f"created image has l1_size {l1} for 1 MiB"
    image.set(l1_size=(1 * MiB) // (64 * 512) - 1)
    _refused(img, image, CorruptImageError, "l1_size too small")


@pytest.mark.clause("qcow2.header.limits")
def test_limits_are_checked_before_allocating(img: ImageKit) -> None:
    cases = {
        "L1 table over 32 MiB": {"l1_size": 32 * MiB // 8 + 1,
                                 "size": (32 * MiB // 8 + 1) * 32 * KiB},
        "refcount table over 8 MiB": {"refcount_table_clusters": 8 * MiB // 512 + 1},
        "L1 offset past 2^56": {"l1_table_offset": 1 << 56},
        "refcount table offset past 2^56": {"refcount_table_offset": 1 << 57},
    }
    images = {}
    for what, fields in cases.items():
        images[what] = image = img.crafted(64 * KiB, cluster_size=512)
        image.set(**fields)
    img.refuses_all(images, CorruptImageError)


@pytest.mark.clause("qcow2.header.refcount-order", "qcow2.refcount.entry-width")
def test_refcount_order_0_to_6(img: ImageKit) -> None:
    for order in (7, 64):
        image = img.crafted()
        image.set(refcount_order=order)
        _refused(img, image, CorruptImageError, f"refcount_order {order}")
    v2 = img.crafted(compat="0.10")
    assert v2.version == 2 and v2.refcount_bits == 16


@pytest.mark.clause("qcow2.extensions.feature-names", "errors.feature-named")
def test_feature_name_table_names_refused_bits(img: ImageKit) -> None:
    image = img.crafted(64 * KiB, cluster_size=4096)
    table = struct.pack(">BB46s", 0, 7, b"frobnication")
    exts = [(e.type, e.data) for e in image.extensions() if e.type != EXT_FEATURE_NAMES]
    image.set_extensions([*exts, (EXT_FEATURE_NAMES, table)])
    image.set(incompatible_features=1 << 7)
    message = _refused(img, image, UnsupportedFeatureError, "incompatible bit 7")
    assert "frobnication" in message, f"the feature name table was not used: {message}"
