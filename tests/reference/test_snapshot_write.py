"""Internal snapshots made, applied and deleted by pyimago.reference, checked against QEMU.

Sequences of writes, resizes and snapshot operations run with pyimago and ``qemu-img
snapshot`` taking turns on the same image, against a model of the active disk and of every
snapshot; after each step ``qemu-img check`` finds no error and no leak, and at the end
``qemu-img info`` lists the snapshots as the model says, ``qemu-img convert -l`` of each reads
what the model kept, and our own check() agrees with QEMU's.  A power cut after any storage
write of each operation leaves leaks and, at worst, COPIED flags that are clear where they
could be set (never the other way round); ``qemu-img check -r all`` then repairs the image
and every byte reads as before or after the operation.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pyimago.oracle.crash import RecordingStorage
from pyimago.reference import (
    InvalidRequestError,
    MemoryStorage,
    ReadOnlyError,
    UnsupportedError,
    check,
    create_image,
    open_image,
)
from pyimago_tests_reference_helpers import (
    KiB,
    MiB,
    qemu_check,
    qemu_img,
    qemu_io,
    qemu_json,
)

pytestmark = pytest.mark.qemu


@dataclass
class Model:
    """What the active disk and each snapshot must read."""

    disk: bytearray
    snapshots: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # name: (id, data)
    next_id: int = 1
    cluster_size: int = 64 * KiB


def _convert_snapshot(path: Path, sid: str, tmp: Path) -> bytes:
    out = tmp / f"snap-{sid}.raw"
    qemu_img("convert", "-O", "raw", "-l", sid, path, out)
    return out.read_bytes()


def _run(path: Path, ops: list[tuple[str, ...]], model: Model, who: str) -> None:
    """Apply ``ops`` to the image and the model; ``who`` says which tool does each op:
    "ours", "qemu", or "mixed" (turns)."""
    for i, op in enumerate(ops):
        ours = who == "ours" or (who == "mixed" and i % 2 == 0)
        kind = op[0]
        if kind in ("write", "cwrite"):
            # cwrite: one whole cluster, compressed, into an unallocated one.
            off, pat = int(op[1]), int(op[-1])
            n = int(op[2]) if kind == "write" else model.cluster_size
            if ours:
                with open_image(path, writable=True) as img:
                    (img.write if kind == "write" else img.write_compressed)(
                        bytes([pat]) * n, off)
            else:
                flag = "" if kind == "write" else "-c "
                qemu_io(path, [f"write {flag}-P {pat} {off} {n}"])
            model.disk[off : off + n] = bytes([pat]) * n
        elif kind == "create":
            name = op[1]
            if ours:
                with open_image(path, writable=True) as img:
                    info = img.create_snapshot(name)
                assert (info.id, info.name, info.disk_size) == (
                    str(model.next_id), name, len(model.disk))
            else:
                qemu_img("snapshot", "-c", name, path)
            model.snapshots[name] = (str(model.next_id), bytes(model.disk))
            model.next_id += 1
        elif kind == "apply":
            name = op[1]
            if ours:
                with open_image(path, writable=True) as img:
                    img.apply_snapshot(name)
            else:
                qemu_img("snapshot", "-a", name, path)
            model.disk = bytearray(model.snapshots[name][1])
        elif kind == "delete":
            name = op[1]
            sid = model.snapshots[name][0]
            if ours:
                with open_image(path, writable=True) as img:
                    img.delete_snapshot(sid if i % 3 else name)  # by ID or by name
            else:
                # qemu-img 7.2 snapshot -d finds the snapshot by name only
                # (bdrv_snapshot_find).
                qemu_img("snapshot", "-d", name, path)
            del model.snapshots[name]
            model.next_id = max([int(s) for s, _ in model.snapshots.values()], default=0) + 1
        elif kind == "resize":
            new = int(op[1])
            if ours:
                with open_image(path, writable=True) as img:
                    img.resize(new)
            else:
                qemu_img("resize", "-q", "--shrink", path, str(new))
            model.disk = model.disk[:new] + bytearray(max(0, new - len(model.disk)))
        qemu_check(path)


def _verify(path: Path, model: Model, tmp: Path) -> None:
    with open_image(path) as img:
        assert img.read(0, img.size) == model.disk
        listed = [(s.id, s.name, s.disk_size) for s in img.snapshots()]
    assert listed == [(sid, name, len(data)) for name, (sid, data) in model.snapshots.items()]
    info: dict[str, object] = qemu_json("info", path)
    theirs = [(s["id"], s["name"]) for s in info.get("snapshots", [])]  # type: ignore[attr-defined]
    assert theirs == [(sid, name) for name, (sid, _) in model.snapshots.items()]
    size = len(model.disk)
    for sid, data in model.snapshots.values():
        # qemu-img convert -l reads a snapshot at the image's current size.
        expected = data[:size] + bytes(max(0, size - len(data)))
        assert _convert_snapshot(path, sid, tmp) == expected, f"snapshot {sid}"
    ours = check(path).to_json()
    report = json.loads(qemu_img("check", "--output=json", path).stdout)
    for key in ("corruptions", "leaks", "check-errors", "allocated-clusters",
                "total-clusters", "compressed-clusters", "fragmented-clusters",
                "image-end-offset"):
        assert ours.get(key, 0) == report.get(key, 0), key


SCENARIO: list[tuple[str, ...]] = [
    ("write", "0", "70000", "1"),
    ("create", "base"),
    ("cwrite", "786432", "11"),
    ("write", "4096", "9000", "2"),
    ("create", "second"),
    ("write", "300000", "65536", "3"),
    ("apply", "base"),
    ("write", "500", "100", "4"),
    ("delete", "second"),
    ("create", "third"),
    ("resize", str(2 * MiB)),
    ("write", str(MiB + 4096), "70000", "5"),
    ("cwrite", str(MiB + 512 * KiB), "12"),
    ("create", "big"),
    ("apply", "third"),
    ("write", "65536", "4096", "6"),
    ("delete", "base"),
    ("apply", "big"),
    ("delete", "third"),
]


@pytest.mark.clause(
    "qcow2.snapshots.create-refcounts",
    "qcow2.snapshots.id-assignment",
    "qcow2.snapshots.apply-revert",
    "qcow2.snapshots.lookup-id-then-name",
    "qcow2.snapshots.delete-release",
    "qcow2.snapshots.list",
)
@pytest.mark.parametrize("who", ["ours", "mixed", "mixed-qemu-first"])
@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB])
def test_snapshot_sequences_agree_with_qemu(tmp_path: Path, who: str, cluster_size: int
                                            ) -> None:
    path = tmp_path / "t.qcow2"
    create_image(path, MiB, cluster_size=cluster_size)
    model = Model(bytearray(MiB), cluster_size=cluster_size)
    ops = SCENARIO if who != "mixed-qemu-first" else [("write", "0", "1", "9"), *SCENARIO]
    _run(path, ops, model, "ours" if who == "ours" else "mixed")
    _verify(path, model, tmp_path)


@pytest.mark.clause("qcow2.snapshots.v2-no-resize", "qcow2.snapshots.create-refcounts")
def test_v2_images(tmp_path: Path) -> None:
    """compat=0.10: snapshots made, applied and deleted pass qemu-img check; resizing is
    refused as QEMU refuses it."""
    path = tmp_path / "v2.qcow2"
    create_image(path, MiB, compat="0.10", cluster_size=4 * KiB)
    model = Model(bytearray(MiB), cluster_size=4 * KiB)
    ops = [op for op in SCENARIO
           if op[0] != "resize" and op[1] != "big"
           and int(op[1] if op[0] in ("write", "cwrite") else 0) < MiB]
    _run(path, ops, model, "mixed")
    _verify(path, model, tmp_path)
    with open_image(path, writable=True) as img:
        img.create_snapshot("last")
        with pytest.raises(UnsupportedError, match="v2"):
            img.resize(2 * MiB)
        with pytest.raises(UnsupportedError, match="v2"):
            img.resize(512 * KiB)
        assert img.size == MiB
    qemu_check(path)


@pytest.mark.clause("qcow2.snapshots.create-refcounts", "qcow2.snapshots.extra-data")
def test_qemu_made_snapshots_and_compressed_clusters(tmp_path: Path) -> None:
    """An image qemu-img convert -c made, with a QEMU snapshot: ours on top of it."""
    src = tmp_path / "src.raw"
    data = bytearray((b"compressible " * 100_000)[: MiB])
    src.write_bytes(bytes(data))
    path = tmp_path / "t.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", src, path)
    qemu_img("snapshot", "-c", "q1", path)
    model = Model(data, {"q1": ("1", bytes(data))}, 2)
    _run(path, [("write", "1000", "70000", "7"), ("create", "ours"), ("apply", "q1"),
                ("delete", "q1"), ("write", "0", "10", "8")], model, "ours")
    _verify(path, model, tmp_path)


@pytest.mark.clause("qcow2.snapshots.id-assignment", "qcow2.snapshots.lookup-id-then-name",
                    "qcow2.snapshots.create-refcounts")
def test_refused_snapshot_requests(tmp_path: Path) -> None:
    storage = MemoryStorage()
    create_image(storage, MiB)
    with open_image(storage, writable=True) as img:
        img.create_snapshot("a")
        for bad in ("", "a", "x" * 65536):
            with pytest.raises(InvalidRequestError):
                img.create_snapshot(bad)
        for missing in ("b", "2", ""):
            with pytest.raises(InvalidRequestError):
                img.apply_snapshot(missing)
            with pytest.raises(InvalidRequestError):
                img.delete_snapshot(missing)
        assert [s.name for s in img.snapshots()] == ["a"]
    with open_image(storage) as img:
        with pytest.raises(ReadOnlyError):
            img.create_snapshot("c")
        with pytest.raises(ReadOnlyError):
            img.delete_snapshot("a")
    one_bit = MemoryStorage()
    create_image(one_bit, MiB, refcount_bits=1)
    with open_image(one_bit, writable=True) as img:
        img.write(b"x", 0)
        img.flush()
        before = one_bit.read(0, one_bit.size())
        with pytest.raises(UnsupportedError):
            img.create_snapshot("no room")  # a refcount of 2 does not fit in one bit
        assert one_bit.read(0, one_bit.size()) == before
    raw = MemoryStorage()
    create_image(raw, MiB, format="raw")
    with open_image(raw, format="raw", writable=True) as img:
        with pytest.raises(UnsupportedError):
            img.create_snapshot("r")
        with pytest.raises(UnsupportedError):
            img.snapshots()


# -- power cuts ------------------------------------------------------------------------------

_ALLOWED = re.compile(
    r"^(Leaked cluster \d+ refcount=\d+ reference=\d+"
    r"|ERROR OFLAG_COPIED (data|L2) cluster: .*refcount=1)$"
)


def _judge(image: bytes) -> tuple[list[str], bytes]:
    """qemu-img check's findings QEMU's own order may leave too (leaks, and COPIED clear
    where the refcount is 1) are allowed, nothing else; returns the problems and the image
    after ``qemu-img check -r all``."""
    with tempfile.NamedTemporaryFile(suffix=".qcow2") as f:
        f.write(image)
        f.flush()
        proc = subprocess.run(["qemu-img", "check", "-f", "qcow2", f.name],
                              capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        bad = [ln for ln in lines if not _ALLOWED.match(ln)]
        for ln in lines:
            m = re.match(r"ERROR OFLAG_COPIED data cluster: l2_entry=([0-9a-f]+)", ln)
            if m:
                assert not int(m.group(1), 16) & (1 << 63), f"COPIED set on a shared: {ln}"
            m = re.match(r"ERROR OFLAG_COPIED L2 cluster: .*l1_entry=([0-9a-f]+)", ln)
            if m:
                assert not int(m.group(1), 16) & (1 << 63), f"COPIED set on a shared: {ln}"
        subprocess.run(["qemu-img", "check", "-q", "-r", "all", "-f", "qcow2", f.name],
                       capture_output=True, check=False)
        again = subprocess.run(["qemu-img", "check", "-f", "qcow2", f.name],
                               capture_output=True, text=True, check=False)
        if again.returncode:
            bad.append(f"not clean after check -r all: {again.stdout} {again.stderr}")
        repaired = Path(f.name).read_bytes()
    return bad, repaired


def _state(image: bytes) -> tuple[bytes, dict[str, bytes]]:
    with open_image(MemoryStorage(image, name="cut")) as img:
        disk = img.read(0, img.size)
        names = {s.name: s.id for s in img.snapshots()}
    snaps = {}
    for name, sid in names.items():
        with open_image(MemoryStorage(image, name="cut"), snapshot=sid) as sn:
            snaps[name] = sn.read(0, sn.size)
    return disk, snaps


def _base_image() -> bytes:
    storage = MemoryStorage()
    create_image(storage, 256 * KiB, cluster_size=512)
    with open_image(storage, writable=True) as img:
        img.write(b"A" * 40_000, 0)
        img.write(b"C" * 3000, 140_000)
        img.create_snapshot("old")
        img.write(b"B" * 5000, 1000)
        img.write(b"D" * 700, 200_000)
    return storage.read(0, storage.size())


@pytest.mark.clause("crash.power-cut", "crash.snapshot.copied-conservative")
@pytest.mark.parametrize("op", ["create", "apply", "delete"])
def test_power_cut_during_snapshot_operation(op: str) -> None:
    base = _base_image()
    before = _state(base)
    rec = RecordingStorage(MemoryStorage(base, name="top"))
    with open_image(rec, writable=True) as img:
        if op == "create":
            img.create_snapshot("new")
        elif op == "apply":
            img.apply_snapshot("old")
        else:
            img.delete_snapshot("old")
    after = _state(rec.state_after(rec.mutations))
    assert after != before
    assert rec.mutations > 3
    for k, state in rec.cut_states(since=0):
        bad, repaired = _judge(bytes(state))
        assert not bad, f"{op}: cut after mutation {k} of {rec.mutations}: {bad}"
        assert _state(bytes(state)) in (before, after), f"{op}: cut {k}"
        assert _state(repaired) in (before, after), f"{op}: cut {k}, repaired"


@pytest.mark.clause("qcow2.snapshots.create-refcounts", "qcow2.snapshots.apply-revert")
def test_snapshots_of_an_overlay_act_on_the_top_image(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create_image(base, MiB)
    with open_image(base, writable=True) as img:
        img.write(b"b" * 200_000, 0)
    create_image(top, None, backing_file="base.qcow2", backing_fmt="qcow2")
    with open_image(top, writable=True) as img:
        img.write(b"t" * 5000, 100_000)
        before = img.read(0, MiB)
        img.create_snapshot("s")
        img.write(b"u" * 5000, 150_000)
        assert img.read(0, MiB) != before
        img.apply_snapshot("s")
        assert img.read(0, MiB) == before
    with open_image(base) as img:
        assert img.snapshots() == ()
    qemu_check(top)
    qemu_check(base)
    assert _convert_snapshot(top, "1", tmp_path) == before
