"""Images with internal snapshots (specs/qcow2-snapshots.toml); snapshots are made by
qemu-img (not applicable without it), except for the crafted snapshot-table checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyimago.oracle.conformance._qcow2 import L2_COPIED, Qcow2Bytes
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    pattern,
    qemu_check,
    qemu_img,
    qemu_io,
)
from pyimago.reference import CorruptImageError

pytestmark = pytest.mark.needs("qcow2")


def _snapshotted(img: ImageKit) -> Path:
    path = img.file("snap.qcow2", 256 * KiB, "qcow2", cluster_size=4096)
    with img.open(path) as disk:
        disk.write(pattern(1, 256 * KiB), 0)
    qemu_img("snapshot", "-c", "before", path)
    return path


def _snapshot_content(img: ImageKit, path: Path) -> bytes:
    out = img.tmp / "snapshot.raw"
    qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=before", path, out)
    return out.read_bytes()


@pytest.mark.clause("qcow2.snapshots.read-active")
def test_the_active_l1_table_is_the_disk(img: ImageKit) -> None:
    path = _snapshotted(img)
    qemu_io(path, "write -P 0x77 8k 4k", "write -z 64k 64k")
    with img.open(path, writable=False) as disk:
        got = disk.read(0, 256 * KiB)
    expected = bytearray(pattern(1, 256 * KiB))
    expected[8 * KiB : 12 * KiB] = b"\x77" * 4 * KiB
    expected[64 * KiB : 128 * KiB] = bytes(64 * KiB)
    assert got == bytes(expected), "reads do not follow the active L1 table"


@pytest.mark.clause("qcow2.snapshots.preserved", "qcow2.l2.cow-shared")
def test_writes_never_change_a_snapshot(img: ImageKit) -> None:
    path = _snapshotted(img)
    with img.open(path) as disk:
        disk.write(pattern(4, 10 * KiB), 3 * KiB)
        disk.write_zeroes(64 * KiB, 16 * KiB)
        disk.discard_to_zero(128 * KiB, 16 * KiB)
        disk.discard_to_backing(160 * KiB, 8 * KiB)
        disk.discard_to_any(192 * KiB, 8 * KiB)
        disk.resize(128 * KiB)
        disk.resize(512 * KiB)
    # qemu-img convert -l reads the snapshot at the image's current size (512 KiB now).
    assert _snapshot_content(img, path)[: 256 * KiB] == pattern(1, 256 * KiB), (
        "the snapshot changed"
    )
    qemu_check(path)


@pytest.mark.clause("qcow2.snapshots.copied-inactive")
def test_copied_of_snapshot_tables_is_not_trusted(img: ImageKit) -> None:
    path = _snapshotted(img)
    image = Qcow2Bytes(path.read_bytes())
    table = image.get("snapshots_offset")
    l1_offset, l1_size = image.u64(table), image.u32(table + 8)
    for i in range(l1_size):
        entry = image.u64(l1_offset + 8 * i)
        if entry:
            image.put_u64(l1_offset + 8 * i, entry | L2_COPIED)  # lies: the L2 is shared
    path.write_bytes(bytes(image.data))
    with img.open(path) as disk:
        disk.write(pattern(5, 4 * KiB), 0)
    assert _snapshot_content(img, path) == pattern(1, 256 * KiB), (
        "a write trusted COPIED in the snapshot's L1 table and changed the snapshot"
    )


@pytest.mark.clause("qcow2.snapshots.table")
def test_snapshot_table_is_validated(img: ImageKit) -> None:
    base = img.crafted(64 * KiB, writes=[(0, pattern(6, 512))])
    end = (len(base.data) + 511) // 512 * 512
    cases: dict[str, Qcow2Bytes] = {}
    for what, offset in {"unaligned": 512 + 8, "outside the file": end + 1024 * KiB}.items():
        cases[f"a snapshot table {what}"] = image = Qcow2Bytes(base.data)
        image.set(nb_snapshots=1, snapshots_offset=offset)
    img.refuses_all(cases, CorruptImageError)
