"""pyimago.fast and the bitmaps extension (qcow2.bitmaps.in-use,
qcow2.features.autoclear-clear): a writable open flags every bitmap in use and keeps the
autoclear bit, as QEMU's own writable open; check() counts the bitmaps' clusters as
qcow2_check_bitmaps_refcounts does -- each against qemu-img."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyimago import fast
from pyimago.fast import CorruptImageError

from .conftest import assert_qemu_check_clean, qemu_img, qemu_raw_bytes

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("needs_qemu")]

BITMAPS_EXT = 0x23852875


def _u64(path: Path, at: int) -> int:
    with path.open("rb") as f:
        f.seek(at)
        return int(struct.unpack(">Q", f.read(8))[0])


def _bitmap_image(tmp: Path, *names: str) -> Path:
    """An image whose persistent bitmaps QEMU stored with data clusters (qemu-io wrote
    while they were enabled)."""
    path = tmp / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    for name in names:
        qemu_img("bitmap", "--add", path, name)
    subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", str(path)], check=True,
                   capture_output=True, timeout=60)
    return path


def _qemu_check(path: Path) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def _bitmaps(path: Path) -> list[dict[str, Any]]:
    out = json.loads(qemu_img("info", "--output=json", path).stdout)
    found: list[dict[str, Any]] = out["format-specific"]["data"].get("bitmaps", [])
    return found


def _assert_check_agrees(path: Path) -> None:
    rc, want, _ = _qemu_check(path)
    got = fast.check(path)
    assert (got.leaks, got.corruptions, got.check_errors) == (
        want.get("leaks", 0), want.get("corruptions", 0), want["check-errors"]), (got, want)
    assert got.image_end_offset == want["image-end-offset"]
    assert got.allocated_clusters == want["allocated-clusters"]
    assert rc == (0 if got.clean else 3)


@pytest.mark.clause("qcow2.bitmaps.in-use", "qcow2.features.autoclear-clear",
                    "qcow2.extensions.preserved")
def test_writable_open_flags_bitmaps_in_use_and_keeps_the_autoclear_bit(tmp_path: Path) -> None:
    path = _bitmap_image(tmp_path, "b0", "b1")
    assert _u64(path, 88) == 1
    assert all("in-use" not in b["flags"] for b in _bitmaps(path))
    _assert_check_agrees(path)  # QEMU's bitmap clusters are no leak to fast.check either
    before = path.read_bytes()
    with fast.open_image(path) as img:
        assert img.read(0, 4) == b"\1" * 4
    assert path.read_bytes() == before, "a read-only open touched the image"
    with fast.open_image(path, writable=True) as img:
        img.write(b"abc", 100000)
    # The autoclear bit stays, the extension area is unchanged, each bitmap is in use.
    assert _u64(path, 88) == 1
    assert path.read_bytes()[72:512] == before[72:512]
    bitmaps = _bitmaps(path)
    assert sorted(b["name"] for b in bitmaps) == ["b0", "b1"]
    assert all("in-use" in b["flags"] for b in bitmaps), bitmaps
    rc, out, err = _qemu_check(path)
    assert rc == 0, (out, err)
    assert out.get("leaks", 0) == 0 and out.get("corruptions", 0) == 0
    assert_qemu_check_clean(path)
    _assert_check_agrees(path)
    assert qemu_raw_bytes(path, tmp_path)[100000:100003] == b"abc"
    # QEMU opens it writable again and drops the inconsistent bitmaps' data only when told.
    qemu_img("bitmap", "--remove", path, "b0")
    assert [b["name"] for b in _bitmaps(path)] == ["b1"]
    assert_qemu_check_clean(path)


@pytest.mark.clause("qcow2.bitmaps.in-use", "qcow2.features.autoclear-clear")
def test_unknown_autoclear_bits_go_and_the_bitmaps_bit_stays(tmp_path: Path) -> None:
    path = _bitmap_image(tmp_path, "b0")
    with path.open("r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", (1 << 40) | 1))
    with fast.open_image(path, writable=True) as img:
        img.write(b"x", 0)
    assert _u64(path, 88) == 1
    assert "in-use" in _bitmaps(path)[0]["flags"]
    assert_qemu_check_clean(path)


@pytest.mark.clause("qcow2.bitmaps.in-use")
def test_check_repair_keeps_the_bitmaps_clusters(tmp_path: Path) -> None:
    path = _bitmap_image(tmp_path, "b0")
    for repair in ("leaks", "all"):
        res = fast.check(path, repair=repair)
        assert res.clean and not res.leaks_fixed and not res.corruptions_fixed, res
    assert_qemu_check_clean(path)
    _assert_check_agrees(path)
    # Without the autoclear bit, the bitmaps hold nothing: both call them leaks.
    with path.open("r+b") as f:
        f.seek(88)
        f.write(bytes(8))
    _, want, _ = _qemu_check(path)
    assert want.get("leaks", 0) > 0
    _assert_check_agrees(path)


@pytest.mark.clause("qcow2.bitmaps.in-use")
def test_malformed_bitmap_directory_refuses_the_writable_open(tmp_path: Path) -> None:
    path = _bitmap_image(tmp_path, "b0")
    raw = bytearray(path.read_bytes())
    pos = struct.unpack_from(">I", raw, 100)[0]
    while struct.unpack_from(">I", raw, pos)[0] != BITMAPS_EXT:
        pos += 8 + (struct.unpack_from(">I", raw, pos + 4)[0] + 7) // 8 * 8
    struct.pack_into(">Q", raw, pos + 8 + 16, 0x123)  # directory offset: not aligned
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptImageError, match="0x123"):
        fast.open_image(path, writable=True)
    assert fast.check(path).corruptions >= 1
