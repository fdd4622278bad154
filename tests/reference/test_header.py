"""qcow2 header: parse/pack round trips and every validation of ``header._validate``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyimago.reference import CorruptImageError, UnsupportedFeatureError
from pyimago.reference.qcow2.header import (
    QCowHeader,
    l2_entries,
    pack_header,
    parse_header,
    required_l1_size,
)
from pyimago_tests_reference_helpers import MiB, header_of, make_image, qemu_img

V2 = QCowHeader(
    version=2,
    backing_file_offset=0,
    backing_file_size=0,
    cluster_bits=16,
    size=10 * MiB,
    crypt_method=0,
    l1_size=1,
    l1_table_offset=3 << 16,
    refcount_table_offset=1 << 16,
    refcount_table_clusters=1,
    nb_snapshots=0,
    snapshots_offset=0,
)
V3 = replace(V2, version=3, header_length=104)
V3_ZSTD = replace(V3, header_length=112, compression_type=1, incompatible_features=1 << 3)


def _parse(h: QCowHeader, cluster_pad: bool = True) -> QCowHeader:
    data = pack_header(h)
    if cluster_pad:
        data += bytes(64)
    return parse_header(data)


@pytest.mark.clause("qcow2.header.magic", "qcow2.header.version", "qcow2.header.v3-length")
@pytest.mark.parametrize("header", [V2, V3, V3_ZSTD], ids=["v2", "v3", "v3-compression-type"])
def test_round_trip(header: QCowHeader) -> None:
    packed = pack_header(header)
    assert len(packed) == header.header_length
    assert parse_header(packed) == header
    assert pack_header(parse_header(packed)) == packed


@pytest.mark.clause("qcow2.header.limits")
@given(
    version=st.sampled_from([2, 3]),
    cluster_bits=st.integers(9, 21),
    size_sectors=st.integers(0, 1 << 27),  # within the L1 limit at cluster_bits 9,
    refcount_order=st.integers(0, 6),
    features=st.integers(0, (1 << 64) - 1),
    nb_snapshots=st.integers(0, 65536),
)
def test_round_trip_any_valid(
    version: int,
    cluster_bits: int,
    size_sectors: int,
    refcount_order: int,
    features: int,
    nb_snapshots: int,
) -> None:
    cs = 1 << cluster_bits
    size = size_sectors * 512
    h = QCowHeader(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=required_l1_size(size, cluster_bits),
        l1_table_offset=3 * cs,
        refcount_table_offset=cs,
        refcount_table_clusters=1,
        nb_snapshots=nb_snapshots,
        snapshots_offset=5 * cs if nb_snapshots else 0,
    )
    if version == 3:
        h = replace(
            h,
            incompatible_features=features,
            compatible_features=features ^ 1,
            autoclear_features=features >> 1,
            refcount_order=refcount_order,
            header_length=104,
        )
        # Extended L2 entries (incompatible bit 4) halve the entries per L2 table.
        h = replace(h, l1_size=required_l1_size(size, cluster_bits, h.l2_entry_bytes))
    assert parse_header(pack_header(h)) == h


def test_l1_and_l2_sizes() -> None:
    assert l2_entries(9) == 64
    assert l2_entries(16) == 8192
    assert required_l1_size(0, 16) == 0
    assert required_l1_size(1, 16) == 1
    assert required_l1_size(8192 << 16, 16) == 1
    assert required_l1_size((8192 << 16) + 512, 16) == 2


@pytest.mark.clause("qcow2.header.v3-length")
def test_images_we_create_parse() -> None:
    v3 = header_of(make_image(compat="1.1"))
    assert (v3.version, v3.header_length, v3.compression_type) == (3, 112, 0)
    v2 = header_of(make_image(compat="0.10"))
    assert (v2.version, v2.header_length, v2.refcount_order) == (2, 72, 4)
    zstd = header_of(make_image(compression_type="zstd"))
    assert zstd.compression_type == 1
    assert zstd.incompatible_features & (1 << 3)


@pytest.mark.qemu
@pytest.mark.clause("qcow2.header.v3-length", "qcow2.features.compression-type")
@pytest.mark.parametrize(
    "opts",
    ["compat=0.10", "compat=1.1", "compat=1.1,compression_type=zstd,cluster_size=512",
     "compat=1.1,refcount_bits=1,cluster_size=2M"],
)
def test_qemu_headers_parse(tmp_path: Path, opts: str) -> None:
    path = tmp_path / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, "3M")
    h = header_of(path.read_bytes())
    assert h.size == 3 * MiB
    if "compat=0.10" in opts:
        assert h.version == 2
    else:
        assert h.version == 3 and h.header_length >= 104
    if "zstd" in opts:
        assert h.compression_type == 1 and h.incompatible_features & 8
    if "refcount_bits=1" in opts:
        assert h.refcount_order == 0 and h.cluster_bits == 21


# -- validation: every check names the offending value ------------------------------------------


def _expect(
    header: QCowHeader,
    error: type[Exception],
    *needles: str,
    data: bytes | None = None,
) -> None:
    raw = data if data is not None else pack_header(header) + bytes(64)
    with pytest.raises(error) as info:
        parse_header(raw)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


@pytest.mark.clause("qcow2.header.magic")
def test_truncated_header() -> None:
    _expect(V2, CorruptImageError, "71", data=pack_header(V2)[:71])
    _expect(V3, CorruptImageError, "100", data=pack_header(V3)[:100])


@pytest.mark.clause("qcow2.header.magic")
def test_bad_magic() -> None:
    data = bytearray(pack_header(V3))
    data[0:4] = b"QFI\xfa"
    _expect(V3, CorruptImageError, "0x514649fa", data=bytes(data))


@pytest.mark.clause("qcow2.header.version")
@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_bad_version(version: int) -> None:
    data = bytearray(pack_header(V3) + bytes(8))
    data[4:8] = version.to_bytes(4, "big")
    with pytest.raises(UnsupportedFeatureError) as info:
        parse_header(bytes(data))
    assert str(version) in str(info.value)
    assert str(version) in info.value.feature


@pytest.mark.clause("qcow2.header.v3-length")
@pytest.mark.parametrize("length", [0, 72, 100, 108, 113])
def test_bad_header_length(length: int) -> None:
    data = bytearray(pack_header(V3) + bytes(16))
    data[100:104] = length.to_bytes(4, "big")
    _expect(V3, CorruptImageError, str(length), data=bytes(data))


@pytest.mark.clause("qcow2.header.v3-length")
def test_header_length_past_data() -> None:
    """header_length says the compression_type byte is there, but the data ends first."""
    _expect(V3_ZSTD, CorruptImageError, "compression_type", data=pack_header(V3_ZSTD)[:104])


@pytest.mark.clause("qcow2.header.v3-length")
def test_header_length_beyond_cluster() -> None:
    h = replace(V3, cluster_bits=9, header_length=520, l1_size=1 << 10, size=MiB)
    _expect(h, CorruptImageError, "520")


@pytest.mark.clause("qcow2.header.cluster-bits")
@pytest.mark.parametrize("bits", [0, 8, 22, 30, 63, 0xFFFFFFFF])
def test_bad_cluster_bits(bits: int) -> None:
    _expect(replace(V3, cluster_bits=bits), CorruptImageError, f"cluster_bits {bits}")


@pytest.mark.clause("qcow2.header.refcount-order")
@pytest.mark.parametrize("order", [7, 8, 0xFFFFFFFF])
def test_bad_refcount_order(order: int) -> None:
    _expect(replace(V3, refcount_order=order), CorruptImageError, str(order))


@pytest.mark.clause("qcow2.features.compression-type")
@pytest.mark.parametrize("ctype", [2, 255])
def test_unknown_compression_type(ctype: int) -> None:
    h = replace(V3_ZSTD, compression_type=ctype)
    with pytest.raises(UnsupportedFeatureError) as info:
        parse_header(pack_header(h))
    assert str(ctype) in str(info.value) and str(ctype) in info.value.feature


@pytest.mark.clause("qcow2.header.backing-name")
@pytest.mark.parametrize("name_size", [1024, 5000, 0xFFFFFFFF])
def test_backing_name_too_long(name_size: int) -> None:
    h = replace(V3, backing_file_offset=112, backing_file_size=name_size)
    _expect(h, CorruptImageError, str(name_size))


@pytest.mark.clause("qcow2.header.backing-name")
def test_backing_name_outside_header_cluster() -> None:
    h = replace(V3, cluster_bits=9, size=MiB, l1_size=32, l1_table_offset=3 * 512,
                refcount_table_offset=512, backing_file_offset=400, backing_file_size=200)
    _expect(h, CorruptImageError, "400+200")
    h = replace(h, backing_file_offset=(1 << 64) - 8, backing_file_size=10)
    _expect(h, CorruptImageError, str((1 << 64) - 8))


@pytest.mark.clause("qcow2.header.l1-size")
def test_l1_size_over_limit() -> None:
    entries = 0x2000000 // 8 + 1
    _expect(replace(V3, l1_size=entries), CorruptImageError, str(entries))


@pytest.mark.clause("qcow2.header.l1-size")
def test_l1_size_too_small() -> None:
    _expect(replace(V3, l1_size=0), CorruptImageError, "l1_size 0", str(V3.size))
    big = (8192 << 16) + 512
    _expect(replace(V3, size=big, l1_size=1), CorruptImageError, "l1_size 1", str(big))


@pytest.mark.clause("qcow2.header.l1-size", "qcow2.header.limits")
@pytest.mark.parametrize("size", [1 << 63, (1 << 64) - 1])
def test_huge_disk_size(size: int) -> None:
    """A size whose L1 table would exceed QEMU's limit cannot have a valid l1_size."""
    h = replace(V3, size=size, l1_size=0x2000000 // 8)
    _expect(h, CorruptImageError, "l1_size", str(size))


@pytest.mark.clause("qcow2.metadata.alignment")
def test_l1_offset_misaligned() -> None:
    _expect(replace(V3, l1_table_offset=(3 << 16) + 512), CorruptImageError,
            hex((3 << 16) + 512))


def test_l1_offset_ignored_without_l1() -> None:
    h = replace(V3, size=0, l1_size=0, l1_table_offset=12345)
    assert _parse(h).l1_table_offset == 12345


@pytest.mark.clause("qcow2.metadata.alignment")
@pytest.mark.parametrize("offset", [0, 512, (1 << 16) + 8])
def test_refcount_table_offset_invalid(offset: int) -> None:
    _expect(replace(V3, refcount_table_offset=offset), CorruptImageError, hex(offset))


@pytest.mark.clause("qcow2.header.limits")
@pytest.mark.parametrize("clusters", [0, 129, 0xFFFFFFFF])
def test_refcount_table_clusters_invalid(clusters: int) -> None:
    # 8 MiB / 64 KiB = 128 clusters is the limit.
    _expect(replace(V3, refcount_table_clusters=clusters), CorruptImageError, str(clusters))


def test_refcount_table_at_limit() -> None:
    assert _parse(replace(V3, refcount_table_clusters=128)).refcount_table_clusters == 128


@pytest.mark.clause("qcow2.header.limits")
def test_too_many_snapshots() -> None:
    _expect(replace(V3, nb_snapshots=65537, snapshots_offset=1 << 16), CorruptImageError,
            "65537")


@pytest.mark.clause("qcow2.metadata.alignment")
def test_snapshots_offset_misaligned() -> None:
    _expect(replace(V3, nb_snapshots=1, snapshots_offset=1000), CorruptImageError, hex(1000))
    # Without snapshots too, as QEMU's qcow2_validate_table ("Snapshot table offset
    # invalid", iotests 080).
    _expect(replace(V3, nb_snapshots=0, snapshots_offset=1000), CorruptImageError, hex(1000))


def test_v2_ignores_v3_fields() -> None:
    """A v2 header is 72 bytes: whatever follows is not read as v3 fields."""
    data = pack_header(V2) + b"\xff" * 40
    h = parse_header(data)
    assert (h.incompatible_features, h.refcount_order, h.header_length) == (0, 4, 72)
