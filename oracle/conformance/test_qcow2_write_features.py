"""Issue 13's write side through the shared API (specs/qcow2-compressed.toml,
qcow2-snapshots.toml, qcow2-lazy-refcounts.toml): compressed writes, snapshot create / apply /
delete and lazy refcounts, each judged by qemu-img (not applicable without it)."""

from __future__ import annotations

import json
import random
import subprocess

import pytest
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    MiB,
    pattern,
    qemu_check,
    qemu_img,
)
from pyimago.reference import InvalidRequestError, UnsupportedError

pytestmark = pytest.mark.needs("qcow2")


@pytest.mark.clause("qcow2.compressed.write-whole-cluster", "qcow2.compressed.write-fallback",
                    "qcow2.compressed.write-unallocated-only")
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_writes(img: ImageKit, compression: str) -> None:
    cs = 4 * KiB
    path = img.file("c.qcow2", 64 * KiB + 512, cluster_size=cs, compression_type=compression)
    noise = random.Random(7).randbytes(cs)  # does not compress: written plainly
    with img.open(path) as disk:
        disk.write_compressed(b"\x01" * cs, 0)
        disk.write_compressed(noise, cs)
        disk.write_compressed(b"t" * 512, 64 * KiB)
        for data, offset in [(bytes(cs), 512), (bytes(cs // 2), 2 * cs), (bytes(cs), 0)]:
            with pytest.raises(InvalidRequestError):
                disk.write_compressed(data, offset)
        got = disk.read(0, 64 * KiB + 512)
    expected = b"\x01" * cs + noise + bytes(64 * KiB - 2 * cs) + b"t" * 512
    assert got == expected
    qemu_check(path)
    report = json.loads(qemu_img("check", "--output=json", path).stdout)
    assert report.get("compressed-clusters") == 2


@pytest.mark.clause("qcow2.snapshots.create-refcounts", "qcow2.snapshots.id-assignment",
                    "qcow2.snapshots.lookup-id-then-name", "qcow2.snapshots.apply-revert",
                    "qcow2.snapshots.delete-release")
def test_snapshot_create_apply_delete(img: ImageKit) -> None:
    path = img.file("s.qcow2", 256 * KiB, cluster_size=4096)
    with img.open(path) as disk:
        disk.write(pattern(1, 100 * KiB), 0)
        first = disk.create_snapshot("one")
        kept = disk.read(0, 256 * KiB)
        disk.write(pattern(2, 50 * KiB), 20 * KiB)
        second = disk.create_snapshot("two")
        assert (first.id, second.id) == ("1", "2")
        with pytest.raises(InvalidRequestError):
            disk.create_snapshot("one")
        disk.apply_snapshot("1")
        assert disk.read(0, 256 * KiB) == kept
        disk.delete_snapshot("two")
        assert [s.name for s in disk.snapshots()] == ["one"]
    qemu_check(path)
    out = img.tmp / "one.raw"
    qemu_img("convert", "-q", "-O", "raw", "-l", "1", path, out)
    assert out.read_bytes() == kept


@pytest.mark.clause("qcow2.lazy-refcounts.create", "qcow2.lazy-refcounts.eager")
def test_lazy_refcounts(img: ImageKit) -> None:
    path = img.file("l.qcow2", MiB, lazy_refcounts=True)
    with img.open(path) as disk:
        disk.write(pattern(3, 70 * KiB), 5000)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    assert not info.get("dirty-flag")
    qemu_check(path)


@pytest.mark.clause("qcow2.dirty.repair-on-open", "qcow2.features.dirty")
def test_dirty_image_repaired_on_writable_open(img: ImageKit) -> None:
    path = img.tmp / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096",
             path, "1M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x72 4096 200k", "-c", "abort",
                    str(path)], capture_output=True, timeout=60, check=False)
    before = path.read_bytes()
    assert int.from_bytes(before[72:80], "big") & 1, "qemu-io left no dirty bit"
    with img.open(path, writable=False) as disk:
        assert disk.read(4096, 200 * KiB) == b"\x72" * 200 * KiB
    assert path.read_bytes() == before, "a read-only open wrote to a dirty image"
    with img.open(path) as disk:
        disk.write(b"after", 500 * KiB)
    assert not int.from_bytes(path.read_bytes()[72:80], "big") & 1
    qemu_check(path)


@pytest.mark.clause("qcow2.snapshots.extra-data")
def test_qemu_snapshot_entries_survive_a_table_rewrite(img: ImageKit) -> None:
    path = img.file("x.qcow2", 256 * KiB, cluster_size=4096)
    qemu_img("snapshot", "-c", "theirs", path)
    before = json.loads(qemu_img("info", "--output=json", path).stdout)["snapshots"]
    with img.open(path) as disk:
        disk.create_snapshot("ours")
        disk.delete_snapshot("ours")
    after = json.loads(qemu_img("info", "--output=json", path).stdout)["snapshots"]
    assert after == before
    qemu_check(path)


def _qemu_map(path: object) -> list[tuple[int, int, bool]]:
    """``qemu-img map``'s (start, length, data) records."""
    out = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(path)).stdout)
    return [(e["start"], e["length"], e["data"]) for e in out]


@pytest.mark.clause("create.qcow2.extended-l2", "qcow2.extended-l2.write",
                    "qcow2.extended-l2.mapping", "qcow2.extended-l2.clear")
def test_extended_l2_writes_allocate_per_subcluster(img: ImageKit) -> None:
    cs, sub = 64 * KiB, 2 * KiB  # 32 subclusters per cluster
    path = img.file("x.qcow2", MiB, cluster_size=cs, extended_l2=True)
    with img.open(path) as disk:
        disk.write(pattern(3, 512), 3 * sub + 100)  # inside subcluster 3 only
        _, run = disk.get_mapping(0, cs)
        assert run == 3 * sub, "the unallocated subclusters before it form one mapping"
        _, run = disk.get_mapping(3 * sub, cs)
        assert run == sub, "the written subcluster maps alone"
        disk.write(pattern(4, 2 * cs), cs)
        disk.discard_to_zero(cs + sub, 2 * sub)  # whole subclusters 1 and 2 of cluster 1
        got = disk.read(0, 3 * cs)
    want = bytearray(3 * cs)
    want[3 * sub + 100 : 3 * sub + 612] = pattern(3, 512)
    want[cs : 3 * cs] = pattern(4, 2 * cs)
    want[cs + sub : cs + 3 * sub] = bytes(2 * sub)
    assert got == bytes(want)
    qemu_check(path)
    data = [(s, n) for s, n, d in _qemu_map(path) if d]
    assert data[0] == (3 * sub, sub), data
    assert qemu_img("convert", "-O", "raw", "-f", "qcow2", path, img.tmp / "x.raw").returncode == 0
    assert (img.tmp / "x.raw").read_bytes()[: 3 * cs] == bytes(want)


@pytest.mark.clause("create.qcow2.data-file", "qcow2.data-file.write", "qcow2.data-file.raw",
                    "qcow2.data-file.resize")
def test_data_file_images_keep_guest_offsets(img: ImageKit,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = img.file("d.qcow2", 256 * KiB, cluster_size=4 * KiB, data_file="d.raw",
                    data_file_raw=True)
    with img.open(path) as disk:
        disk.write(pattern(5, 8 * KiB), 12 * KiB)
        disk.resize(512 * KiB)
        disk.write(pattern(6, 4 * KiB), 400 * KiB)
        got = disk.read(0, 512 * KiB)
    raw = (img.tmp / "d.raw").read_bytes()
    assert len(raw) == 512 * KiB, "the data file grows with the disk"
    assert raw == got, "a raw data file is the disk, byte for byte"
    assert got[12 * KiB : 20 * KiB] == pattern(5, 8 * KiB)
    monkeypatch.chdir(img.tmp)  # QEMU 7.2 resolves the data file's name against the cwd
    qemu_check(path)


@pytest.mark.clause("qcow2.features.lazy-refcounts-create")
def test_lazy_refcounts_option_sets_the_compatible_bit(img: ImageKit) -> None:
    path = img.file("l.qcow2", 64 * KiB, lazy_refcounts=True)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    with pytest.raises(InvalidRequestError):
        img.file("l2.qcow2", 64 * KiB, lazy_refcounts=True, compat="0.10")


@pytest.mark.clause("qcow2.snapshots.v2-no-resize")
def test_a_v2_image_with_snapshots_is_not_resized(img: ImageKit) -> None:
    path = img.file("v2.qcow2", 64 * KiB, compat="0.10", cluster_size=4 * KiB)
    with img.open(path) as disk:
        disk.write(pattern(7, 4 * KiB), 0)
        disk.create_snapshot("s")
        with pytest.raises(UnsupportedError, match="v2"):
            disk.resize(128 * KiB)
        assert disk.size == 64 * KiB
    qemu_check(path)
