"""What QEMU says about the implementation's images, and the other way round
(specs/interop.toml).  Not applicable where qemu-img is not installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    MiB,
    pattern,
    qemu_check,
    qemu_img,
    qemu_io,
    require_qemu,
)
from pyimago.reference import RawMapping, SpecialMapping, ZeroMapping

pytestmark = pytest.mark.needs("qcow2")


def _qemu_chain(tmp: Path) -> Path:
    """A QEMU-made chain: raw base, qcow2 v3 middle with zero/discarded clusters, compressed
    clusters, and a v2 top with 512-byte clusters."""
    base = tmp / "base.raw"
    base.write_bytes(pattern(1, 1 * MiB))
    mid_src = tmp / "mid-src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", mid_src, "1M")
    qemu_io(mid_src, "write -P 0x11 0 192k", "write -P 0x22 448k 64k")
    mid = tmp / "mid.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "cluster_size=65536",
             mid_src, mid)
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    qemu_io(mid, "write -P 0x33 256k 64k", "write -z 320k 64k", "discard 384k 64k",
            "write -P 0x44 1000 3000")
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512",
             "-b", "mid.qcow2", "-F", "qcow2", top, "1536K")
    qemu_io(top, "write -P 0x55 100k 5000", "write -P 0x66 1M 100k", "write -z 2k 1k")
    return top


@pytest.mark.needs("backing")
@pytest.mark.clause("interop.qemu-read", "qcow2.compressed.zlib", "qcow2.compressed.layout")
def test_we_read_what_qemu_reads(img: ImageKit) -> None:
    top = _qemu_chain(img.tmp)
    converted = img.tmp / "converted.raw"
    qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", top, converted)
    expected = converted.read_bytes()
    with img.open(top, writable=False) as disk:
        assert disk.size == len(expected), f"size {disk.size}, qemu says {len(expected)}"
        got = disk.read(0, disk.size)
    if got != expected:
        bad = next(i for i in range(len(got)) if got[i] != expected[i])
        raise AssertionError(
            f"byte {bad:#x} reads {got[bad]:#04x}, qemu-img convert gives {expected[bad]:#04x}"
        )


def _depth_of(mapping: Any, files: list[Path]) -> int | None:
    storage = getattr(mapping, "storage", None)
    if storage is None:
        layer = getattr(mapping, "layer", None)
        storage = layer
    text = f"{getattr(storage, 'path', '')} {getattr(storage, 'name', '')} {storage}"
    for depth, path in enumerate(files):
        if path.name in text:
            return depth
    return None


@pytest.mark.needs("backing")
@pytest.mark.clause("interop.qemu-map")
def test_mappings_agree_with_qemu_img_map(img: ImageKit) -> None:
    top = _qemu_chain(img.tmp)
    files = [top, img.tmp / "mid.qcow2", img.tmp / "base.raw"]
    proc = qemu_img("map", "--output=json", "-f", "qcow2", top)
    entries: list[dict[str, Any]] = json.loads(proc.stdout)
    with img.open(top, writable=False) as disk:
        for entry in entries:
            start, end = entry["start"], entry["start"] + entry["length"]
            pos = start
            while pos < end:
                mapping, length = disk.get_mapping(pos, end - pos)
                assert length > 0, f"get_mapping({pos:#x}) returned length {length}"
                length = min(length, end - pos)
                where = f"[{pos:#x}, {pos + length:#x}) (qemu: {entry})"
                if entry["data"]:
                    assert isinstance(mapping, (RawMapping, SpecialMapping)), (
                        f"{where}: qemu maps data, we map {mapping}"
                    )
                    depth = _depth_of(mapping, files)
                    if depth is not None and isinstance(mapping, RawMapping):
                        assert depth == entry["depth"], (
                            f"{where}: data found in layer {depth}, qemu says {entry['depth']}"
                        )
                elif entry["zero"]:
                    assert isinstance(mapping, ZeroMapping) or (
                        isinstance(mapping, RawMapping)
                        and disk.read(pos, length) == bytes(length)
                        and entry.get("present", True)
                    ), f"{where}: qemu maps zero, we map {mapping}"
                pos += length


@pytest.mark.clause("interop.qemu-check", "qcow2.refcount.no-leaks", "qcow2.l2.copied-flag")
@pytest.mark.parametrize("opts", [
    {"cluster_size": 512},
    {"cluster_size": 65536, "compat": "0.10"},
    {"cluster_size": 4096, "refcount_bits": 2},
    {"cluster_size": 1024, "refcount_bits": 64, "compression_type": "zstd"},
], ids=["512", "v2-64k", "4k-rc2", "1k-rc64-zstd"])
def test_qemu_img_check_passes_our_images(img: ImageKit, opts: dict[str, Any]) -> None:
    require_qemu()
    path = img.file("ours.qcow2", 2 * MiB, "qcow2", **opts)
    with img.open(path) as disk:
        disk.write(pattern(2, 700 * KiB), 3000)
        disk.write_zeroes(100 * KiB, 64 * KiB)
        disk.discard_to_zero(300 * KiB, 100 * KiB)
        disk.discard_to_any(500 * KiB, 20 * KiB)
        disk.discard_to_backing(600 * KiB, 20 * KiB)
        disk.resize(1 * MiB)
        disk.resize(3 * MiB)
        disk.write(pattern(3, 64 * KiB), 2 * MiB + 10)
    qemu_check(path)


@pytest.mark.clause("interop.qemu-compare")
def test_qemu_img_compare_finds_the_expected_content(img: ImageKit) -> None:
    require_qemu()
    path = img.file("ours.qcow2", 1 * MiB, "qcow2", cluster_size=4096)
    expected = bytearray(1 * MiB)
    with img.open(path) as disk:
        for seed, (offset, length) in enumerate([(0, 5000), (70000, 200000), (1 * MiB - 3, 3)]):
            data = pattern(seed, length)
            disk.write(data, offset)
            expected[offset : offset + length] = data
        disk.write_zeroes(80000, 10000)
        expected[80000:90000] = bytes(10000)
    raw = img.tmp / "expected.raw"
    raw.write_bytes(bytes(expected))
    proc = qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw, ok=(0, 1))
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"
