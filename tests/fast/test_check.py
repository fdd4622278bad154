"""pyimago.fast.check against ``qemu-img check`` (qcow2.corrupt.check, qcow2.corrupt.repair).

A few damaged images of the kinds QEMU's iotests build (060, 108, 138), each checked and
repaired by both tools on copies of the same bytes; the counts must agree, and a repaired
image must be as clean for qemu-img as for us.  (The shared differential test over all
damaged cases and both implementations is tests/interop/test_check_vs_qemu.py.)
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pyimago import fast
from pyimago.fast import InvalidRequestError, MemoryStorage
from pyimago.oracle.crash import RecordingStorage
from pyimago.reference import CheckResult

from .conftest import qemu_img

pytestmark = pytest.mark.usefixtures("needs_qemu")

CS = 512
MASK = 0x00FFFFFFFFFFFE00


def _u64(raw: bytearray, at: int) -> int:
    return int(struct.unpack_from(">Q", raw, at)[0])


def _put(raw: bytearray, at: int, value: int) -> None:
    struct.pack_into(">Q", raw, at, value)


def _refcount_at(raw: bytearray, cluster: int) -> int:
    return (_u64(raw, _u64(raw, 48)) & ~0x1FF) + 2 * cluster


def _base() -> bytearray:
    store = MemoryStorage()
    fast.create_image(store, 64 * 1024, cluster_size=CS)
    with fast.open_image(store, writable=True) as img:
        img.write(b"\x11" * 2048, 0)
        img.write(b"\x22" * 512, 40 * 1024)
    return bytearray(store.snapshot())


def _l2(raw: bytearray) -> int:
    return _u64(raw, _u64(raw, 40)) & MASK


def _leak(raw: bytearray) -> None:
    # A cluster counted but not referenced: a refcount for the cluster past the end.
    struct.pack_into(">H", raw, _refcount_at(raw, len(raw) // CS), 1)
    raw.extend(bytes(CS))


def _too_low(raw: bytearray) -> None:
    # Guest cluster 1 points at guest cluster 0's host cluster: referenced twice, counted
    # once (and its COPIED flags are then wrong too).
    l2 = _l2(raw)
    _put(raw, l2 + 8, _u64(raw, l2))


def _zero_refcount(raw: bytearray) -> None:
    # iotest 060-like: a referenced data cluster with refcount 0 needs a rebuild.
    host = _u64(raw, _l2(raw)) & MASK
    struct.pack_into(">H", raw, _refcount_at(raw, host // CS), 0)


def _copied_l1(raw: bytearray) -> None:
    # iotest 138: the COPIED flag dropped from the first L1 entry.
    l1 = _u64(raw, 40)
    _put(raw, l1, _u64(raw, l1) & ~(1 << 63))


def _reserved_bits(raw: bytearray) -> None:
    l2 = _l2(raw)
    _put(raw, l2 + 16, _u64(raw, l2 + 16) | 0x2)


def _outside(raw: bytearray) -> None:
    # A data cluster far past the end of the file.
    l2 = _l2(raw)
    _put(raw, l2 + 24, (1 << 63) | (len(raw) + 64 * CS))


DAMAGE: dict[str, Callable[[bytearray], None]] = {
    "clean": lambda raw: None,
    "leak": _leak,
    "refcount-too-low": _too_low,
    "refcount-zero": _zero_refcount,
    "copied-l1": _copied_l1,
    "reserved-bits": _reserved_bits,
    "outside-file": _outside,
}

_KEYS = ("corruptions", "leaks", "check-errors", "leaks-fixed", "corruptions-fixed",
         "image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters",
         "compressed-clusters")


def qemu_check(path: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(["qemu-img", "check", "--output=json", *args, str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    out: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    out["exit"] = proc.returncode
    out["stderr"] = proc.stderr
    return out


def counts(result: CheckResult) -> dict[str, int]:
    j = result.to_json()
    return {k: int(j.get(k, 0)) for k in _KEYS} | {"exit": result.exit_code}


def qemu_counts(out: dict[str, Any]) -> dict[str, int]:
    return {k: int(out.get(k, 0)) for k in _KEYS} | {"exit": out["exit"]}


@pytest.mark.clause("qcow2.corrupt.check")
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_check_counts_what_qemu_img_counts(tmp_path: Path, damage: str) -> None:
    raw = _base()
    DAMAGE[damage](raw)
    path = tmp_path / "d.qcow2"
    path.write_bytes(raw)
    want = qemu_check(path)
    got = fast.check(path)
    assert counts(got) == qemu_counts(want), want["stderr"]
    assert path.read_bytes() == raw  # checking changes nothing
    if damage != "clean":
        assert not got.clean and got.problems


@pytest.mark.clause("qcow2.corrupt.repair")
@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("damage", sorted(set(DAMAGE) - {"clean"}))
def test_repair_does_what_qemu_img_check_r_does(tmp_path: Path, damage: str, mode: str) -> None:
    raw = _base()
    DAMAGE[damage](raw)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    ours.write_bytes(raw)
    theirs.write_bytes(raw)
    want = qemu_check(theirs, "-r", mode)
    got = fast.check(ours, repair=mode)  # type: ignore[arg-type]
    if "corruptions" not in want and "leaks" not in want and "check-errors" not in want:
        # qemu-img gives up ("need to rebuild refcount structures": only -r all may).
        assert want["exit"] == got.exit_code == 1 and got.check_errors, want["stderr"]
        assert qemu_check(ours)["exit"] == qemu_check(theirs)["exit"]
        return
    assert counts(got) == qemu_counts(want), want["stderr"]
    # What remains after our repair is what remains after theirs, for both tools.
    after_ours, after_theirs = qemu_check(ours), qemu_check(theirs)
    assert qemu_counts(after_ours) == qemu_counts(after_theirs) | {
        "image-end-offset": qemu_counts(after_ours)["image-end-offset"]}
    assert counts(fast.check(ours)) == qemu_counts(after_ours)
    # The guest still reads what QEMU reads.
    if not after_ours.get("corruptions"):
        assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, theirs).returncode == 0


@pytest.mark.clause("qcow2.corrupt.repair", "crash.power-cut")
@pytest.mark.parametrize("damage", ["leak", "refcount-too-low", "refcount-zero", "copied-l1"])
def test_a_cut_during_repair_leaves_no_new_corruption(tmp_path: Path, damage: str) -> None:
    raw = _base()
    DAMAGE[damage](raw)
    path = tmp_path / "d.qcow2"
    path.write_bytes(raw)
    before = qemu_check(path)["stderr"].count("ERROR cluster")
    rec = RecordingStorage(MemoryStorage(bytes(raw)))
    fast.check(rec, repair="all")
    assert rec.mutations
    for k in range(1, rec.mutations + 1):
        path.write_bytes(bytes(rec.state_after(k)))
        out = qemu_check(path)
        # No refcount lower than its references beyond the damage we started from (COPIED
        # flags may lag behind a raised refcount for a moment, as in qemu-img's repair).
        assert out["stderr"].count("ERROR cluster") <= before, (k, out["stderr"])
        assert out["check-errors"] == 0, (k, out["stderr"])
    assert qemu_check(path).get("corruptions", 0) == 0


@pytest.mark.clause("qcow2.corrupt.check")
def test_check_agrees_on_snapshots_and_compressed_clusters(tmp_path: Path) -> None:
    src = tmp_path / "s.raw"
    src.write_bytes(bytes(range(256)) * 1024)
    path = tmp_path / "s.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, path)
    qemu_img("snapshot", "-c", "one", path)
    with fast.open_image(path, writable=True) as img:
        img.write(b"\x99" * 10000, 3000)
    qemu_img("snapshot", "-c", "two", path)
    assert counts(fast.check(path)) == qemu_counts(qemu_check(path))
    raw = bytearray(path.read_bytes())
    _leak_4k(raw)
    path.write_bytes(raw)
    want = qemu_check(path)
    assert want.get("leaks") == 1
    assert counts(fast.check(path)) == qemu_counts(want)


def _leak_4k(raw: bytearray) -> None:
    raw.extend(bytes(-len(raw) % 4096))
    block = _u64(raw, _u64(raw, 48)) & ~0x1FF
    struct.pack_into(">H", raw, block + 2 * (len(raw) // 4096), 1)
    raw.extend(bytes(4096))


def test_check_refuses_bad_arguments_and_raw_images(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="repair"):
        fast.check(MemoryStorage(bytes(_base())), repair="everything")  # type: ignore[arg-type]
    with pytest.raises(fast.UnsupportedError, match="not a qcow2"):
        fast.check(MemoryStorage(bytes(4096)))
