"""Power cuts inside the tools' write paths (tools.power-cut, crash.power-cut).

Each test runs one tool (rebase in place, commit, snapshot -c/-a/-d, resize, convert,
create) with every writable file storage it opens recorded in one
:class:`~pyimago.oracle._journal.Journal` (the factories of both implementations and the
tools' own file storage are wrapped), then
rebuilds the files as a power cut after *every* storage mutation leaves them (a
deterministic sample where there are many), and holds each state to the promise:
``qemu-img check`` finds no corruption in any qcow2 file (leaks allowed), the images open
with both implementations, and the guest views are what the operation allows at a cut
(rebase: unchanged; commit: the top unchanged, the base old or new sector by sector;
snapshot: the old or the new state; resize: the old or the new size, the kept range
unchanged; convert -n: the target old or new sector by sector; a fresh convert or create:
not yet an image, or one whose sectors read as the new image did or the source's).  A tool
that returns has synced every file it wrote, and the last cut state is the files on disk (no
change went around the recorded storages).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pyimago import fast, reference
from pyimago.oracle._journal import Journal
from pyimago.oracle.crash import RecordingStorage, benign_copied
from pyimago.reference.qcow2 import check as reference_check
from pyimago.tools._cli import (
    check_main,
    commit_main,
    convert_main,
    create_main,
    rebase_main,
    resize_main,
    snapshot_main,
)

from .conftest import IMPLS, qemu_img

pytestmark = [pytest.mark.qemu, pytest.mark.clause("tools.power-cut", "crash.power-cut")]

KiB = 1024
SECTOR = 512
QCOW2_MAGIC = b"QFI\xfb"
#: Cut states rebuilt per operation at most (the first and last always among them).
MAX_CUTS = 28
#: Of them, the cuts right after this many of the last header writes (and one later).
HEADER_CUTS = 3

#: Where each implementation builds file storages: wrapped while a journal records.
_FACTORIES = [
    (fast._open, "FastFileStorage"),
    (fast._create, "FastFileStorage"),
    (fast._check, "FastFileStorage"),
    (reference._open, "FileStorage"),
    (reference_check, "FileStorage"),
]


@contextmanager
def recording(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> Iterator[Journal]:
    """A journal of every mutation the code in the block makes to the files ``paths``
    (through any writable file storage of fast, reference or the tools)."""
    import pyimago.tools._common as tools_common

    journal = Journal()
    watched = {os.path.realpath(p) for p in paths}
    for p in sorted(watched):
        journal.watch(p, Path(p).read_bytes() if os.path.exists(p) else b"")

    def wrapped(cls: Any) -> Callable[..., Any]:
        def make(path: Any, *args: Any, **kwargs: Any) -> Any:
            storage = cls(path, *args, **kwargs)
            key = os.path.realpath(storage.path)
            if storage.writable and key in watched:
                return journal.storage(key, storage)
            return storage

        return make

    with monkeypatch.context() as m:
        for module, name in _FACTORIES:
            m.setattr(module, name, wrapped(getattr(module, name)))
        m.setattr(tools_common, "FileStorage", wrapped(tools_common.FileStorage))
        yield journal


def cut_points(journal: Journal) -> list[int]:
    """Every cut (the base, after each mutation), or ``MAX_CUTS`` of them: both ends, the
    cuts right before, right after and one after each of the last header writes (a write
    to a file's first sector switches tables and sizes: an order that puts it too early or
    too late breaks only around it), and a deterministic sample of the rest."""
    points = list(range(journal.mutations + 1))
    if len(points) <= MAX_CUTS:
        return points
    header = [k for k, (_, m) in enumerate(journal.log, start=1)
              if m.kind != "resize" and m.offset < SECTOR][-HEADER_CUTS:]
    kept = {0, journal.mutations, *header, *(k - 1 for k in header),
            *(min(k + 1, journal.mutations) for k in header)}
    rest = [k for k in points if k not in kept]
    inner = random.Random(journal.mutations).sample(rest, max(0, MAX_CUTS - len(kept)))
    return sorted({*kept, *inner})


def check_no_corruption(path: Path, what: str) -> int:
    """qemu-img check of one qcow2 file (its backing not needed): no corruption, no check
    error (a COPIED flag missing on a refcount-1 cluster is no corruption: crash.power-cut);
    the number of leaked clusters.  An image left dirty (lazy refcounts) is judged by what
    ``check -r all`` leaves of a copy (crash.power-cut)."""
    dirty = path.read_bytes()[:80]
    repair = len(dirty) == 80 and dirty[4:8] >= b"\0\0\0\x03" and dirty[79] & 1
    target = path
    if repair:
        target = path.with_name(path.name + ".repaired")
        shutil.copyfile(path, target)
    spec = {"driver": "qcow2", "backing": None,
            "file": {"driver": "file", "filename": str(target)}}
    # In the image's folder: QEMU opens a relative data file name from the current one.
    proc = subprocess.run(["qemu-img", "check", *(["-r", "all"] if repair else []),
                           "--output=json", f"json:{json.dumps(spec)}"],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=path.parent)
    if repair:
        target.unlink()
    report = json.loads(proc.stdout) if proc.stdout.strip() else {"check-errors": 1}
    corrupt = report.get("corruptions", 0) - benign_copied(proc.stderr.splitlines())
    assert not corrupt and not report.get("check-errors"), (
        f"{what}: qemu-img check{' -r all' if repair else ''} of {path.name}: "
        f"{proc.stderr.strip()[:800]}")
    return int(report.get("leaks", 0))


def guest(path: Path, snapshot: str | None = None) -> bytes:
    """The guest bytes of ``path`` (its backing chain included), read by both
    implementations, which must agree."""
    views = []
    for module in (fast, reference):
        extra = {} if snapshot is None else {"snapshot": snapshot}
        with module.open_image(str(path), **extra) as img:
            views.append(bytes(img.read(0, img.size)))
    assert views[0] == views[1], f"{path.name}: fast and reference read it differently"
    return views[0]


def state_of(path: Path) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    """The active guest view and each internal snapshot's (name, guest view)."""
    with fast.open_image(str(path)) as img:
        snapshots = [(s.id, s.name) for s in img.snapshots()]
    return guest(path), tuple((name, guest(path, sid)) for sid, name in snapshots)


def old_or_new(got: bytes, old: bytes, new: bytes, what: str) -> None:
    """Every 512-byte sector of ``got`` reads as in ``old`` or as in ``new`` (each padded
    with zeroes to ``got``'s size), and the size is one of theirs."""
    assert len(got) in (len(old), len(new)), (
        f"{what}: size {len(got)} is neither {len(old)} nor {len(new)}")
    n = len(got)
    o, w = old[:n].ljust(n, b"\0"), new[:n].ljust(n, b"\0")
    step = 64 * KiB
    for at in range(0, n, step):
        piece = got[at : at + step]
        if piece in (o[at : at + step], w[at : at + step]):
            continue
        for s in range(at, min(at + step, n), SECTOR):
            sector = got[s : s + SECTOR]
            assert sector in (o[s : s + SECTOR], w[s : s + SECTOR]), (
                f"{what}: the sector at 0x{s:x} reads {sector[:8].hex()}.., neither the old "
                f"({o[s : s + 8].hex()}..) nor the new ({w[s : s + 8].hex()}..)")


class Cuts:
    """The states a recorded run can leave, materialised in a folder of their own (a copy
    of the work folder with the recorded files replaced)."""

    def __init__(self, journal: Journal, work: Path, into: Path,
                 images: list[tuple[Path, ...]] | None = None) -> None:
        self.journal = journal
        # The files that lag together (an image and its data file): each file alone unless
        # given.
        self.images = None if images is None else [
            tuple(os.path.realpath(p) for p in group) for group in images]
        shutil.copytree(work, into)
        self.folder = into
        self.judged = 0
        self.lagging = 0
        self.leaks = 0

    def path(self, name: str) -> Path:
        return self.folder / name

    def each(self) -> Iterator[tuple[int, str]]:
        """Lay out each cut state in turn; yields ``(k, description)`` after checking every
        qcow2 file of it with qemu-img.  With several files, also the states where one file
        lost what it wrote since its last sync while another kept later writes (only a sync
        orders writes across files)."""
        journal = self.journal
        assert journal.mutations, "the tool wrote nothing"
        assert not journal.unsynced(), (
            f"the tool returned with unsynced writes: {journal.unsynced()}")
        cuts = cut_points(journal)
        states: Iterator[tuple[int, str, dict[str, bytearray]]] = (
            (k, "", files) for k, files in journal.cut_states(cuts))
        for k, lagging, files in itertools.chain(states, journal.lagging_states(cuts, self.images)):
            what = f"cut after mutation {k} of {journal.mutations} ({journal.describe(k)})"
            if k == journal.mutations and not lagging:
                # The recording saw every change: a write around the storages (an
                # os.truncate of the file) would be missing from every cut state.
                for name, data in files.items():
                    real = Path(name).read_bytes() if os.path.exists(name) else b""
                    assert data == real, (
                        f"{Path(name).name}: the file changed around the recorded storages "
                        f"({len(real)} bytes on disk, {len(data)} recorded)")
            if lagging:
                names = "+".join(Path(n).name for n in lagging.split("+"))
                what += f", {names} without its writes since its last sync"
                self.lagging += 1
            for name, data in files.items():
                (self.folder / Path(name).name).write_bytes(data)
            for name, data in files.items():
                if data[:4] == QCOW2_MAGIC:
                    self.leaks += check_no_corruption(self.folder / Path(name).name, what)
            self.judged += 1
            yield k, what
        print(f"{self.judged} cut states judged ({self.lagging} with a file lagging) of "
              f"{journal.mutations} mutations, {self.leaks} leaked clusters")


def _io(path: Path, *cmds: str) -> None:
    """qemu-io commands on ``path``, run in its folder (QEMU opens a relative data file
    name from the current folder; pyimago from the image's)."""
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    proc = subprocess.run([*args, path.name], capture_output=True, text=True, timeout=120,
                          check=False, cwd=path.parent)
    assert proc.returncode == 0 and "fail" not in proc.stdout.lower(), (
        f"qemu-io {cmds} on {path}: {proc.stdout}{proc.stderr}")


def _create(path: Path, size: str, *options: str, backing: str | None = None,
            backing_fmt: str = "qcow2") -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join(options)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    qemu_img(*args, path.name, size, cwd=path.parent)
    return path


#: qcow2 layouts the write paths run over: small clusters (many L2 tables and refcount
#: blocks, so metadata is written in the middle of an operation), extended L2 entries, a
#: sub-byte refcount width.
LAYOUTS = ["cluster_size=4k", "cluster_size=512", "cluster_size=16k,extended_l2=on",
           "cluster_size=1k,refcount_bits=2", "cluster_size=2k,compat=0.10",
           "cluster_size=4k,lazy_refcounts=on"]


def chain(work: Path, layout: str = LAYOUTS[0]) -> tuple[Path, Path, Path]:
    """old.qcow2 <- top.qcow2 (its own data, zero ranges, compressed clusters, an internal
    snapshot taken before the active layer moved on) and new.qcow2, which reads differently
    from old; old has compressed clusters and an internal snapshot too (a commit into it
    copies on write)."""
    work.mkdir(exist_ok=True)
    cs = _cluster_size(layout)
    old = _create(work / "old.qcow2", "512k", layout)
    _io(old, "write -P 0x11 0 128k", "write -P 0x22 192k 64k", "write -P 0x33 400k 4k",
        f"write -c -P 0x34 256k {cs}")
    qemu_img("snapshot", "-c", "base", old)
    _io(old, "write -P 0x35 8k 4k")
    new = _create(work / "new.qcow2", "384k", layout)
    _io(new, "write -P 0x11 0 64k", "write -P 0x77 96k 128k")
    top = _create(work / "top.qcow2", "512k", layout, backing="old.qcow2")
    # (Two compressed clusters share a host cluster: with 2-bit refcounts the snapshot
    # below would need a refcount of 4.)
    narrow = "refcount_bits=2" in layout
    _io(top, "write -P 0x44 4k 8k", "write -z 160k 16k", "write -P 0x45 330k 50k",
        f"write -c -P 0x46 64k {cs}", *([] if narrow else [f"write -c -P 0x47 256k {cs}"]))
    qemu_img("snapshot", "-c", "first", top)
    _io(top, "write -P 0x55 200k 3000", "write -P 0x66 300k 4k", "discard 0 4k",
        "write -P 0x67 440k 1536", "write -P 0x68 65k 512")
    return old, new, top


def _cluster_size(layout: str) -> int:
    for item in layout.split(","):
        name, _, value = item.partition("=")
        if name == "cluster_size":
            return int(value[:-1]) * KiB if value.endswith("k") else int(value)
    return 64 * KiB


# -- rebase ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["safe", "standalone", "unsafe"])
def test_a_cut_anywhere_in_rebase_keeps_the_guest_view(
        impl: str, layout: str, mode: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Safe rebase copies the differing ranges first (synced), then switches the header in
    one write: the active guest view is the same at every cut; the snapshot (what it does
    not hold reads from the backing file) reads as before or as after."""
    work = tmp_path / "work"
    _, _, top = chain(work, layout)
    before, snaps_before = state_of(top)
    args = {"safe": ["-b", "new.qcow2", "-F", "qcow2"], "standalone": ["-b", ""],
            "unsafe": ["-u", "-b", "new.qcow2", "-F", "qcow2"]}[mode]
    with recording(monkeypatch, top) as journal:
        assert rebase_main(["--impl", impl, *args, str(top)]) == 0
    after, snaps_after = state_of(top)
    if mode != "unsafe":
        assert after == before
    cuts = Cuts(journal, work, tmp_path / "cut")
    for _, what in cuts.each():
        active, snaps = state_of(cuts.path("top.qcow2"))
        if mode == "unsafe":
            assert active in (before, after), what
        else:
            assert active == before, what
        assert snaps in (snaps_before, snaps_after), what
    assert cuts.judged >= (2 if mode == "unsafe" else 4)


# -- commit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("keep", [False, True])
def test_a_cut_anywhere_in_commit_keeps_the_top_and_leaves_the_base_old_or_new(
        impl: str, layout: str, keep: bool, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    old, _, top = chain(work, layout)
    qemu_img("snapshot", "-d", "first", top)
    top_before, base_before = guest(top), guest(old)
    with recording(monkeypatch, top, old) as journal:
        assert commit_main(["--impl", impl, *(["-d"] if keep else []), "-q", str(top)]) == 0
    base_after = guest(old)
    assert guest(top) == top_before == base_after
    cuts = Cuts(journal, work, tmp_path / "cut")
    for _, what in cuts.each():
        assert guest(cuts.path("top.qcow2")) == top_before, what
        old_or_new(guest(cuts.path("old.qcow2")), base_before, base_after, what)
    assert cuts.judged >= 4


@pytest.mark.parametrize("impl", IMPLS)
def test_a_cut_anywhere_in_commit_into_a_smaller_base_with_b(
        impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """commit -b into the bottom of a three-layer chain whose base is shorter than the top
    (it grows first): the top and the middle layer never change, the base reads old or new."""
    work = tmp_path / "work"
    work.mkdir()
    base = _create(work / "base.qcow2", "256k", "cluster_size=4k")
    _io(base, "write -P 0x21 0 256k")
    mid = _create(work / "mid.qcow2", "384k", "cluster_size=4k", backing="base.qcow2")
    _io(mid, "write -P 0x31 8k 20k", "write -z 64k 8k", "write -P 0x32 300k 8k")
    top = _create(work / "top.qcow2", "512k", "cluster_size=4k", backing="mid.qcow2")
    _io(top, "write -P 0x41 12k 4k", "write -P 0x42 400k 40k")
    top_before, mid_raw, base_before = guest(top), mid.read_bytes(), guest(base)
    with recording(monkeypatch, top, mid, base) as journal:
        assert commit_main(["--impl", impl, "-q", "-b", "base.qcow2", str(top)]) == 0
    base_after = guest(base)
    assert base_after == top_before and guest(top) == top_before
    assert mid.read_bytes() == mid_raw
    cuts = Cuts(journal, work, tmp_path / "cut")
    for _, what in cuts.each():
        assert guest(cuts.path("top.qcow2")) == top_before, what
        old_or_new(guest(cuts.path("base.qcow2")), base_before, base_after, what)
    assert cuts.judged >= 4


# -- snapshot -------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("action", ["create", "apply", "delete", "apply-larger",
                                    "apply-smaller"])
def test_a_cut_anywhere_in_snapshot_leaves_the_old_or_the_new_state(
        impl: str, layout: str, action: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """(apply-larger: the disk shrank after the snapshot was taken; applying it grows the
    disk back with the L1 switch.  apply-smaller: the disk grew and was written past the
    snapshot's end; applying it shrinks the disk with the switch.)"""
    if action.startswith("apply-") and "compat=0.10" in layout:
        pytest.skip("QEMU resizes no v2 image with snapshots")
    work = tmp_path / "work"
    work.mkdir()
    image = _create(work / "snap.qcow2", "256k", layout)
    _io(image, "write -P 0x61 0 64k", "write -P 0x62 100k 8k")
    qemu_img("snapshot", "-c", "one", image)
    _io(image, "write -P 0x63 4k 12k", "write -z 100k 4k", "write -P 0x64 200k 8k")
    qemu_img("snapshot", "-c", "two", image)
    _io(image, "write -P 0x65 32k 4k", "discard 200k 4k")
    if action == "apply-larger":
        qemu_img("resize", "-q", "--shrink", image, "96k")
    elif action == "apply-smaller":
        qemu_img("resize", "-q", image, "384k")
        _io(image, "write -P 0x66 300k 8k")
    before = state_of(image)
    args = {"create": ["-c", "three"], "apply": ["-a", "one"], "delete": ["-d", "one"],
            "apply-larger": ["-a", "two"], "apply-smaller": ["-a", "two"]}[action]
    with recording(monkeypatch, image) as journal:
        status = snapshot_main(["--impl", impl, *args, str(image)])
    after = state_of(image)
    if "refcount_bits=2" in layout and action != "delete":
        # A third reference to a cluster overflows 2-bit refcounts: refused, and nothing of
        # the image is lost at any cut of what was written before the refusal.
        assert status == 2 and after == before
        assert check_no_corruption(image, "after the refusal") >= 0
        if not journal.mutations:
            return
    else:
        assert status == 0 and after != before
    cuts = Cuts(journal, work, tmp_path / "cut")
    for _, what in cuts.each():
        active, snapshots = state_of(cuts.path("snap.qcow2"))
        assert snapshots in (before[1], after[1]), what
        # crash.snapshot.copied-conservative: old or new as a whole, size included (the
        # reference wrote the grown size after overwriting the active L1 table in place).
        assert active in (before[0], after[0]), what
    assert cuts.judged >= (1 if status else 3)


# -- resize ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["cluster_size=4k", "cluster_size=512"])
@pytest.mark.parametrize("change", ["+300k", "+3M", "+300k:metadata", "+3M:falloc",
                                    "+300k:full", "-100k", "-250k"])
def test_a_cut_anywhere_in_resize_leaves_the_old_or_the_new_disk(
        impl: str, layout: str, change: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """(512-byte clusters: a grow past 2 MiB moves the L1 table.)"""
    work = tmp_path / "work"
    work.mkdir()
    image = _create(work / "disk.qcow2", "256k", layout)
    _io(image, "write -P 0x71 0 64k", "write -P 0x72 150k 100k")
    before = guest(image)
    size, _, prealloc = change.partition(":")
    args = [*(["--preallocation", prealloc] if prealloc else []),
            *(["--shrink"] if size.startswith("-") else [])]
    with recording(monkeypatch, image) as journal:
        assert resize_main(["--impl", impl, "-q", *args, "--", str(image), size]) == 0
    after = guest(image)
    cuts = Cuts(journal, work, tmp_path / "cut")
    for _, what in cuts.each():
        got = guest(cuts.path("disk.qcow2"))
        # A shrink in progress leaves the part it cuts off unspecified (crash.power-cut).
        keep = min(len(before), len(after))
        assert len(got) in (len(before), len(after)), what
        assert got[:keep] == before[:keep], what
        assert got[keep:] == after[keep:] if len(got) == len(after) else True, what
    assert cuts.judged >= 2


# -- convert --------------------------------------------------------------------------------------


def _convert_source(work: Path) -> Path:
    work.mkdir()
    src = _create(work / "src.qcow2", "384k", "cluster_size=64k")
    _io(src, "write -P 0x81 0 100k", "write -z 128k 64k", "write -P 0x82 256k 64k")
    return src


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_cut_anywhere_in_convert_n_leaves_the_target_old_or_new(
        impl: str, layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert -n writes into an existing image: it is an image at every cut, each sector
    reading its old or its new contents."""
    work = tmp_path / "work"
    src = _convert_source(work)
    dst = _create(work / "dst.qcow2", "384k", layout)
    _io(dst, "write -P 0x91 0 384k")
    qemu_img("snapshot", "-c", "kept", dst)
    _io(dst, "write -P 0x92 64k 64k")
    before = guest(dst)
    with recording(monkeypatch, dst) as journal:
        assert convert_main(["--impl", impl, "-n", "-O", "qcow2", str(src), str(dst)]) == 0
    after = guest(dst)
    assert after == guest(src)
    cuts = Cuts(journal, work, tmp_path / "cut")
    for _, what in cuts.each():
        old_or_new(guest(cuts.path("dst.qcow2")), before, after, what)
    assert cuts.judged >= 4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_cut_anywhere_in_convert_over_an_existing_file(
        impl: str, layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh convert replaces the file it is given, as qemu-img does (its create
    truncates the file before writing the new image): a cut leaves an incomplete output --
    not yet a qcow2 image, an image of size 0 (created, not grown yet: QEMU's
    qcow2_co_create does the same), or one with no corruption whose sectors read zero or
    the source's -- and never a mix of the old image's metadata with the new one's."""
    work = tmp_path / "work"
    src = _convert_source(work)
    dst = _create(work / "dst.qcow2", "1M", "cluster_size=4k")
    _io(dst, "write -P 0xa1 0 1M")
    source, replaced = guest(src), guest(dst)
    with recording(monkeypatch, dst) as journal:
        assert convert_main(["--impl", impl, "-O", "qcow2", "-o", layout, str(src),
                             str(dst)]) == 0
    assert guest(dst) == source
    assert fresh_output_cuts(Cuts(journal, work, tmp_path / "cut"), source, replaced) >= 5


def fresh_output_cuts(cuts: Cuts, source: bytes, replaced: bytes | None = None,
                      fresh: bytes | None = None) -> int:
    """Judge the cut states of a fresh convert into dst.qcow2: not yet a qcow2 image, the
    ``replaced`` image (before the truncation), a new one of size 0 (created, not grown
    yet: QEMU's qcow2_co_create does the same), or one whose sectors read as the new image
    did (``fresh``; default zeroes) or the source's.  The number of cut states that were
    images."""
    images = 0
    for _, what in cuts.each():
        data = cuts.path("dst.qcow2").read_bytes()
        if data[:4] != QCOW2_MAGIC:
            continue  # not an image yet: the old one is gone, the new one not written
        images += 1
        got = guest(cuts.path("dst.qcow2"))
        if got == replaced or not got:
            continue
        old_or_new(got, bytes(len(source)) if fresh is None else fresh, source, what)
    return images


@pytest.mark.parametrize("impl", IMPLS)
def test_a_cut_anywhere_in_a_convert_onto_a_backing_file(
        impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert -B: the fresh output gets a backing file and only what the source's top
    layer holds; a cut leaves sectors reading the backing file's or the source's."""
    work = tmp_path / "work"
    base = _convert_source(work)
    src = _create(work / "top.qcow2", "384k", "cluster_size=4k", backing=base.name)
    _io(src, "write -P 0x83 8k 20k", "write -z 64k 8k", "write -P 0x84 300k 40k")
    dst = work / "dst.qcow2"
    with recording(monkeypatch, dst) as journal:
        assert convert_main(["--impl", impl, "-O", "qcow2", "-o", "cluster_size=4k",
                             "-B", base.name, "-F", "qcow2", str(src), str(dst)]) == 0
    source = guest(src)
    assert guest(dst) == source
    assert fresh_output_cuts(Cuts(journal, work, tmp_path / "cut"), source,
                             fresh=guest(base)) >= 5


@pytest.mark.parametrize("impl", IMPLS)
def test_a_cut_anywhere_in_a_compressed_convert(
        impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert -c ends by growing the file to a whole sector, as qemu-img does ("align end
    of file to a sector boundary"): that growth is a recorded storage mutation (it was an
    os.truncate around the storages), synced before the tool returns."""
    work = tmp_path / "work"
    src = _convert_source(work)
    dst = work / "dst.qcow2"
    with recording(monkeypatch, dst) as journal:
        assert convert_main(["--impl", impl, "-c", "-O", "qcow2", "-o", "cluster_size=4k",
                             str(src), str(dst)]) == 0
    source = guest(src)
    assert guest(dst) == source and dst.stat().st_size % SECTOR == 0
    last = journal.log[-1][1]
    assert last.kind == "resize" and last.offset == dst.stat().st_size, journal.describe(
        journal.mutations)
    assert fresh_output_cuts(Cuts(journal, work, tmp_path / "cut"), source) >= 5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("raw", [False, True])
def test_a_cut_anywhere_in_a_fresh_convert_to_a_data_file_image(
        impl: str, raw: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh convert -o data_file=...: the qcow2 file and its data file are both written
    from nothing, recorded and cut in one order; each cut state is judged as a fresh
    convert's, the data file read as the tables say."""
    work = tmp_path / "work"
    src = _convert_source(work)
    dst, data = work / "dst.qcow2", work / "dst.data"
    options = f"cluster_size=4k,data_file=dst.data,data_file_raw={'on' if raw else 'off'}"
    with recording(monkeypatch, dst, data) as journal:
        assert convert_main(["--impl", impl, "-O", "qcow2", "-o", options, str(src),
                             str(dst)]) == 0
    source = guest(src)
    assert guest(dst) == source
    assert any(os.path.realpath(data) == name for name, _ in journal.log)
    cuts = Cuts(journal, work, tmp_path / "cut", [(dst, data)])
    assert fresh_output_cuts(cuts, source) >= 5


def test_the_cut_folder_helpers_reject_a_mixed_sector() -> None:
    """old_or_new is not vacuous: a sector from neither side fails."""
    old, new = bytes(2048), b"\x01" * 2048
    old_or_new(old[:1024] + new[1024:], old, new, "ok")
    with pytest.raises(AssertionError, match="0x200"):
        old_or_new(old[:512] + b"\x02" * 512 + old[1024:], old, new, "mixed")


# -- images with an external data file ----------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tool", ["commit", "rebase", "resize", "resize-grow", "convert-n"])
@pytest.mark.parametrize("raw", [False, True])
def test_a_cut_anywhere_in_a_data_file_image(
        impl: str, tool: str, raw: bool, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same promises where the image written keeps its data in an external data file:
    both files are recorded, and cut, in one order (crash.power-cut holds across them)."""
    if raw and tool == "rebase":
        pytest.skip("data_file_raw=on images take no backing file (qemu-img refuses one)")
    work = tmp_path / "work"
    work.mkdir()
    layout = ["cluster_size=4k", "data_file=img.data",
              f"data_file_raw={'on' if raw else 'off'}"]
    if tool == "commit":
        img = _create(work / "img.qcow2", "256k", *layout)
        _io(img, "write -P 0x11 0 64k", "write -P 0x12 128k 64k")
        top = _create(work / "top.qcow2", "256k", "cluster_size=4k", backing="img.qcow2")
        _io(top, "write -P 0x21 8k 20k", "write -z 128k 8k", "write -P 0x22 200k 40k")
        view, base_before = guest(top), guest(img)
        with recording(monkeypatch, top, img, work / "img.data") as journal:
            assert commit_main(["--impl", impl, "-q", str(top)]) == 0
        images = [(top,), (img, work / "img.data")]
        base_after = guest(img)
        assert base_after == view == guest(top)
    elif tool == "rebase":
        old = _create(work / "old.qcow2", "256k", "cluster_size=4k")
        _io(old, "write -P 0x31 0 128k")
        new = _create(work / "new.qcow2", "256k", "cluster_size=4k")
        _io(new, "write -P 0x32 64k 128k")
        img = _create(work / "img.qcow2", "256k", *layout, backing=old.name)
        _io(img, "write -P 0x33 4k 8k", "write -z 100k 4k")
        view = guest(img)
        with recording(monkeypatch, img, work / "img.data") as journal:
            assert rebase_main(["--impl", impl, "-b", new.name, "-F", "qcow2", str(img)]) == 0
        assert guest(img) == view
    elif tool.startswith("resize"):
        img = _create(work / "img.qcow2", "256k", *layout)
        _io(img, "write -P 0x41 0 256k")
        view = guest(img)
        change = ["--shrink", "--", str(img), "-96k"] if tool == "resize" else [
            "--preallocation=full", str(img), "+160k"]
        with recording(monkeypatch, img, work / "img.data") as journal:
            assert resize_main(["--impl", impl, "-q", *change]) == 0
        after = guest(img)
    else:
        src = _convert_source(work / "src")
        img = _create(work / "img.qcow2", "384k", *layout)
        _io(img, "write -P 0x51 0 384k")
        view = guest(img)
        with recording(monkeypatch, img, work / "img.data") as journal:
            assert convert_main(["--impl", impl, "-n", "-O", "qcow2", str(src), str(img)]) == 0
        after = guest(img)
        assert after == guest(src)
    cuts = Cuts(journal, work, tmp_path / "cut",
                images if tool == "commit" else [(img, work / "img.data")])
    for _, what in cuts.each():
        got = guest(cuts.path("img.qcow2"))
        if tool == "commit":
            assert guest(cuts.path("top.qcow2")) == view, what
            old_or_new(got, base_before, base_after, what)
        elif tool == "rebase":
            assert got == view, what
        elif tool == "resize":
            assert len(got) in (len(view), len(after)) and got[: len(after)] == after, what
        elif tool == "resize-grow":
            assert got in (view, after), what
        else:
            old_or_new(got, view, after, what)
    assert cuts.judged >= 2


# -- create ---------------------------------------------------------------------------------------


@pytest.mark.clause("create.durable", "create.preallocation")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", ["preallocation=metadata", "preallocation=falloc",
                                     "preallocation=full",
                                     "preallocation=full,data_file=dst.data"])
def test_a_cut_anywhere_in_create_with_preallocation(
        impl: str, options: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """create -o preallocation maps every cluster before it returns: at every cut the file
    is not yet an image, or an image with no corruption (its data file with it) reading
    zeroes at its size, 0 or the size asked for; and it returns synced (both
    implementations' create_image only flushed)."""
    work = tmp_path / "work"
    work.mkdir()
    dst, data = work / "dst.qcow2", work / "dst.data"
    with recording(monkeypatch, dst, data) as journal:
        assert create_main(["--impl", impl, "-q", "-f", "qcow2", "-o",
                            f"cluster_size=4k,{options}", str(dst), "300k"]) == 0
    assert guest(dst) == bytes(300 * KiB)
    cuts = Cuts(journal, work, tmp_path / "cut", [(dst, data)])
    images = 0
    for _, what in cuts.each():
        if cuts.path("dst.qcow2").read_bytes()[:4] != QCOW2_MAGIC:
            continue
        images += 1
        got = guest(cuts.path("dst.qcow2"))
        assert got in (b"", bytes(300 * KiB)), what
    assert images >= 3


# -- check -r -------------------------------------------------------------------------------------


def _leaky(path: Path) -> None:
    """An image with leaked clusters and nothing else wrong: a power cut inside a discard,
    after the L2 entries were cleared and before the refcounts dropped."""
    _create(path, "256k", "cluster_size=4k")
    _io(path, "write -P 0x5 0 128k")
    store = fast.MemoryStorage(path.read_bytes())
    rec = RecordingStorage(store)
    with fast.open_image(rec, writable=True, format="qcow2") as img:
        img.discard_to_backing(0, 96 * KiB)
    for _, state in rec.cut_states():
        path.write_bytes(state)
        if check_no_corruption(path, "a cut inside the discard") > 2:
            return
    raise AssertionError("no cut inside the discard leaks clusters")


def _dirty(path: Path) -> None:
    """A lazy-refcount image left dirty by a crash (qemu-io abort, as iotest 039): its
    refcounts miss the clusters the last writes allocated."""
    _create(path, "256k", "cluster_size=4k", "lazy_refcounts=on")
    proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x6 0 100k", "-c", "abort",
                           path.name], capture_output=True, timeout=60, cwd=path.parent,
                          check=False)
    assert proc.returncode != 0 and path.read_bytes()[79] & 1, "qemu-io left no dirty image"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["leaks", "all"])
def test_a_cut_anywhere_in_check_repair_leaves_no_corruption(
        impl: str, case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check -r writes refcounts (and -r all rebuilds them): a cut in the middle leaves an
    image no worse than before -- leaks at most, -r all's dirty image still repairable --
    whose guest view never changes."""
    work = tmp_path / "work"
    work.mkdir()
    image = work / "fix.qcow2"
    (_leaky if case == "leaks" else _dirty)(image)
    view = guest(image)
    with recording(monkeypatch, image) as journal:
        status = check_main(["--impl", impl, "-q", "-r", case, str(image)])
    assert status == 0, f"check -r {case} left the image unrepaired (exit {status})"
    assert check_no_corruption(image, "after the repair") == 0 and guest(image) == view
    cuts = Cuts(journal, work, tmp_path / "cut")
    for _, what in cuts.each():
        assert guest(cuts.path("fix.qcow2")) == view, what
    assert cuts.judged >= 2
