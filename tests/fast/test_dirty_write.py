"""pyimago.fast and the header's state bits when writing: lazy refcounts, the dirty bit (a
writable open repairs first), and the corrupt bit (writable opens refused with the reason) -- each
against qemu-img (the bitmaps extension: test_bitmaps.py)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

import pytest
from pyimago import fast
from pyimago.fast import InvalidRequestError, MemoryStorage, UnsupportedFeatureError

from .conftest import assert_qemu_check_clean, qemu_img, qemu_raw_bytes

pytestmark = pytest.mark.usefixtures("needs_qemu")

KiB = 1024


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _u64(path: Path, at: int) -> int:
    with path.open("rb") as f:
        f.seek(at)
        return int(struct.unpack(">Q", f.read(8))[0])


def _dirty_image(tmp: Path) -> Path:
    """A lazy-refcounts image qemu-io left dirty (iotest 039's way): refcounts unwritten."""
    path = tmp / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096",
             path, "2M")
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x72 4096 200k", "-c", "abort", str(path)],
        capture_output=True, timeout=60, check=False,
    )
    assert proc.returncode != 0
    assert _u64(path, 72) & 1, "qemu left no dirty bit"
    return path


@pytest.mark.qemu
@pytest.mark.clause("qcow2.features.lazy-refcounts", "qcow2.features.lazy-refcounts-create")
def test_create_lazy_refcounts_as_qemu(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    fast.create_image(ours, 1 << 20, lazy_refcounts=True)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", theirs, "1M")
    for path in (ours, theirs):
        info = json.loads(qemu_img("info", "--output=json", path).stdout)
        assert info["format-specific"]["data"]["lazy-refcounts"] is True
    with fast.open_image(ours, writable=True) as img:
        assert img.info().qcow2 is not None and img.info().qcow2.lazy_refcounts
        img.write(b"lazy" * 5000, 70000)
    # We update refcounts eagerly: never dirty, always clean.
    assert _u64(ours, 72) & 1 == 0 and _u64(ours, 80) == 1
    assert_qemu_check_clean(ours)
    for bad in ({"lazy_refcounts": "on"}, {"lazy_refcounts": True, "compat": "0.10"}):
        with pytest.raises(InvalidRequestError):
            fast.create_image(tmp_path / "bad.qcow2", 1 << 20, **bad)  # type: ignore[arg-type]


@pytest.mark.qemu
@pytest.mark.clause("qcow2.features.dirty", "crash.readonly-open")
def test_a_writable_open_repairs_a_dirty_image_first(tmp_path: Path) -> None:
    path = _dirty_image(tmp_path)
    want = qemu_raw_bytes(path, tmp_path)
    before = _sha(path)
    with fast.open_image(path) as img:
        assert img.info().dirty
        assert img.read(0, len(want)) == want
    assert _sha(path) == before, "a read-only open wrote to the dirty image"
    with fast.open_image(path, writable=True) as img:
        assert not img.info().dirty
        img.write(b"after repair" * 1000, 300 * KiB)
    assert _u64(path, 72) & 1 == 0
    assert_qemu_check_clean(path)
    got = qemu_raw_bytes(path, tmp_path)
    assert got[: 300 * KiB] == want[: 300 * KiB]
    assert got[300 * KiB : 300 * KiB + 12000] == b"after repair" * 1000


@pytest.mark.qemu
@pytest.mark.clause("qcow2.features.corrupt", "qcow2.features.dirty")
def test_corrupt_images_are_refused_writable_with_the_reason(tmp_path: Path) -> None:
    path = _dirty_image(tmp_path)
    with path.open("r+b") as f:  # dirty and corrupt: corrupt decides, nothing is repaired
        f.seek(72)
        f.write(struct.pack(">Q", 3))
    before = _sha(path)
    with pytest.raises(UnsupportedFeatureError, match="corrupt") as info:
        fast.open_image(path, writable=True)
    assert "read-only" in str(info.value) and "qemu-img check -r all" in str(info.value)
    assert _sha(path) == before
    with fast.open_image(path) as img:
        assert img.read(4096, 4) == b"\x72" * 4
    assert _sha(path) == before


@pytest.mark.clause("qcow2.features.dirty")
def test_a_dirty_image_that_cannot_be_repaired_is_not_opened_writable() -> None:
    store = MemoryStorage()
    fast.create_image(store, 1 << 20, cluster_size=4096)
    with fast.open_image(store, writable=True) as img:
        img.write(b"x" * 8192, 0)
    raw = bytearray(store.snapshot())
    struct.pack_into(">Q", raw, 72, 1)
    # An L2 entry pointing into the header cluster: not a refcount problem a rebuild fixes.
    hdr_l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, hdr_l1)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", raw, l2, (1 << 63) | 0x200)
    damaged = MemoryStorage(raw)
    with pytest.raises(fast.PyimagoError):
        fast.open_image(damaged, writable=True)
    # Still dirty (never written as clean), and it still opens read-only.
    assert struct.unpack_from(">Q", damaged.snapshot(), 72)[0] & 1
    fast.open_image(damaged).close()
