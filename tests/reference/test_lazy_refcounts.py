"""Lazy refcounts, the dirty bit and the corrupt bit on open, checked against QEMU.

QEMU leaves a lazy-refcount image dirty when it dies mid-write (qemu-io ``abort``, as iotest
039 does); pyimago reads it without writing, and a writable open rebuilds the refcounts before
it clears the bit -- after which qemu-img check is clean and the guest reads what QEMU wrote.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pyimago.oracle.crash import RecordingStorage
from pyimago.reference import (
    CorruptImageError,
    InvalidRequestError,
    MemoryStorage,
    UnsupportedFeatureError,
    create_image,
    open_image,
)
from pyimago_tests_reference_helpers import (
    KiB,
    MiB,
    header_of,
    patch_header,
    qemu_check,
    qemu_img,
)

pytestmark = pytest.mark.qemu

DIRTY, CORRUPT, LAZY = 1 << 0, 1 << 1, 1 << 0


def _dirty_qemu_image(path: Path) -> bytes:
    """A lazy-refcount image QEMU died writing: dirty bit set, refcounts stale."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096",
             path, "2M")
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x72 4096 200k",
         "-c", "write -P 0x35 1M 64k", "-c", "abort", str(path)],
        capture_output=True, timeout=60, check=False,
    )
    assert proc.returncode != 0
    data = path.read_bytes()
    assert header_of(data).incompatible_features & DIRTY, "qemu left no dirty bit"
    report = json.loads(qemu_img("check", "--output=json", path, ok=(0, 2, 3)).stdout)
    assert report.get("corruptions", 0), "QEMU's refcounts should be stale"
    return data


def _expected(tmp_path: Path) -> bytes:
    model = bytearray(2 * MiB)
    model[4096 : 4096 + 200 * KiB] = b"\x72" * (200 * KiB)
    model[MiB : MiB + 64 * KiB] = b"\x35" * (64 * KiB)
    return bytes(model)


@pytest.mark.clause("qcow2.lazy-refcounts.create", "qcow2.lazy-refcounts.eager")
def test_create_lazy_refcounts_like_qemu(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    create_image(ours, MiB, lazy_refcounts=True)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", theirs, str(MiB))
    info = json.loads(qemu_img("info", "--output=json", ours).stdout)
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    h_ours, h_theirs = header_of(ours.read_bytes()), header_of(theirs.read_bytes())
    assert h_ours.compatible_features == h_theirs.compatible_features == LAZY
    with open_image(ours, writable=True) as img:
        assert img.info().qcow2 is not None and img.info().qcow2.lazy_refcounts
        img.write(b"lazy" * 30000, 1000)
        # Eager refcounts: the image is never dirty, not even while open.
        assert not header_of(ours.read_bytes()).incompatible_features & DIRTY
    qemu_check(ours)
    with pytest.raises(InvalidRequestError, match="compat"):
        create_image(tmp_path / "v2.qcow2", MiB, lazy_refcounts=True, compat="0.10")
    with pytest.raises(InvalidRequestError):
        create_image(tmp_path / "bad.qcow2", MiB, lazy_refcounts="on")


@pytest.mark.clause("qcow2.dirty.repair-on-open", "qcow2.features.dirty")
def test_writable_open_repairs_a_dirty_qemu_image(tmp_path: Path) -> None:
    path = tmp_path / "dirty.qcow2"
    dirty = _dirty_qemu_image(path)
    expected = _expected(tmp_path)
    with open_image(path) as img:
        assert img.read(0, img.size) == expected
    assert path.read_bytes() == dirty, "a read-only open wrote to the dirty image"
    with open_image(path, writable=True) as img:
        assert not header_of(path.read_bytes()).incompatible_features & DIRTY
        copy = tmp_path / "copy.qcow2"  # the open image is locked
        copy.write_bytes(path.read_bytes())
        qemu_check(copy)  # repaired before any write
        assert img.read(0, img.size) == expected
        img.write(b"after" * 1000, 300 * KiB)
    qemu_check(path)
    with open_image(path) as img:
        assert img.read(300 * KiB, 5000) == b"after" * 1000


@pytest.mark.clause("qcow2.dirty.repair-on-open", "crash.power-cut")
def test_power_cut_during_the_repair(tmp_path: Path) -> None:
    """The dirty bit goes last: a cut anywhere in the repair leaves it set (and the next
    writable open repairs) or leaves a clean image."""
    dirty = _dirty_qemu_image(tmp_path / "dirty.qcow2")
    expected = _expected(tmp_path)
    rec = RecordingStorage(MemoryStorage(dirty, name="top"))
    with open_image(rec, writable=True):
        pass
    assert rec.mutations > 1
    cut_path = tmp_path / "cut.qcow2"
    for k, state in rec.cut_states(since=0):
        cut_path.write_bytes(bytes(state))
        if header_of(state).incompatible_features & DIRTY:
            with open_image(cut_path, writable=True):
                pass
        else:
            assert k == rec.mutations, f"the dirty bit went at mutation {k}, not last"
        qemu_check(cut_path)
        with open_image(cut_path) as img:
            assert img.read(0, img.size) == expected, f"cut {k}"


@pytest.mark.clause("qcow2.dirty.repair-on-open", "qcow2.features.corrupt")
def test_dirty_and_corrupt_is_refused_untouched(tmp_path: Path) -> None:
    data = bytearray(_dirty_qemu_image(tmp_path / "dirty.qcow2"))
    patch_header(data, incompatible_features=DIRTY | CORRUPT)
    storage = MemoryStorage(data)
    with pytest.raises(UnsupportedFeatureError, match="corrupt") as info:
        open_image(storage, writable=True, backing=None)
    assert "qemu-img check -r all" in str(info.value)  # the reason, and the way out
    assert storage.snapshot() == data


def test_unrepairable_dirty_image_is_refused() -> None:
    storage = MemoryStorage()
    create_image(storage, MiB, cluster_size=4 * KiB)
    with open_image(storage, writable=True) as img:
        img.write(b"x" * 4096, 0)
    data = bytearray(storage.snapshot())
    h = header_of(data)
    # The L1 entry points into the header: no repair can make that consistent.
    data[h.l1_table_offset : h.l1_table_offset + 8] = (0x8000000000000200).to_bytes(8, "big")
    patch_header(data, incompatible_features=DIRTY)
    with pytest.raises(CorruptImageError):
        open_image(MemoryStorage(data), writable=True, backing=None)


@pytest.mark.clause("qcow2.dirty.repair-on-open", "qcow2.bitmaps.in-use")
def test_repair_keeps_the_bitmaps(tmp_path: Path) -> None:
    """The repair counts the bitmaps' clusters: it must not free them."""
    path = tmp_path / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096",
             path, "1M")
    qemu_img("bitmap", "--add", path, "b0")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 100k", "-c", "abort",
                    str(path)], capture_output=True, timeout=60, check=False)
    assert header_of(path.read_bytes()).incompatible_features & DIRTY
    with open_image(path, writable=True) as img:
        img.write(b"w" * 4096, 200 * KiB)
    qemu_check(path)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["b0"]
