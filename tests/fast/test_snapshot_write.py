"""pyimago.fast's internal snapshots (create, apply, delete) against qemu-img: what we do
lists, converts and checks as QEMU's own work does; QEMU's snapshots apply and delete with
ours as with qemu-img; a power cut anywhere in an operation leaves nothing harmful."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pyimago import fast
from pyimago.fast import (
    InvalidRequestError,
    MemoryStorage,
    PreallocateMode,
    ReadOnlyError,
    UnsupportedError,
)
from pyimago.fast import _snapshot_write as sw
from pyimago.fast._entries import COMPRESSED, COPIED, HOST_MASK
from pyimago.oracle.crash import RecordingStorage

from .conftest import assert_qemu_check_clean, qemu_img, qemu_raw_bytes

pytestmark = pytest.mark.usefixtures("needs_qemu")

KiB = 1024
MiB = 1024 * KiB


def _listing(path: Path) -> list[tuple[str, str, int]]:
    """(id, name, vm-state size) of ``qemu-img snapshot -l``'s JSON (via info)."""
    out = json.loads(qemu_img("info", "--output=json", path).stdout)
    return [(s["id"], s["name"], s["vm-state-size"]) for s in out.get("snapshots", [])]


def _snapshot_bytes(path: Path, key: str, tmp: Path) -> bytes:
    out = tmp / f"snap-{key}.raw"
    qemu_img("convert", "-l", key, "-O", "raw", path, out)
    return out.read_bytes()


def _check_json(path: Path) -> dict[str, int]:
    # -U: the image may be open (and locked) by the test itself.
    proc = subprocess.run(["qemu-img", "check", "-U", "--output=json", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    return json.loads(proc.stdout)


def _assert_fast_check_as_qemu(path: Path) -> None:
    """fast.check counts what qemu-img check counts (snapshot-shared clusters included)."""
    theirs = _check_json(path)
    ours = fast.check(str(path))
    assert (ours.corruptions, ours.leaks, ours.check_errors) == (0, 0, 0)
    assert ours.allocated_clusters == theirs["allocated-clusters"]
    assert ours.fragmented_clusters == theirs.get("fragmented-clusters", 0)
    assert ours.compressed_clusters == theirs.get("compressed-clusters", 0)


@pytest.mark.qemu
@pytest.mark.clause("qcow2.snapshots.create-refcounts", "qcow2.snapshots.apply-revert",
                    "qcow2.snapshots.delete-release", "qcow2.snapshots.id-assignment",
                    "qcow2.snapshots.preserved", "qcow2.snapshots.list")
@pytest.mark.parametrize("opts", [{}, {"compat": "0.10"}, {"cluster_size": 4096,
                                                           "refcount_bits": 4}])
def test_snapshot_round_trip_as_qemu_sees_it(tmp_path: Path, opts: dict[str, object]) -> None:
    path = tmp_path / "s.qcow2"
    size = 3 * MiB
    fast.create_image(path, size, **opts)  # type: ignore[arg-type]
    rnd = random.Random(4)
    first = rnd.randbytes(MiB)
    with fast.open_image(path, writable=True) as img:
        img.write(first, 256 * KiB)
        img.write_compressed(b"c" * img.driver.cluster_size, 2 * MiB)
        one = img.create_snapshot("one")
        assert (one.id, one.name, one.disk_size, one.vm_state_size) == ("1", "one", size, 0)
        img.write(rnd.randbytes(300 * KiB), 512 * KiB)
        img.write_zeroes(0, 64 * KiB)
        img.create_snapshot("two")
        img.write(b"after two" * 1000, 100)
        current = img.read(0, size)
    assert_qemu_check_clean(path)
    _assert_fast_check_as_qemu(path)
    assert _listing(path) == [("1", "one", 0), ("2", "two", 0)]
    state_one = _snapshot_bytes(path, "one", tmp_path)
    state_two = _snapshot_bytes(path, "2", tmp_path)
    assert state_one[256 * KiB : 256 * KiB + MiB] == first
    assert qemu_raw_bytes(path, tmp_path) == current
    with fast.open_image(path, writable=True) as img:
        img.apply_snapshot("one")
        assert img.read(0, size) == state_one
        img.write(b"x" * 5000, MiB)  # the snapshot must not see this
    assert_qemu_check_clean(path)
    _assert_fast_check_as_qemu(path)
    assert _snapshot_bytes(path, "1", tmp_path) == state_one
    with fast.open_image(path, writable=True) as img:
        img.delete_snapshot("1")
        assert [s.id for s in img.snapshots()] == ["2"]
        assert img.create_snapshot("three").id == "3"
        img.delete_snapshot("two")
        img.delete_snapshot("three")
        assert img.snapshots() == ()
        want = bytearray(state_one)
        want[MiB : MiB + 5000] = b"x" * 5000
        assert img.read(0, size) == bytes(want)
    assert_qemu_check_clean(path)
    _assert_fast_check_as_qemu(path)
    assert _listing(path) == []
    assert path.read_bytes()[60:72] == bytes(12)  # nb_snapshots, snapshots_offset: 0
    with fast.open_image(path, writable=True) as img:
        img.create_snapshot("again")
        img.apply_snapshot("again")
    assert qemu_raw_bytes(path, tmp_path) == bytes(want)
    assert_qemu_check_clean(path)
    # state_two is still what QEMU read for it before it went.
    assert len(state_two) == size


@pytest.mark.qemu
@pytest.mark.clause("qcow2.snapshots.apply-revert", "qcow2.snapshots.delete-release",
                    "qcow2.snapshots.lookup-id-then-name", "interop.qemu-check")
def test_qemu_made_snapshots_apply_and_delete_as_with_qemu_img(tmp_path: Path) -> None:
    base = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", base, str(2 * MiB))
    io = ["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -c -P 5 1M 64k", str(base)]
    subprocess.run(io, check=True, capture_output=True, timeout=60)
    qemu_img("snapshot", "-c", "first", base)
    subprocess.run(["qemu-io", "-c", "write -P 2 512k 1M", str(base)], check=True,
                   capture_output=True, timeout=60)
    qemu_img("resize", base, str(3 * MiB))
    qemu_img("snapshot", "-c", "second", base)
    subprocess.run(["qemu-io", "-c", "write -P 3 0 64k", str(base)], check=True,
                   capture_output=True, timeout=60)
    for op in ("apply", "delete"):
        ours, theirs = tmp_path / f"ours-{op}.qcow2", tmp_path / f"theirs-{op}.qcow2"
        shutil.copy(base, ours)
        shutil.copy(base, theirs)
        with fast.open_image(ours, writable=True) as img:
            if op == "apply":
                img.apply_snapshot("first")
                assert img.size == 2 * MiB
            else:
                img.delete_snapshot("first")
        qemu_img("snapshot", "-a" if op == "apply" else "-d", "first", theirs)
        assert_qemu_check_clean(ours)
        _assert_fast_check_as_qemu(ours)
        assert qemu_raw_bytes(ours, tmp_path) == qemu_raw_bytes(theirs, tmp_path)
        assert _listing(ours) == _listing(theirs)
        for sid, _, _ in _listing(theirs):
            assert _snapshot_bytes(ours, sid, tmp_path) == _snapshot_bytes(theirs, sid, tmp_path)


@pytest.mark.qemu
@pytest.mark.clause("qcow2.snapshots.extra-data", "qcow2.snapshots.delete-release")
def test_other_snapshots_keep_their_entries_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", path, str(MiB))
    for name in ("a", "b", "c"):
        qemu_img("snapshot", "-c", name, path)
    with fast.open_image(path) as img:
        layer = img.driver
        table = layer.hdr.snapshots
        before = layer.storage.read(table.at, 4096)
    with fast.open_image(path, writable=True) as img:
        img.delete_snapshot("b")
        layer = img.driver
        after = layer.storage.read(layer.hdr.snapshots.at, 4096)
    entries = _split_entries(before)
    assert _split_entries(after) == [entries[0], entries[2]]
    assert_qemu_check_clean(path)


def _split_entries(table: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 40 <= len(table) and table[pos : pos + 8] != bytes(8):
        id_n, name_n = int.from_bytes(table[pos + 12 : pos + 14], "big"), int.from_bytes(
            table[pos + 14 : pos + 16], "big")
        extra = int.from_bytes(table[pos + 36 : pos + 40], "big")
        end = pos + 40 + extra + id_n + name_n
        out.append(table[pos:end])
        pos = end + (-end % 8)
    return out


@pytest.mark.clause("qcow2.snapshots.id-assignment", "qcow2.snapshots.lookup-id-then-name",
                    "qcow2.snapshots.create-refcounts", "access.write.read-only")
def test_bad_snapshot_requests_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "b.qcow2"
    fast.create_image(path, MiB)
    with fast.open_image(path, writable=True) as img:
        img.write(b"data", 0)
        img.create_snapshot("2")  # ID 1, named like the next one's ID
        img.create_snapshot("name")
        before = path.read_bytes()
        for bad in ("", None, 5):
            with pytest.raises(InvalidRequestError):
                img.create_snapshot(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="exists already"):
            img.create_snapshot("name")
        with pytest.raises(InvalidRequestError, match="no snapshot"):
            img.apply_snapshot("nope")
        with pytest.raises(InvalidRequestError, match="no snapshot"):
            img.delete_snapshot("3")
        assert path.read_bytes() == before
        # IDs first: "2" is the snapshot named "name", not the one named "2".
        img.delete_snapshot("2")
        assert [(s.id, s.name) for s in img.snapshots()] == [("1", "2")]
        assert img.create_snapshot("next").id == "2"
    with fast.open_image(path) as img:
        with pytest.raises(ReadOnlyError):
            img.create_snapshot("ro")
        with pytest.raises(ReadOnlyError):
            img.delete_snapshot("1")
    raw = tmp_path / "r.raw"
    fast.create_image(raw, MiB, format="raw")
    with fast.open_image(raw, writable=True) as img:
        for call in (img.snapshots, lambda: img.create_snapshot("x"),
                     lambda: img.apply_snapshot("x"), lambda: img.delete_snapshot("x")):
            with pytest.raises(UnsupportedError):
                call()
    one_bit = tmp_path / "one.qcow2"
    fast.create_image(one_bit, MiB, refcount_bits=1)
    with fast.open_image(one_bit, writable=True) as img:
        img.write(b"x", 0)
        img.flush()
        before = one_bit.read_bytes()
        with pytest.raises(UnsupportedError, match="refcount"):
            img.create_snapshot("s")
    assert one_bit.read_bytes() == before
    assert_qemu_check_clean(one_bit)


# -- power cuts ---------------------------------------------------------------------------

_HARMLESS = re.compile(
    r"ERROR OFLAG_COPIED (data cluster: l2_entry=([0-9a-f]+)|L2 cluster: l1_index=\d+ "
    r"l1_entry=([0-9a-f]+)) refcount=1$"
)


def _judge(state: bytes, tmp: Path, what: str) -> None:
    """crash.snapshot.copied-conservative: leaks, and COPIED missing where a refcount is 1,
    are all a cut may leave."""
    path = tmp / "cut.qcow2"
    path.write_bytes(state)
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    out = json.loads(proc.stdout)
    harmless = 0
    for line in proc.stderr.splitlines():
        m = _HARMLESS.match(line.strip())
        if m:
            entry = int(m.group(2) or m.group(3), 16)
            assert not entry >> 63, f"{what}: {line}"
            harmless += 1
    assert out["check-errors"] == 0, f"{what}: {proc.stderr}"
    assert out.get("corruptions", 0) == harmless, f"{what}: {proc.stderr}"


def _states(store: MemoryStorage) -> tuple[bytes, list[tuple[str, bytes]]]:
    with fast.open_image(MemoryStorage(bytes(store.read(0, store.size()))),
                         format="qcow2") as img:
        size = img.size
        active = img.read(0, size)
        snaps = []
        for s in img.snapshots():
            with fast.open_image(MemoryStorage(bytes(store.read(0, store.size()))),
                                 format="qcow2", snapshot=s.id) as snap:
                snaps.append((s.name, snap.read(0, snap.size)))
    return active, snaps


def _every_cut(rec: RecordingStorage, since: int, tmp: Path, old: object, new: object) -> int:
    """Judge every cut after mutation ``since``; with ``old``, the active disk and the
    snapshots must read as before or as after the operation."""
    for k in range(since, rec.mutations + 1):
        state = bytes(rec.state_after(k))
        what = f"cut after mutation {k}: {rec.describe_mutation(k) if k else 'base'}"
        _judge(state, tmp, what)
        if old is not None:
            got = _states(MemoryStorage(state))
            assert got in (old, new), what
    return rec.mutations - since


@pytest.mark.qemu
@pytest.mark.clause("crash.snapshot.copied-conservative", "crash.power-cut",
                    "qcow2.snapshots.create-refcounts", "qcow2.snapshots.apply-revert",
                    "qcow2.snapshots.delete-release")
@pytest.mark.parametrize("cs", [4096, 16384])
def test_a_cut_anywhere_in_a_snapshot_operation_is_harmless(tmp_path: Path, cs: int) -> None:
    store = MemoryStorage()
    # 16 KiB clusters: extended L2 entries (subclusters of 512 bytes).
    fast.create_image(store, 96 * KiB, cluster_size=cs, extended_l2=cs == 16384)
    rec = RecordingStorage(store)
    img = fast.open_image(rec, writable=True, format="qcow2")
    rnd = random.Random(8)
    img.write(rnd.randbytes(40 * KiB), 0)
    img.write_zeroes(16 * KiB - 512, 512)
    img.write_compressed(b"z" * cs, 80 * KiB)
    img.flush()
    cuts = 0
    steps = [
        lambda: img.create_snapshot("a"),
        lambda: img.write(rnd.randbytes(20 * KiB), 10 * KiB),
        lambda: img.create_snapshot("b"),
        lambda: img.resize(64 * KiB),
        lambda: img.create_snapshot("c"),
        lambda: img.apply_snapshot("a"),
        lambda: img.delete_snapshot("b"),
        lambda: img.apply_snapshot("c"),
        lambda: img.delete_snapshot("a"),
        lambda: img.delete_snapshot("c"),
    ]
    for n, step in enumerate(steps):
        img.flush()
        since = rec.mutations
        # Plain writes and resizes (steps 1 and 3) may leave a mix of old and new data.
        old = _states(store) if n not in (1, 3) else None
        step()
        img.flush()
        new = _states(store)
        cuts += _every_cut(rec, since, tmp_path, old, new)
    img.close()
    assert cuts >= 40


# -- random sequences against a flat model ------------------------------------------------


@pytest.mark.qemu
@pytest.mark.clause("qcow2.snapshots.create-refcounts", "qcow2.snapshots.apply-revert",
                    "qcow2.snapshots.delete-release", "qcow2.snapshots.preserved",
                    "qcow2.compressed.write-packing", "interop.qemu-check")
@pytest.mark.parametrize("seed", range(8))
def test_random_snapshot_sequences_match_a_flat_model(tmp_path: Path, seed: int) -> None:
    """Writes, compressed writes, zeroing, discards, resizes and snapshot operations in a
    random order: the disk and every snapshot read as a flat model says, and qemu-img
    finds nothing wrong after each snapshot operation."""
    rnd = random.Random(seed)
    cs = rnd.choice([512, 4096, 65536])
    size = cs * rnd.randrange(8, 40)
    path = tmp_path / "r.qcow2"
    ext = cs >= 16384 and rnd.random() < 0.5
    backing: dict[str, object] = {}
    disk = bytearray(size)
    if rnd.random() < 0.5:
        # A backing file shows through wherever the top has nothing.
        disk = bytearray(rnd.randbytes(size))
        (tmp_path / "base.raw").write_bytes(disk)
        backing = {"backing_file": "base.raw", "backing_fmt": "raw"}
    fast.create_image(path, size, cluster_size=cs, extended_l2=ext,
                      refcount_bits=rnd.choice([4, 16]), **backing)  # type: ignore[arg-type]
    snaps: dict[str, bytes] = {}
    img = fast.open_image(path, writable=True)
    try:
        for step in range(40):
            op = rnd.choice(["write", "write", "compressed", "zero", "discard", "resize",
                             "create", "create", "apply", "delete"])
            if op == "write":
                at = rnd.randrange(size)
                n = min(rnd.randrange(1, 3 * cs), size - at)
                chunk = rnd.randbytes(n) if rnd.random() < 0.5 else bytes([step]) * n
                img.write(chunk, at)
                disk[at : at + n] = chunk
            elif op == "compressed":
                c = rnd.randrange(-(-size // cs))
                n = min(cs, size - c * cs)
                chunk = (bytes([step + 1]) * (n // 2)).ljust(n, b"\0")
                try:
                    img.write_compressed(chunk, c * cs)
                except InvalidRequestError:
                    continue  # an allocated cluster (QEMU refuses it too)
                disk[c * cs : c * cs + n] = chunk
            elif op in ("zero", "discard"):
                at = rnd.randrange(size)
                n = min(rnd.randrange(1, 4 * cs), size - at)
                if op == "zero":
                    img.write_zeroes(at, n)
                else:
                    img.discard_to_zero(at, n)
                disk[at : at + n] = bytes(n)
            elif op == "resize":
                new = cs * rnd.randrange(4, 40) + rnd.choice([0, 512])
                # access.resize.grow-none: a plain grow may show stale bytes, as QEMU's
                img.resize(new, PreallocateMode.ZERO)
                disk = disk[:new].ljust(new, b"\0")
                size = new
            elif op == "create":
                name = f"s{step}"
                try:
                    img.create_snapshot(name)
                except UnsupportedError:
                    # Small refcounts overflow (qcow2.snapshots.create-refcounts): the
                    # image is as it was.
                    assert sorted(s.name for s in img.snapshots()) == sorted(snaps)
                else:
                    snaps[name] = bytes(disk)
            elif op == "apply" and snaps:
                name = rnd.choice(sorted(snaps))
                img.apply_snapshot(name)
                disk = bytearray(snaps[name])
                size = len(disk)
            elif op == "delete" and snaps:
                name = rnd.choice(sorted(snaps))
                img.delete_snapshot(name)
                del snaps[name]
            else:
                continue
            assert img.size == size, (step, op)
            assert img.read(0, size) == bytes(disk), (step, op)
            if op in ("create", "apply", "delete"):
                img.flush()
                _judge_clean(path)
        img.flush()
        assert sorted(s.name for s in img.snapshots()) == sorted(snaps)
    finally:
        img.close()
    assert_qemu_check_clean(path)
    assert qemu_raw_bytes(path, tmp_path) == bytes(disk)
    for name, want in snaps.items():
        # qemu-img convert -l reads a snapshot at the image's current disk size (past the
        # snapshot's own size: whatever its last cluster or the tables hold there).
        n = min(len(want), size)
        assert _snapshot_bytes(path, name, tmp_path)[:n] == want[:n], name
        with fast.open_image(path, snapshot=name) as snap:
            assert snap.read(0, n) == want[:n], name


def _judge_clean(path: Path) -> None:
    out = _check_json(path)
    assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0, out
    assert out["check-errors"] == 0, out


@pytest.mark.clause("qcow2.snapshots.list", "qcow2.snapshots.create-refcounts")
def test_snapshots_listed_right_after_the_table_grows_the_file() -> None:
    # Found by the random sequences: the table, placed past the file end the layer saw at
    # open, was re-read against that stale end.
    store = MemoryStorage()
    fast.create_image(store, 1 << 20, cluster_size=512)
    with fast.open_image(store, writable=True, format="qcow2") as img:
        for name in ("a", "b", "c"):
            img.create_snapshot(name)
            assert [s.name for s in img.snapshots()][-1] == name
        img.delete_snapshot("b")
        assert [s.name for s in img.snapshots()] == ["a", "c"]


@pytest.mark.qemu
@pytest.mark.clause("qcow2.snapshots.create-refcounts", "qcow2.extended-l2.bitmap")
def test_snapshots_leave_extended_l2_bitmaps_alone(tmp_path: Path) -> None:
    # Bit 63 of an extended L2 entry's bitmap word is subcluster 31's zero bit, not COPIED.
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xbb" * 4 * 65536)  # what a lost zero bit would show
    path = tmp_path / "x.qcow2"
    fast.create_image(path, 4 * 65536, extended_l2=True, backing_file="base.raw",
                      backing_fmt="raw")
    with fast.open_image(path, writable=True) as img:
        img.write(b"\xaa" * 65536, 0)
        img.write_zeroes(65536 - 2048, 2048)
        want = img.read(0, 4 * 65536)
        img.create_snapshot("s")
        assert img.read(0, 4 * 65536) == want
        # A write into the shared table copies it: the copy keeps the bitmaps too.
        img.write(b"\xcc" * 100, 2 * 65536)
        assert img.read(0, 2 * 65536) == want[: 2 * 65536]
        img.apply_snapshot("s")
        img.delete_snapshot("s")
        assert img.read(0, 4 * 65536) == want
    assert_qemu_check_clean(path)
    assert qemu_raw_bytes(path, tmp_path) == want


_PEER = Path(__import__("os").environ.get("PYIMAGO_PEER_IMAGES", "/work/shared/peer-images"))


@pytest.mark.qemu
@pytest.mark.clause("qcow2.snapshots.apply-revert", "qcow2.snapshots.delete-release",
                    "qcow2.snapshots.create-refcounts", "interop.qemu-check")
def test_a_peer_image_snapshots_as_with_qemu_img(tmp_path: Path) -> None:
    """A third-party image with two internal snapshots (dissect.hypervisor's fixture): its
    snapshots applied and deleted, and a new one taken, by us and by qemu-img give the same
    disks and lists."""
    import gzip

    src = _PEER / "dissect.hypervisor" / "snapshot.qcow2.gz"
    if not src.exists():
        pytest.skip(f"peer image {src} absent (PYIMAGO_PEER_IMAGES)")
    base = tmp_path / "peer.qcow2"
    base.write_bytes(gzip.decompress(src.read_bytes()))
    listed = _listing(base)
    assert len(listed) == 2
    for flag, key in (("-c", "ours"), ("-a", listed[0][0]), ("-d", listed[-1][1])):
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        shutil.copy(base, ours)
        shutil.copy(base, theirs)
        with fast.open_image(ours, writable=True) as img:
            {"-c": img.create_snapshot, "-a": img.apply_snapshot,
             "-d": img.delete_snapshot}[flag](key)
        qemu_img("snapshot", flag, key, theirs)
        assert_qemu_check_clean(ours)
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, theirs)
        assert [s[:2] for s in _listing(ours)] == [s[:2] for s in _listing(theirs)]
        for sid, _, _ in _listing(theirs):
            a, b = tmp_path / "a.raw", tmp_path / "b.raw"
            qemu_img("convert", "-l", sid, "-O", "raw", ours, a)
            qemu_img("convert", "-l", sid, "-O", "raw", theirs, b)
            qemu_img("compare", "-f", "raw", "-F", "raw", a, b)


# -- the reference tally of the snapshot operations --------------------------------------------


def _counted(layer: Any, l1: array[int], tables: dict[int, array[int]]) -> Counter[int]:
    """References per host cluster, counted one by one (what ``_references`` must tally)."""
    cb = layer._cbits
    step = 1 << layer._ext
    refs: Counter[int] = Counter()
    for e in l1:
        if e & HOST_MASK:
            refs[(e & HOST_MASK) >> cb] += 1
            tbl = tables[e & HOST_MASK]
            for j in range(0, len(tbl), step):
                if tbl[j] & COMPRESSED:
                    refs.update(layer._held(tbl[j]))
                elif tbl[j] & HOST_MASK:
                    refs[(tbl[j] & HOST_MASK) >> cb] += 1
    return refs


@pytest.mark.clause("qcow2.snapshots.create-refcounts")
def test_reference_tally_counts_what_a_counter_counts() -> None:
    """The compact tally of references (a byte per host cluster) holds what a Counter holds,
    past 254 references to one cluster and for clusters past the end of the file too, and
    gives them back in runs of ascending clusters."""
    storage = MemoryStorage()
    fast.create_image(storage, MiB, cluster_size=4096)
    with fast.open_image(storage, writable=True) as img:
        for off in range(0, 64 * 4096, 3 * 4096):
            img.write(b"\1" * 700, off)
        img.write_compressed(bytes(range(256)) * 16, 100 * 4096)
        img.flush()
        layer = img.driver
        cb = layer._cbits
        l1 = layer._l1
        tables = sw._tables(layer, l1)
        assert tables
        # A made-up second L2 table: 300 entries sharing one data cluster, one entry past
        # the end of the file, and the first table again.
        shared = next(x for x in next(iter(tables.values())) if x & HOST_MASK) & HOST_MASK
        past_end = (storage.size() >> cb) + 7
        fake = array("Q", [shared | COPIED] * 300 + [past_end << cb] + [0] * 211)
        fake_at = 1 << 40
        tables = {**tables, fake_at: fake}
        l1_more = array("Q", [*l1, fake_at, l1[0], fake_at])
        for table_l1 in (l1, l1_more):
            tally = sw._references(layer, table_l1, tables)
            runs = list(tally.runs())
            got = Counter({c: n for first, length, n in runs
                           for c in range(first, first + length)})
            assert got == _counted(layer, table_l1, tables)
            firsts = [first for first, _, _ in runs]
            assert firsts == sorted(firsts)
            assert all(length == 1 or n < 255 for _, length, n in runs)
        assert got[shared >> cb] == 602 and got[past_end] == 2  # 1 + 300 + 1 + 300
        # the tally costs a byte per cluster of the file, beside the few counted apart
        assert len(tally.counts) == (layer._file_size_now() >> cb) + 1
        assert set(tally.over) == {shared >> cb, past_end, fake_at >> cb}
