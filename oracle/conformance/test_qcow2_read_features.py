"""Reading what QEMU writes with extended L2 entries, external data files, internal snapshots
and lazy refcounts (specs/qcow2-extended-l2.toml, qcow2-data-file.toml,
qcow2-snapshots.toml, qcow2-features.toml).  Images are made by qemu-img / qemu-io (not
applicable without them); an implementation without ``snapshot=`` / ``data_file=`` options
or a ``driver.snapshots`` list is not applicable to the clauses that need them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyimago.oracle.conformance._qcow2 import Qcow2Bytes
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    MiB,
    not_applicable,
    qemu_img,
    qemu_io,
    require_qemu,
)
from pyimago.reference import CorruptImageError

pytestmark = pytest.mark.needs("qcow2")


def _open(img: ImageKit, path: Path, **kwargs: Any) -> Any:
    """Open read-only; options the implementation does not take make the test not
    applicable."""
    try:
        return img.open(path, writable=False, **kwargs)
    except TypeError as exc:
        if kwargs and "unexpected keyword" in str(exc):
            not_applicable(f"open_image takes no {', '.join(kwargs)}: {exc}")
        raise


def _qemu_raw(path: Path, *args: str) -> bytes:
    out = path.with_suffix(".want.raw")
    qemu_img("convert", *args, "-O", "raw", path, out)
    return out.read_bytes()


def _read_all(disk: Any) -> bytes:
    return bytes(disk.read(0, disk.size))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- extended L2 entries ---------------------------------------------------------------------------


def _extl2(img: ImageKit) -> Path:
    require_qemu()
    path = img.tmp / "extl2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", path, "1M")
    sc = 2 * KiB
    qemu_io(path, f"write -P 0x11 {sc} {sc}", f"write -P 0x22 {64 * KiB + 3 * sc} {5 * sc}",
            f"write -z {128 * KiB + 4 * sc} {2 * sc}", f"write -P 0x33 {256 * KiB} {128 * KiB}",
            f"write -z {256 * KiB + sc} {sc}")
    return path


@pytest.mark.clause("qcow2.extended-l2.subclusters", "qcow2.extended-l2.bitmap")
def test_extended_l2_reads_per_subcluster(img: ImageKit) -> None:
    path = _extl2(img)
    want = _qemu_raw(path)
    with _open(img, path) as disk:
        assert _read_all(disk) == want, "reads differ from qemu-img convert"
        # subcluster 1 of cluster 0 is data, subclusters 0 and 2 are not: no run spans them
        _, n = disk.get_mapping(0, 64 * KiB)
        assert n == 2 * KiB, f"the first mapping covers {n} bytes, not one subcluster"


@pytest.mark.clause("qcow2.extended-l2.bitmap")
def test_invalid_subcluster_bitmap_is_corrupt(img: ImageKit) -> None:
    path = _extl2(img)
    image = Qcow2Bytes(path.read_bytes())
    l2 = image.u64(image.get("l1_table_offset")) & 0x00FFFFFFFFFFFE00
    image.put_u64(l2 + 8, (1 << 33) | (1 << 1))  # subcluster 1: allocated and zero
    path.write_bytes(bytes(image.data))
    with _open(img, path) as disk, pytest.raises(CorruptImageError):
        disk.read(0, 64 * KiB)


@pytest.mark.clause("qcow2.extended-l2.min-cluster")
def test_extended_l2_with_small_clusters_is_corrupt(img: ImageKit) -> None:
    image = img.crafted(256 * KiB, cluster_size=8 * KiB)
    image.set(incompatible_features=1 << 4, l1_size=4)
    with pytest.raises(CorruptImageError, match="8192"), img.open_bytes(image) as disk:
        disk.read(0, 4096)


# -- external data files ---------------------------------------------------------------------------


def _data_file_image(img: ImageKit, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    require_qemu()
    monkeypatch.chdir(img.tmp)  # QEMU 7.2 resolves relative data file names in the cwd
    path = img.tmp / "df.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=df.bin,cluster_size=4k", path, "1M")
    qemu_io(path, "write -P 0x51 0 5000", "write -P 0x52 300k 9000", "write -z 600k 8k")
    return path, img.tmp / "df.bin"


@pytest.mark.clause("qcow2.data-file.offsets")
def test_data_file_reads_as_qemu(img: ImageKit, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _data_file_image(img, monkeypatch)
    want = _qemu_raw(path)
    with _open(img, path) as disk:
        assert _read_all(disk) == want, "reads differ from qemu-img convert"
        mapping, _ = disk.get_mapping(0, 4096)
        assert getattr(mapping, "offset", None) == 0, f"guest 0 maps to {mapping}"


@pytest.mark.clause("qcow2.data-file.open")
def test_data_file_is_found_and_given(img: ImageKit, monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = _data_file_image(img, monkeypatch)
    want = _qemu_raw(path)
    moved = img.tmp / "moved.bin"
    shutil.move(data, moved)
    with pytest.raises(FileNotFoundError):
        _open(img, path)
    with _open(img, path, data_file=str(moved)) as disk:
        assert _read_all(disk) == want, "reads through data_file= differ"
    seen: list[tuple[str, str | None]] = []

    class Gate:
        def check(self, p: str, *, format: str | None, writable: bool, referrer: str) -> None:
            seen.append((p, format))

    shutil.move(moved, data)
    monkeypatch.chdir("/")  # found next to the image, not in the working directory
    with _open(img, path, gate=Gate()) as disk:
        assert _read_all(disk) == want
    assert seen == [(str(data), "raw")], f"the gate was asked {seen}"


# -- internal snapshots ----------------------------------------------------------------------------


def _snapshotted(img: ImageKit) -> Path:
    require_qemu()
    path = img.tmp / "snaps.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "1M")
    qemu_io(path, "write -P 0x61 0 300k")
    qemu_img("snapshot", "-c", "one", path)
    qemu_io(path, "write -P 0x62 4k 8k", "write -z 64k 64k")
    qemu_img("snapshot", "-c", "two", path)
    qemu_io(path, "write -P 0x63 0 1k")
    return path


@pytest.mark.clause("qcow2.snapshots.list")
def test_snapshots_are_listed_as_qemu_lists_them(img: ImageKit) -> None:
    path = _snapshotted(img)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    with _open(img, path) as disk:
        listed = getattr(getattr(disk, "driver", None), "snapshots", None)
        if listed is None:
            not_applicable("the driver lists no snapshots")
        got = [(s.id, s.name, s.vm_state_size, s.date_sec, s.date_nsec, s.vm_clock_nsec,
                s.disk_size) for s in listed]
    want = [(s["id"], s["name"], s["vm-state-size"], s["date-sec"], s["date-nsec"],
             s["vm-clock-sec"] * 10**9 + s["vm-clock-nsec"], 1 * MiB) for s in info["snapshots"]]
    assert got == want


@pytest.mark.clause("qcow2.snapshots.open")
def test_snapshots_open_as_qemu_img_convert_l(img: ImageKit) -> None:
    path = _snapshotted(img)
    for key in ("one", "2"):
        with _open(img, path, snapshot=key) as disk:
            assert _read_all(disk) == _qemu_raw(path, "-l", key), f"snapshot {key} differs"


@pytest.mark.clause("qcow2.snapshots.extra-data")
def test_writes_leave_the_snapshot_table_as_it_was(img: ImageKit) -> None:
    path = _snapshotted(img)
    image = Qcow2Bytes(path.read_bytes())
    at = image.get("snapshots_offset")
    table = bytes(image.data[at : at + 4096])
    with img.open(path) as disk:
        disk.write(b"\x99" * 10000, 2000)
        disk.write_zeroes(128 * KiB, 64 * KiB)
    assert path.read_bytes()[at : at + 4096] == table, "the snapshot table changed"


# -- lazy refcounts, dirty images ------------------------------------------------------------------


@pytest.mark.clause("qcow2.features.lazy-refcounts", "qcow2.features.dirty")
def test_dirty_lazy_refcounts_image_reads_without_writes(img: ImageKit) -> None:
    require_qemu()
    exe = shutil.which("qemu-io")
    if exe is None:
        not_applicable("qemu-io not installed")
    path = img.tmp / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", path, "1M")
    # abort() leaves the image dirty, its refcounts not written (iotest 039)
    subprocess.run([exe, "-f", "qcow2", "-c", "write -P 0x71 4k 100k", "-c", "abort", str(path)],
                   capture_output=True, timeout=60, check=False)
    assert Qcow2Bytes(path.read_bytes()).get("incompatible_features") & 1, "not dirty"
    want = _qemu_raw(path)
    before = _sha(path)
    with _open(img, path) as disk:
        assert _read_all(disk) == want
    assert _sha(path) == before, "a read-only open wrote to the dirty image"
