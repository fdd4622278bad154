"""qcow2 header extensions: layout, the backing-format and feature-name extensions, and
unknown extensions kept byte-exact through writable use."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyimago.reference import (
    CorruptImageError,
    MemoryStorage,
    check,
    create_image,
    open_image,
)
from pyimago.reference.qcow2.constants import (
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
)
from pyimago.reference.qcow2.extensions import (
    FEATURE_TYPE_AUTOCLEAR,
    FEATURE_TYPE_COMPATIBLE,
    FEATURE_TYPE_INCOMPATIBLE,
    HeaderExtension,
    backing_format,
    feature_names,
    pack_extensions,
    pack_feature_table,
    parse_extensions,
)
from pyimago_tests_reference_helpers import (
    KiB,
    extensions_of,
    header_of,
    make_image,
    qemu_check,
    qemu_img,
    qemu_io,
    set_extensions,
)

UNKNOWN = 0x12345678

extension = st.builds(
    HeaderExtension,
    type=st.integers(1, 0xFFFFFFFF),
    data=st.binary(max_size=60),
)


@pytest.mark.clause("qcow2.extensions.layout")
# One extension per type: a type that appears twice with different data is corruption
# (qcow2.extensions.at-most-once), not a round trip.
@given(st.lists(extension, max_size=6, unique_by=lambda e: e.type), st.integers(0, 3))
def test_pack_parse_round_trip(exts: list[HeaderExtension], lead: int) -> None:
    area = bytes(8 * lead) + pack_extensions(exts)
    start = 8 * lead
    assert parse_extensions(area, start, len(area)) == exts
    # Each extension is padded to a multiple of 8; the end marker is 8 zero bytes.
    assert len(pack_extensions(exts)) == sum(8 + -(-len(e.data) // 8) * 8 for e in exts) + 8
    assert pack_extensions(exts).endswith(bytes(8))


@pytest.mark.clause("qcow2.extensions.layout")
def test_missing_end_marker_when_area_is_full() -> None:
    exts = [HeaderExtension(UNKNOWN, b"abc"), HeaderExtension(UNKNOWN + 1, bytes(16))]
    area = pack_extensions(exts)[:-8]
    assert parse_extensions(area, 0, len(area)) == exts
    # Fewer than 8 bytes left: no room for another extension header.
    assert parse_extensions(area + b"\x01\x02", 0, len(area) + 2) == exts


@pytest.mark.clause("qcow2.extensions.layout")
@pytest.mark.parametrize("length", [9, 100, 0xFFFFFFFF])
def test_overlong_length(length: int) -> None:
    area = UNKNOWN.to_bytes(4, "big") + length.to_bytes(4, "big") + bytes(8)
    with pytest.raises(CorruptImageError) as info:
        parse_extensions(area, 0, len(area))
    assert str(length) in str(info.value) and "0x12345678" in str(info.value)


@pytest.mark.clause("qcow2.extensions.layout")
def test_overlong_extension_in_image() -> None:
    data = make_image(cluster_size=4 * KiB)
    h = header_of(data)
    data[h.header_length : h.header_length + 8] = (
        UNKNOWN.to_bytes(4, "big") + (4 * KiB).to_bytes(4, "big")
    )
    with pytest.raises(CorruptImageError, match="0x12345678"):
        open_image(MemoryStorage(data), backing=None)


@pytest.mark.clause("qcow2.extensions.layout", "qcow2.header.backing-name")
def test_extension_running_into_backing_name() -> None:
    storage = MemoryStorage()
    create_image(storage, 64 * KiB, cluster_size=4 * KiB, backing_file="base.raw",
                 backing_fmt="raw")
    data = bytearray(storage.snapshot())
    h = header_of(data)
    # Lengthen the backing-format extension (the first one) so that it overlaps the name.
    assert int.from_bytes(data[h.header_length : h.header_length + 4], "big") == (
        QCOW2_EXT_MAGIC_BACKING_FORMAT
    )
    too_long = h.backing_file_offset - h.header_length
    data[h.header_length + 4 : h.header_length + 8] = too_long.to_bytes(4, "big")
    with pytest.raises(CorruptImageError, match=str(too_long)):
        open_image(MemoryStorage(data), backing=None)


@pytest.mark.clause("qcow2.extensions.backing-format")
def test_backing_format() -> None:
    assert backing_format([]) is None
    assert backing_format([HeaderExtension(UNKNOWN, b"x"),
                           HeaderExtension(QCOW2_EXT_MAGIC_BACKING_FORMAT, b"raw")]) == "raw"
    with pytest.raises(CorruptImageError):
        backing_format([HeaderExtension(QCOW2_EXT_MAGIC_BACKING_FORMAT, b"r\xffw")])


@pytest.mark.clause("qcow2.extensions.backing-format")
def test_non_ascii_backing_format_in_image() -> None:
    storage = MemoryStorage()
    create_image(storage, 64 * KiB, cluster_size=4 * KiB, backing_file="b", backing_fmt="raw")
    data = bytearray(storage.snapshot())
    h = header_of(data)
    data[h.header_length + 8] = 0xFF  # first byte of "raw"
    with pytest.raises(CorruptImageError, match="backing format"):
        open_image(MemoryStorage(data), backing=None)


@pytest.mark.clause("qcow2.extensions.feature-names")
def test_feature_names() -> None:
    entries = [
        (FEATURE_TYPE_INCOMPATIBLE, 0, "dirty bit"),
        (FEATURE_TYPE_COMPATIBLE, 0, "lazy refcounts"),
        (FEATURE_TYPE_AUTOCLEAR, 63, "x" * 46),
    ]
    table = pack_feature_table(entries)
    assert len(table) == 48 * len(entries)
    names = feature_names([HeaderExtension(QCOW2_EXT_MAGIC_FEATURE_TABLE, table)])
    assert names == {(t, b): n for t, b, n in entries}
    # A truncated trailing entry is ignored; non-ASCII names do not raise.
    odd = table + b"\x00\x05\xff\xfe"
    names = feature_names([HeaderExtension(QCOW2_EXT_MAGIC_FEATURE_TABLE, odd)])
    assert len(names) == 3
    bad = pack_feature_table([(0, 9, "ok")]).replace(b"ok", b"\xff\xfe")
    assert (0, 9) in feature_names([HeaderExtension(QCOW2_EXT_MAGIC_FEATURE_TABLE, bad)])


@pytest.mark.clause("qcow2.extensions.feature-names")
def test_we_write_a_feature_table() -> None:
    exts = extensions_of(make_image(cluster_size=4 * KiB))
    names = feature_names(exts)
    assert names[(FEATURE_TYPE_INCOMPATIBLE, 0)] == "dirty bit"
    assert names[(FEATURE_TYPE_INCOMPATIBLE, 4)] == "extended L2 entries"


def _use_writably(storage: MemoryStorage) -> None:
    with open_image(storage, writable=True, backing=None) as img:
        img.write(b"\xab" * 3000, 1000)
        img.write_zeroes(8 * KiB, 8 * KiB)
        img.discard_to_any(0, 4 * KiB)
        img.resize(img.size * 64)  # L1 growth rewrites header fields
        img.write(b"\xcd" * 100, img.size - 100)


@pytest.mark.clause("qcow2.extensions.preserved")
@pytest.mark.parametrize("cluster_size", [512, 4 * KiB])
def test_unknown_extensions_preserved(cluster_size: int) -> None:
    data = make_image(cluster_size=cluster_size)
    exts = [HeaderExtension(UNKNOWN, b"\x01\x02\x03 unknown, 29 bytes long"),
            HeaderExtension(0xFFFFFFFF, b"")]
    if cluster_size > 512:
        exts += extensions_of(data)
    set_extensions(data, exts)
    h = header_of(data)
    before = bytes(data[h.header_length : h.cluster_size])
    storage = MemoryStorage(data)
    _use_writably(storage)
    after = storage.snapshot()
    assert after[h.header_length : h.cluster_size] == before
    assert extensions_of(after) == exts


@pytest.mark.clause("qcow2.extensions.preserved", "qcow2.extensions.layout")
def test_extensions_filling_cluster_without_end_marker_preserved() -> None:
    data = make_image(cluster_size=512)
    h = header_of(data)
    room = 512 - h.header_length - 8
    ext_head = UNKNOWN.to_bytes(4, "big") + room.to_bytes(4, "big")
    data[h.header_length : 512] = ext_head + b"\x5a" * room
    assert extensions_of(data) == [HeaderExtension(UNKNOWN, b"\x5a" * room)]
    before = bytes(data[:512])
    storage = MemoryStorage(data)
    _use_writably(storage)
    after = storage.snapshot()
    # Only the fields we rewrite (size, L1 pointer) changed; the extension area did not.
    assert after[h.header_length : 512] == before[h.header_length :]


@pytest.mark.qemu
@pytest.mark.clause("qcow2.extensions.preserved", "qcow2.features.autoclear-clear",
                    "qcow2.bitmaps.in-use", "interop.qemu-check")
def test_qemu_bitmaps_extension_preserved(tmp_path: Path) -> None:
    path = tmp_path / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "1M")
    qemu_io(path, ["write -P 0x11 0 64k"])
    qemu_img("bitmap", "--add", path, "bitmap0")
    qemu_img("bitmap", "--add", "--disable", path, "bitmap1")
    before = path.read_bytes()
    h = header_of(before)
    assert h.autoclear_features & 1
    with open_image(path) as img:
        img.read(0, 4096)
    assert path.read_bytes() == before  # read-only: nothing written
    # What QEMU leaves when it dies right after a writable open: the reference.
    died = tmp_path / "died.qcow2"
    died.write_bytes(before)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "abort", str(died)], capture_output=True,
                   timeout=60, check=False)
    with open_image(path, writable=True) as img:
        assert path.read_bytes() == died.read_bytes()  # flagged in use, as QEMU flags them
        img.write(b"\x22" * 4096, 128 * KiB)
    after = path.read_bytes()
    assert after[h.header_length : h.cluster_size] == before[h.header_length : h.cluster_size]
    assert header_of(after).autoclear_features == h.autoclear_features
    qemu_check(path)  # the bitmaps' clusters stay referenced: no leak
    assert check(path).clean
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    flags = {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}
    assert flags == {"bitmap0": ["in-use", "auto"], "bitmap1": ["in-use"]}
