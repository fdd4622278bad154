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
from pyimago.reference import InvalidRequestError

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
