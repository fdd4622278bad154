"""QEMU-written images read through pyimago agree with QEMU itself.

For every image of the corpus (``tests/fixtures/make_qemu_images.py``):

* ``read`` over the whole disk equals ``qemu-img convert -O raw``; so do reads in odd-sized
  chunks through ``read``, ``readinto`` and ``readv``;
* the allocation ``get_shallow_mapping`` / ``get_mapping`` report agrees with
  ``qemu-img map --output=json`` (data / zero / depth, and the host offset where QEMU gives
  one).

Each test is parametrized by image name, and carries the clauses that image exercises.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pyimago.reference import (
    open_image,
)
from pyimago_tests_interop_mapcheck import (
    assert_deep_map_like_qemu,
    assert_same_bytes,
    assert_shallow_map_like_qemu,
)

if TYPE_CHECKING:
    from .conftest import QemuTools

pytestmark = [pytest.mark.qemu]

MiB = 1 << 20

#: Above this virtual size an image is compared in windows, not byte for byte in one go.
BIG = 64 * MiB


def _windows(size: int, qmap: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Ranges worth reading in a big sparse image: around every map boundary, plus samples."""
    margin = 64 * 1024
    spans: list[tuple[int, int]] = []
    for e in qmap:
        start, end = e["start"], e["start"] + e["length"]
        if e["data"] and e["length"] <= 4 * MiB:
            spans.append((start - margin, end + margin))
        else:
            spans.append((start - margin, start + margin))
            spans.append((end - margin, end + margin))
    step = 512 * MiB + 12345
    spans += [(p, p + MiB) for p in range(0, size, step)]
    spans.append((size - MiB, size))
    clipped = sorted((max(0, a), min(size, b)) for a, b in spans if min(size, b) > max(0, a))
    merged: list[tuple[int, int]] = []
    for a, b in clipped:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _read_file(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(length)
    return data + bytes(length - len(data))


@pytest.mark.clause(
    "interop.qemu-read", "access.read.no-short", "storage.read.past-eof-zero", "backing.probe"
)
def test_whole_disk_read_matches_qemu_convert(
    corpus_image: Any, qemu: QemuTools, tmp_path: Path
) -> None:
    spec = corpus_image
    qemu_raw = qemu.convert_raw_file(spec.path, tmp_path / "qemu.raw", spec.fmt)
    size = qemu.info(spec.path, spec.fmt)[0]["virtual-size"]
    with open_image(spec.path) as img:
        assert img.size == size, f"{spec.name}: size {img.size}, qemu says {size}"
        if size <= BIG:
            assert_same_bytes(img.read(0, size), qemu_raw.read_bytes(), 0, spec.name)
        else:
            for a, b in _windows(size, qemu.map(spec.path, spec.fmt)):
                assert_same_bytes(img.read(a, b - a), _read_file(qemu_raw, a, b - a), a, spec.name)


def _chunks(start: int, end: int, chunk: int) -> Iterator[tuple[int, int]]:
    for off in range(start, end, chunk):
        yield off, min(chunk, end - off)


@pytest.mark.clause("interop.qemu-read", "access.read.no-short")
def test_odd_chunked_reads_match_qemu(
    corpus_image: Any, qemu: QemuTools, tmp_path: Path
) -> None:
    spec = corpus_image
    qemu_raw = qemu.convert_raw_file(spec.path, tmp_path / "qemu.raw", spec.fmt)
    expected = qemu_raw.read_bytes() if qemu_raw.stat().st_size <= BIG else None
    with open_image(spec.path) as img:
        size = img.size
        ranges: list[tuple[int, int]] = []
        if size <= 4 * MiB:
            ranges += _chunks(0, size, 12345)
        else:
            # small odd chunks where the data is, big odd chunks everywhere else
            for a, b in _windows(size, qemu.map(spec.path, spec.fmt))[:40]:
                ranges += _chunks(a, min(b, a + 2 * MiB), 12345)
            if size <= BIG:
                ranges += _chunks(0, size, 1048573)
        # past the end of the disk: reads never come back short, they read zeroes
        ranges.append((size - 100, 300))
        for i, (off, length) in enumerate(ranges):
            kind = i % 3
            if kind == 0:
                got = img.read(off, length)
            elif kind == 1:
                buf = bytearray(length)
                img.readinto(buf, off)
                got = bytes(buf)
            else:
                cut = length // 3
                bufs = [bytearray(cut), bytearray(length - cut)]
                img.readv(bufs, off)
                got = bytes(bufs[0] + bufs[1])
            in_disk = max(0, min(length, size - off))
            if expected is not None:
                want = expected[off : off + in_disk]
            else:
                want = _read_file(qemu_raw, off, in_disk)
            want += bytes(length - in_disk)
            how = ("read", "readinto", "readv")[kind]
            assert_same_bytes(got, want, off, f"{spec.name} chunk {i} by {how}")


# -- allocation ------------------------------------------------------------------------------------


# QEMU's tolerances, and why:
# * ``zero`` is ignored wherever ``data`` is true: QEMU also asks the host file, so a data
#   cluster over a hole of a sparse file (preallocation=metadata) is ``data: true, zero: true``.
# * a raw layer is ``present`` everywhere, and QEMU calls its holes ``data: false, zero: true``:
#   we map raw files as raw data throughout (a hole is still storage), so there a RawMapping
#   (or a zero) is accepted, and the bytes themselves are checked by the read tests.
# * QEMU gives no host ``offset`` for compressed clusters: that is how we tell them apart,
#   and they must be SpecialMapping; every other data range must be RawMapping at QEMU's offset.


@pytest.mark.clause(
    "interop.qemu-map", "access.mapping.shallow-indirect", "access.mapping.tiling",
    "qcow2.l2.unallocated-backing",
)
def test_shallow_mapping_matches_qemu_map(corpus_image: Any, qemu: QemuTools) -> None:
    spec = corpus_image
    qmap = qemu.map(spec.path, spec.fmt)
    formats = [layer["format"] for layer in qemu.info(spec.path, spec.fmt)]
    with open_image(spec.path) as img:
        assert_shallow_map_like_qemu(img, qmap, formats, spec.name)


@pytest.mark.clause(
    "interop.qemu-map", "access.mapping.tiling", "access.mapping.explicit-top-only",
    "access.mapping.eof-top-only", "access.mapping.special-compressed",
)
def test_deep_mapping_matches_qemu_map(corpus_image: Any, qemu: QemuTools) -> None:
    spec = corpus_image
    qmap = qemu.map(spec.path, spec.fmt)
    formats = [layer["format"] for layer in qemu.info(spec.path, spec.fmt)]
    with open_image(spec.path) as img:
        assert_deep_map_like_qemu(img, qmap, formats, spec.name)
