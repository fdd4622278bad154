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
    EofMapping,
    FormatAccess,
    IndirectMapping,
    RawMapping,
    SpecialMapping,
    ZeroMapping,
    open_image,
)

if TYPE_CHECKING:
    from .conftest import QemuTools

pytestmark = [pytest.mark.qemu]

MiB = 1 << 20

#: Above this virtual size an image is compared in windows, not byte for byte in one go.
BIG = 64 * MiB


def assert_same_bytes(ours: bytes | bytearray, qemu: bytes, base: int, what: str) -> None:
    """Compare without pytest's diff of megabyte-long byte strings; name the first mismatch."""
    if ours == qemu:
        return
    if len(ours) != len(qemu):
        pytest.fail(f"{what}: we read {len(ours)} bytes at 0x{base:x}, qemu has {len(qemu)}")
    first = next(i for i in range(len(ours)) if ours[i] != qemu[i])
    last = next(i for i in range(len(ours) - 1, -1, -1) if ours[i] != qemu[i])
    pytest.fail(
        f"{what}: content differs at guest 0x{base + first:x}..0x{base + last:x} "
        f"(first bytes: ours {bytes(ours[first:first + 8]).hex()} "
        f"qemu {qemu[first:first + 8].hex()})"
    )


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


def walk_shallow(img: FormatAccess, offset: int, max_length: int) -> tuple[int, Any, int]:
    """Follow ``get_shallow_mapping`` down the chain: ``(depth, mapping, length)``.

    ``depth`` counts the ``IndirectMapping`` hops to the layer that decides the range.  Where
    a lower layer ends (``EofMapping`` below the top), the rest of the range is unallocated
    and QEMU attributes it to the layer above, whose backing is too short: so do we.
    """
    depth = 0
    layer: Any = img
    off = offset
    length = max_length
    while True:
        mapping, n = layer.get_shallow_mapping(off, length)
        if isinstance(mapping, EofMapping):
            if depth == 0:
                return 0, mapping, 0
            return depth - 1, mapping, length
        assert 0 < n <= length, f"get_shallow_mapping({off}, {length}) -> {mapping}, {n}"
        length = n
        if isinstance(mapping, IndirectMapping):
            layer = mapping.layer
            off = mapping.offset
            depth += 1
            continue
        return depth, mapping, length


def _check_tiling(spec: Any, qmap: list[dict[str, Any]], size: int) -> None:
    pos = 0
    for e in qmap:
        assert e["start"] == pos, f"{spec.name}: qemu map has a gap at 0x{pos:x}"
        pos += e["length"]
    assert pos == size, f"{spec.name}: qemu map ends at 0x{pos:x}, disk at 0x{size:x}"


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
        _check_tiling(spec, qmap, img.size)
        for e in qmap:
            start, end = e["start"], e["start"] + e["length"]
            pos = start
            while pos < end:
                depth, m, n = walk_shallow(img, pos, end - pos)
                where = (
                    f"{spec.name}: guest 0x{pos:x}+0x{n:x}: ours {m!r} at depth {depth}; "
                    f"qemu {e}"
                )
                assert n > 0, where
                assert depth == e["depth"], where
                if e["data"]:
                    if "offset" in e:
                        assert isinstance(m, RawMapping), where
                        assert m.offset == e["offset"] + (pos - start), where
                    else:
                        assert isinstance(m, SpecialMapping), where
                elif e["present"]:
                    if formats[depth] == "raw":
                        assert isinstance(m, RawMapping | ZeroMapping), where
                        if isinstance(m, RawMapping) and "offset" in e:
                            assert m.offset == e["offset"] + (pos - start), where
                    else:
                        # a zero cluster, with or without a preallocated host cluster
                        assert isinstance(m, ZeroMapping) and m.explicit, where
                else:
                    assert isinstance(m, EofMapping) or (
                        isinstance(m, ZeroMapping) and not m.explicit
                    ), where
                pos += n


@pytest.mark.clause(
    "interop.qemu-map", "access.mapping.tiling", "access.mapping.explicit-top-only",
    "access.mapping.eof-top-only", "access.mapping.special-compressed",
)
def test_deep_mapping_matches_qemu_map(corpus_image: Any, qemu: QemuTools) -> None:
    spec = corpus_image
    qmap = qemu.map(spec.path, spec.fmt)
    formats = [layer["format"] for layer in qemu.info(spec.path, spec.fmt)]
    with open_image(spec.path) as img:
        _check_tiling(spec, qmap, img.size)
        for e in qmap:
            start, end = e["start"], e["start"] + e["length"]
            pos = start
            while pos < end:
                m, n = img.get_mapping(pos, end - pos)
                where = f"{spec.name}: guest 0x{pos:x}+0x{n:x}: ours {m!r}; qemu {e}"
                assert 0 < n <= end - pos, where
                if e["data"]:
                    if "offset" in e:
                        assert isinstance(m, RawMapping), where
                        assert m.offset == e["offset"] + (pos - start), where
                    else:
                        assert isinstance(m, SpecialMapping), where
                elif e["present"] and formats[e["depth"]] == "raw":
                    assert isinstance(m, RawMapping) or m == ZeroMapping(False), where
                elif e["present"]:
                    # explicit only where the top layer itself records the zeroes
                    assert m == ZeroMapping(e["depth"] == 0), where
                else:
                    assert m == ZeroMapping(False), where
                pos += n
        assert img.get_mapping(img.size, 4096) == (EofMapping(), 0)
