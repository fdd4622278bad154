"""Images pyimago creates and changes are images QEMU accepts, and QEMU sees what we wrote.

Each test creates an image with ``create_image`` (qcow2 v2 / v3, every cluster size, refcount
widths 1 to 64 bits, each preallocation mode, qcow2 and raw backing files named relatively),
changes it through ``FormatAccess`` while keeping a ``bytearray`` model of what the guest
must see, and closes it.  Then ``qemu-img check`` must report no errors and no leaks, and
``qemu-img compare`` against the model (written out as a raw file) must say identical.

The other way round: QEMU writes into an image we created, we read back what it wrote, we
write on top of that, and QEMU checks and compares again.
"""

from __future__ import annotations

import importlib
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pyimago.reference import (
    FormatAccess,
    PreallocateMode,
    SpecialMapping,
    create_image,
    open_image,
)
from pyimago_tests_qemu import assert_qemu_reads

if TYPE_CHECKING:
    from .conftest import QemuTools

pytestmark = [pytest.mark.qemu]

KiB = 1 << 10
MiB = 1 << 20

CLUSTER_SIZES = (512, 4 * KiB, 64 * KiB, 2 * MiB)
#: A size per cluster size that spans several clusters and, where cheap, several L2 tables.
SIZE_FOR = {512: MiB, 4 * KiB: 4 * MiB, 64 * KiB: 2 * MiB, 2 * MiB: 16 * MiB}
COMPATS = ("0.10", "1.1")


def _tag(n: int) -> str:
    if n % MiB == 0:
        return f"{n // MiB}m"
    if n % KiB == 0:
        return f"{n // KiB}k"
    return str(n)


def noise(n: int, seed: int) -> bytes:
    """Data unlike its neighbours, so that a misplaced byte cannot go unnoticed."""
    return random.Random(seed).randbytes(n)


@dataclass
class Guest:
    """An image open through our API, and a model of what its guest must read.

    Every change goes to both.  Where the semantics leave the result open (discard_to_any,
    a grow with PreallocateMode.NONE), the model takes what we read back: QEMU must then see
    the same.
    """

    img: FormatAccess
    cluster_size: int
    backing: bytes = b""
    #: What the guest reads now; by default, a fresh image shows its backing (or zeroes).
    start: bytes | None = None
    model: bytearray = field(init=False)

    def __post_init__(self) -> None:
        if self.start is None:
            self.start = self._backing_view(0, self.img.size)
        self.model = bytearray(self.start)
        # check we agree with the model before changing anything
        self.verify_open()

    def _backing_view(self, start: int, end: int) -> bytes:
        chunk = self.backing[start:end]
        return chunk + bytes(end - start - len(chunk))

    @property
    def size(self) -> int:
        return len(self.model)

    def write(self, offset: int, length: int, seed: int) -> None:
        data = noise(length, seed)
        self.img.write(data, offset)
        self.model[offset : offset + length] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        self.img.write_zeroes(offset, length)
        self.model[offset : offset + length] = bytes(length)

    def discard_to_zero(self, offset: int, length: int) -> None:
        self.img.discard_to_zero(offset, length)
        self.model[offset : offset + length] = bytes(length)

    def discard_to_any(self, offset: int, length: int) -> None:
        self.img.discard_to_any(offset, length)
        self.model[offset : offset + length] = self.img.read(offset, length)

    def discard_to_backing(self, offset: int, length: int) -> None:
        """Whole clusters in the range show the backing; partial head/tail clusters stay."""
        self.img.discard_to_backing(offset, length)
        cs = self.cluster_size
        first = -(-offset // cs) * cs
        last = (offset + length) // cs * cs
        if last > first:
            self.model[first:last] = self._backing_view(first, last)

    def resize(self, new_size: int, mode: PreallocateMode = PreallocateMode.NONE) -> None:
        old = self.size
        self.img.resize(new_size, mode)
        if new_size <= old:
            del self.model[new_size:]
        elif mode is PreallocateMode.NONE:
            self.model += self.img.read(old, new_size - old)
        else:
            self.model += bytes(new_size - old)

    def verify_open(self) -> None:
        assert self.img.size == self.size
        ours = self.img.read(0, self.size)
        if ours != self.model:
            first = next(i for i in range(self.size) if ours[i] != self.model[i])
            pytest.fail(f"we read back something else than we wrote, first at 0x{first:x}")


def exercise(g: Guest, grow: PreallocateMode, seed: int = 0) -> None:
    """Writes, zeroes, discards and resizes across cluster and L2-table boundaries."""
    cs = g.cluster_size
    size = g.size
    l2_span = cs * (cs // 8)
    head = min(1000, cs // 2)
    g.write(cs - head, 3 * head, seed + 1)  # across the first cluster boundary
    g.write(3 * cs + 123, 2 * cs + 7, seed + 2)  # several clusters, unaligned both ends
    if l2_span + cs + 777 < size:
        g.write(l2_span - 777, cs + 1554, seed + 3)  # across an L2-table boundary
    g.write(size - 4097, 4097, seed + 4)  # up to the last byte
    g.write_zeroes(cs // 2, cs)  # unaligned: partial clusters at both ends
    g.write_zeroes(3 * cs, cs)  # a whole allocated cluster
    g.discard_to_zero(4 * cs + 100, cs)
    g.discard_to_any(5 * cs, cs)
    g.discard_to_backing(2 * cs - 10, 2 * cs + 20)
    g.write(2 * cs + 50, 100, seed + 5)  # COW from the backing (or from zero) after discard
    g.verify_open()
    g.resize(size + 3 * cs + 512, grow)
    g.write(size - 100, 300, seed + 6)  # across the old end
    g.resize(size - cs - 512)
    g.write(g.size - 10, 10, seed + 7)
    g.verify_open()


def verify_with_qemu(qemu: QemuTools, path: Path, model: bytes | bytearray, tmp: Path) -> None:
    """qemu-img check is clean, the virtual size is right and qemu-img compare is identical."""
    qemu.check(path)
    size = qemu.info(path)[0]["virtual-size"]
    assert size == len(model), f"qemu sees {size} bytes, the model has {len(model)}"
    assert_qemu_reads(path, bytes(model), tmp)
    # and our own reopen reads the same
    with open_image(path) as img:
        assert img.size == len(model)
        assert img.read(0, len(model)) == model, f"{path}: reopened image reads differently"


def make_backing(kind: str, folder: Path, size: int, qemu: QemuTools) -> tuple[str | None, bytes]:
    """A backing file next to the overlay: ``(relative name, guest content)``."""
    if kind == "none":
        return None, b""
    if kind == "raw":
        content = noise(size, 99)
        (folder / "base.raw").write_bytes(content)
        return "base.raw", content
    # qcow2, made by QEMU: our overlay then reads a QEMU-written backing
    path = folder / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, str(size))
    qemu.io(path, [f"write -P 0x5c 0 {size // 2}", f"write -P 0x6d {size // 2 + 512} {size // 4}"])
    return "base.qcow2", qemu.convert_raw(path)


def _backing_fmt(name: str | None) -> str | None:
    return None if name is None else name.rsplit(".", 1)[1]


# -- creation alone -------------------------------------------------------------------------------


def _create_matrix() -> list[Any]:
    params: list[Any] = []
    for compat in COMPATS:
        widths = (1, 2, 4, 8, 16, 32, 64) if compat == "1.1" else (16,)
        for cs in CLUSTER_SIZES:
            # 2 MiB clusters: a 1-bit refcount block has 16 M entries, slow to build in pure
            # Python (seconds), and adds nothing the smaller clusters do not cover
            for rb in widths if cs != 2 * MiB else [w for w in widths if w >= 16]:
                modes = ["off"]
                if rb == 16:
                    modes += ["metadata", "falloc", "full"]
                elif cs in (512, 64 * KiB):
                    modes.append("metadata")
                for mode in modes:
                    tag = "v3" if compat == "1.1" else "v2"
                    params.append(
                        pytest.param(compat, cs, rb, mode, id=f"{tag}-c{_tag(cs)}-rc{rb}-{mode}")
                    )
    return params


@pytest.mark.clause(
    "interop.qemu-check", "create.options", "create.layout", "create.preallocation",
    "qcow2.refcount.no-leaks", "qcow2.refcount.entry-width", "qcow2.header.refcount-order",
    "qcow2.header.cluster-bits", "qcow2.header.version",
)
@pytest.mark.parametrize(("compat", "cluster_size", "refcount_bits", "prealloc"), _create_matrix())
def test_created_image_passes_qemu_check(
    qemu: QemuTools, tmp_path: Path, compat: str, cluster_size: int, refcount_bits: int,
    prealloc: str,
) -> None:
    path = tmp_path / "new.qcow2"
    size = 2 * MiB if cluster_size == 2 * MiB else MiB
    create_image(
        path, size, compat=compat, cluster_size=cluster_size, refcount_bits=refcount_bits,
        preallocation=prealloc,
    )
    report = qemu.check(path)
    info = qemu.info(path)[0]
    assert info["virtual-size"] == size
    assert info["cluster-size"] == cluster_size
    data = info["format-specific"]["data"]
    assert data["compat"] == compat
    assert data["refcount-bits"] == refcount_bits
    qmap = qemu.map(path)
    if prealloc == "off":
        assert not any(e["data"] for e in qmap), qmap
        assert report.get("allocated-clusters", 0) == 0, report
    else:
        # Every guest cluster has a host cluster (QEMU gives its offset).  Whether it is a
        # data cluster over zeroes or a v3 zero cluster keeping its host cluster is the
        # implementation's choice (QEMU itself makes data clusters; both read zero).
        assert all(e["present"] and "offset" in e for e in qmap), qmap
        assert report.get("allocated-clusters") == size // cluster_size, report
    empty = tmp_path / "zeroes.raw"
    with empty.open("wb") as f:
        f.truncate(size)
    qemu.compare(path, empty)


# -- writes, zeroes, discards and resizes ---------------------------------------------------------

_GROW_MODES = list(PreallocateMode)


def _ops_matrix() -> list[Any]:
    params: list[Any] = []
    i = 0
    for compat in COMPATS:
        for cs in CLUSTER_SIZES:
            for backing in ("none", "qcow2", "raw"):
                grow = _GROW_MODES[i % len(_GROW_MODES)]
                i += 1
                tag = "v3" if compat == "1.1" else "v2"
                params.append(
                    pytest.param(
                        compat, cs, backing, grow,
                        id=f"{tag}-c{_tag(cs)}-backing-{backing}-grow-{grow.value}",
                    )
                )
    return params


@pytest.mark.clause(
    "interop.qemu-check", "qcow2.refcount.no-leaks", "qcow2.l2.copied-flag",
    "access.cow.partial-cluster", "access.write-zeroes.no-free",
    "access.discard-to-zero.reads-zero", "access.discard-to-any.unspecified",
    "access.discard-to-backing.visible", "access.discard-to-backing.partial-kept",
    "access.resize.shrink-discards", "qcow2.zero.flag", "qcow2.zero.v2-none",
    "backing.resolve-relative", "backing.longer", "backing.shorter",
)
@pytest.mark.parametrize(("compat", "cluster_size", "backing", "grow"), _ops_matrix())
def test_changed_image_passes_qemu_check_and_compare(
    qemu: QemuTools, tmp_path: Path, compat: str, cluster_size: int, backing: str,
    grow: PreallocateMode,
) -> None:
    size = SIZE_FOR[cluster_size]
    # qcow2 backing longer than the overlay (a grow may show it), raw backing shorter
    backing_size = size + 2 * cluster_size if backing == "qcow2" else size // 2 + 777
    name, content = make_backing(backing, tmp_path, backing_size, qemu)
    path = tmp_path / "overlay.qcow2"
    create_image(
        path, size, compat=compat, cluster_size=cluster_size,
        backing_file=name, backing_fmt=_backing_fmt(name),
    )
    with open_image(path, writable=True) as img:
        g = Guest(img, cluster_size, content)
        exercise(g, grow, seed=cluster_size)
        model = bytes(g.model)
    verify_with_qemu(qemu, path, model, tmp_path)


@pytest.mark.clause("interop.qemu-check", "qcow2.refcount.entry-width", "qcow2.refcount.no-leaks")
@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("cluster_size", [512, 64 * KiB], ids=["c512", "c64k"])
def test_refcount_widths_survive_changes(
    qemu: QemuTools, tmp_path: Path, refcount_bits: int, cluster_size: int
) -> None:
    path = tmp_path / "rc.qcow2"
    size = SIZE_FOR[cluster_size]
    create_image(path, size, cluster_size=cluster_size, refcount_bits=refcount_bits)
    with open_image(path, writable=True) as img:
        g = Guest(img, cluster_size)
        exercise(g, PreallocateMode.FULL_ALLOCATE, seed=refcount_bits)
        model = bytes(g.model)
    verify_with_qemu(qemu, path, model, tmp_path)


@pytest.mark.clause(
    "interop.qemu-check", "create.preallocation", "qcow2.zero.preallocated",
    "access.write-zeroes.no-free",
)
@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("compat", COMPATS, ids=["v2", "v3"])
def test_preallocated_image_survives_changes(
    qemu: QemuTools, tmp_path: Path, compat: str, prealloc: str
) -> None:
    cs = 64 * KiB
    path = tmp_path / "pre.qcow2"
    create_image(path, 2 * MiB, compat=compat, cluster_size=cs, preallocation=prealloc)
    with open_image(path, writable=True) as img:
        g = Guest(img, cs)
        exercise(g, PreallocateMode.ZERO, seed=7)
        model = bytes(g.model)
    verify_with_qemu(qemu, path, model, tmp_path)


@pytest.mark.clause(
    "interop.qemu-check", "access.resize.grow-none", "access.resize.grow-zero",
    "access.resize.grow-format-allocate", "access.resize.grow-full-allocate",
    "access.resize.grow-write-data", "access.resize.shrink-discards", "backing.longer",
)
@pytest.mark.parametrize("mode", list(PreallocateMode), ids=[m.value for m in PreallocateMode])
@pytest.mark.parametrize("compat", COMPATS, ids=["v2", "v3"])
def test_resize_over_longer_backing(
    qemu: QemuTools, tmp_path: Path, compat: str, mode: PreallocateMode
) -> None:
    """Shrink then grow an overlay whose backing goes on: only NONE may show the backing."""
    cs = 64 * KiB
    name, content = make_backing("qcow2", tmp_path, 4 * MiB, qemu)
    path = tmp_path / "overlay.qcow2"
    create_image(path, 2 * MiB, compat=compat, cluster_size=cs, backing_file=name,
                 backing_fmt="qcow2")
    with open_image(path, writable=True) as img:
        g = Guest(img, cs, content)
        g.write(MiB - 1000, 2000, 1)
        img.resize_shrink(MiB - 512)
        del g.model[MiB - 512 :]
        g.verify_open()
        img.resize_grow(3 * MiB, mode)
        if mode is PreallocateMode.NONE:
            g.model += img.read(MiB - 512, 2 * MiB + 512)
        else:
            g.model += bytes(2 * MiB + 512)
        g.verify_open()
        g.write(2 * MiB - 7, 14, 2)
        model = bytes(g.model)
    verify_with_qemu(qemu, path, model, tmp_path)


_QEMU_PREALLOCATION = {
    PreallocateMode.FORMAT_ALLOCATE: "metadata",
    PreallocateMode.FULL_ALLOCATE: "falloc",
    PreallocateMode.WRITE_DATA: "full",
}


@pytest.mark.clause(
    "interop.qemu-check", "access.resize.grow-format-allocate",
    "access.resize.grow-full-allocate", "access.resize.grow-write-data", "backing.longer",
    "qcow2.extended-l2.bitmap",
)
@pytest.mark.parametrize("mode", list(_QEMU_PREALLOCATION), ids=lambda m: m.value)
@pytest.mark.parametrize("impl", ["pyimago.reference", "pyimago.fast"])
def test_preallocating_grow_of_extended_l2_overlay_hides_longer_backing(
    qemu: QemuTools, tmp_path: Path, impl: str, mode: PreallocateMode
) -> None:
    """A preallocated extended L2 entry leaves its subclusters unallocated (QEMU's
    preallocate_co): over a longer backing the grown range must still read zero, and the new
    clusters come out as QEMU's own resize leaves them (zero or data subclusters)."""
    lib = importlib.import_module(impl)
    name, content = make_backing("qcow2", tmp_path, 4 * MiB, qemu)
    old, new = 32 * KiB, MiB + 32 * KiB
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    lib.create_image(ours, old, cluster_size=16 * KiB, extended_l2=True, backing_file=name,
                     backing_fmt="qcow2")
    with lib.open_image(ours, writable=True) as img:
        img.resize_grow(new, mode)
    verify_with_qemu(qemu, ours, content[:old] + bytes(new - old), tmp_path)
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16384,extended_l2=on",
             "-b", name, "-F", "qcow2", theirs, str(old))
    qemu.img("resize", "-q", f"--preallocation={_QEMU_PREALLOCATION[mode]}", theirs, str(new))

    def flags(path: Path) -> list[tuple[int, int, int, bool, bool]]:
        return [(e["start"], e["length"], e["depth"], e["zero"], e["data"])
                for e in qemu.map(path)]

    assert flags(ours) == flags(theirs)


def _map_flags(qemu: QemuTools, path: Path) -> list[tuple[int, int, int, bool, bool]]:
    """qemu-img map as runs of ``(start, length, depth, zero, data)``: neighbouring runs with
    the same flags are joined, so that only the flags count, not where the host clusters lie."""
    runs: list[tuple[int, int, int, bool, bool]] = []
    for e in qemu.map(path):
        run = (e["start"], e["length"], e["depth"], e["zero"], e["data"])
        if runs and runs[-1][2:] == run[2:]:
            runs[-1] = (runs[-1][0], runs[-1][1] + run[1], *run[2:])
        else:
            runs.append(run)
    return runs


@pytest.mark.clause(
    "interop.qemu-check", "access.resize.grow-format-allocate",
    "access.resize.grow-full-allocate", "access.resize.grow-write-data",
    "access.resize.shrink-discards", "qcow2.extended-l2.bitmap",
)
@pytest.mark.parametrize("cut_state", ["unallocated", "zero"])
@pytest.mark.parametrize("mode", list(_QEMU_PREALLOCATION), ids=lambda m: m.value)
@pytest.mark.parametrize("impl", ["pyimago.reference", "pyimago.fast"])
def test_grow_leaves_a_cut_subcluster_that_reads_zero_as_qemu_does(
    qemu: QemuTools, tmp_path: Path, impl: str, mode: PreallocateMode, cut_state: str
) -> None:
    """A shrink cuts a subcluster that is unallocated (no backing) or zero; a preallocating
    grow then has no stale bytes to hide there.  QEMU's truncate leaves that subcluster as it
    is; pyimago wrote zeroes into it, which mapped it as data (a map difference only)."""
    lib = importlib.import_module(impl)
    cs, sub = 64 * KiB, 2 * KiB
    cut, new = 3 * cs + 5 * sub + 512, MiB  # the old end cuts subcluster 5 of cluster 3
    setup = [f"write -P 0x11 0 {3 * cs + 4 * sub}"]
    if cut_state == "zero":
        setup.append(f"write -z {3 * cs + 5 * sub} {sub}")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for path in (ours, theirs):
        qemu.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},extended_l2=on",
                 path, str(MiB))
        qemu.io(path, setup)
    with lib.open_image(ours, writable=True) as img:
        img.resize(cut)
        img.resize(new, mode)
    qemu.img("resize", "-q", "--shrink", theirs, str(cut))
    qemu.img("resize", "-q", f"--preallocation={_QEMU_PREALLOCATION[mode]}", theirs, str(new))
    want = bytearray(new)
    want[: 3 * cs + 4 * sub] = b"\x11" * (3 * cs + 4 * sub)
    verify_with_qemu(qemu, ours, bytes(want), tmp_path)
    assert _map_flags(qemu, ours) == _map_flags(qemu, theirs)


def _header_fields(path: Path) -> tuple[int, int]:
    """``(l1_size, refcount_table_clusters)`` from a qcow2 header."""
    with path.open("rb") as f:
        head = f.read(64)
    return struct.unpack_from(">I", head, 36)[0], struct.unpack_from(">I", head, 56)[0]


@pytest.mark.clause(
    "interop.qemu-check", "qcow2.l1.growth", "qcow2.refcount.growth", "qcow2.header.l1-size",
    "qcow2.refcount.no-leaks", "qcow2.refcount.order-of-updates",
)
def test_l1_and_refcount_table_growth(qemu: QemuTools, tmp_path: Path) -> None:
    """512-byte clusters and 64-bit refcounts: a refcount block covers only 32 KiB of file,
    so a few MiB of data outgrow a one-cluster refcount table; a grow to 16 MiB needs an L1
    table eight clusters long."""
    cs = 512
    path = tmp_path / "grow.qcow2"
    create_image(path, MiB, cluster_size=cs, refcount_bits=64)
    l1_before, rt_before = _header_fields(path)
    with open_image(path, writable=True) as img:
        g = Guest(img, cs)
        g.write(1000, 3000, 1)
        g.resize(16 * MiB)
        for i, off in enumerate((7 * 1024 + 3, 5 * MiB + 11, 15 * MiB - 333)):
            g.write(off, MiB + 99, 10 + i)
        g.write_zeroes(5 * MiB + 4096, 8192)
        g.discard_to_zero(6 * MiB - 511, 1500)
        g.verify_open()
        model = bytes(g.model)
    l1_after, rt_after = _header_fields(path)
    assert l1_after > l1_before, f"L1 table did not grow: {l1_before} -> {l1_after}"
    assert rt_after > rt_before, f"refcount table did not grow: {rt_before} -> {rt_after}"
    verify_with_qemu(qemu, path, model, tmp_path)


# -- backing chains we make ----------------------------------------------------------------------


@pytest.mark.clause(
    "interop.qemu-check", "backing.resolve-relative", "backing.format-extension",
    "backing.probe", "qcow2.header.backing-name", "qcow2.extensions.backing-format",
    "access.discard-to-backing.visible", "raw.passthrough",
)
@pytest.mark.parametrize("with_format", [True, False], ids=["backing-fmt", "probed"])
def test_chain_of_three_we_made(qemu: QemuTools, tmp_path: Path, with_format: bool) -> None:
    """qcow2 (top/) over qcow2 (mid/) over raw (base/), named ../mid/mid.qcow2 and so on."""
    for d in ("base", "mid", "top"):
        (tmp_path / d).mkdir()
    base = tmp_path / "base" / "base.raw"
    base_content = noise(3 * MiB, 5)
    base.write_bytes(base_content)
    mid = tmp_path / "mid" / "mid.qcow2"
    create_image(mid, 3 * MiB, cluster_size=4096, backing_file="../base/base.raw",
                 backing_fmt="raw")
    with open_image(mid, writable=True) as img:
        g = Guest(img, 4096, base_content)
        g.write(MiB - 3, 70000, 6)
        g.discard_to_zero(2 * MiB, 8192)
        mid_content = bytes(g.model)
    top = tmp_path / "top" / "top.qcow2"
    create_image(top, 4 * MiB, cluster_size=64 * KiB, compat="0.10",
                 backing_file="../mid/mid.qcow2", backing_fmt="qcow2" if with_format else None)
    info = qemu.info(top)
    assert [layer["format"] for layer in info] == ["qcow2", "qcow2", "raw"]
    assert ("backing-filename-format" in info[0]) == with_format
    with open_image(top, writable=True) as img:
        g = Guest(img, 64 * KiB, mid_content)
        exercise(g, PreallocateMode.ZERO, seed=3)
        model = bytes(g.model)
    qemu.check(mid)
    verify_with_qemu(qemu, top, model, tmp_path)


# -- QEMU writes into our images ------------------------------------------------------------------


_QEMU_WRITES_CASES = [
    pytest.param("0.10", 64 * KiB, 16, False, id="v2-c64k"),
    pytest.param("1.1", 512, 16, False, id="v3-c512"),
    pytest.param("1.1", 4 * KiB, 1, False, id="v3-c4k-rc1"),
    pytest.param("1.1", 64 * KiB, 64, True, id="v3-c64k-rc64-backing"),
    pytest.param("1.1", 2 * MiB, 8, False, id="v3-c2m-rc8"),
]


@pytest.mark.clause(
    "interop.qemu-read", "interop.qemu-check", "qcow2.compressed.cow-overwrite",
    "qcow2.compressed.zlib", "qcow2.zero.flag", "qcow2.l2.copied-flag",
    "access.mapping.special-compressed",
)
@pytest.mark.parametrize(("compat", "cluster_size", "refcount_bits", "backed"), _QEMU_WRITES_CASES)
def test_qemu_writes_into_our_image(
    qemu: QemuTools, tmp_path: Path, compat: str, cluster_size: int, refcount_bits: int,
    backed: bool,
) -> None:
    cs = cluster_size
    size = 8 * cs if cs == 2 * MiB else 2 * MiB
    name, content = make_backing("qcow2" if backed else "none", tmp_path, size, qemu)
    path = tmp_path / "ours.qcow2"
    create_image(path, size, compat=compat, cluster_size=cs, refcount_bits=refcount_bits,
                 backing_file=name, backing_fmt=_backing_fmt(name))
    with open_image(path, writable=True) as img:
        g = Guest(img, cs, content)
        g.write(cs - 5, 10, 1)
        g.write(3 * cs, cs, 2)
    qemu.check(path)
    compressed = 5 * cs  # an untouched cluster: QEMU only compresses into unallocated ones
    qemu.io(path, [
        f"write -P 0x21 {cs - cs // 4} {cs // 2}",  # across our cluster 0/1 boundary
        f"write -P 0x22 {3 * cs + 17} 33",  # into a cluster we allocated
        f"write -z {3 * cs} {cs}" if compat == "1.1" else f"write -P 0x23 {2 * cs} 512",
        f"discard {cs} {cs}",
        f"write -c -P 0x24 {compressed} {cs}",
        f"write -P 0x25 {size - 1000} 1000",
    ])
    qemu.check(path)
    qemu_view = qemu.convert_raw(path)
    with open_image(path, writable=True) as img:
        assert img.read(0, size) == qemu_view, "we read something else than QEMU wrote"
        m, _ = img.get_mapping(compressed, cs)
        assert isinstance(m, SpecialMapping), f"QEMU's compressed cluster maps to {m}"
        g = Guest(img, cs, content, start=qemu_view)
        # partial overwrite of QEMU's compressed cluster: the rest is copied from it
        g.write(compressed + 100, 200, 3)
        g.write_zeroes(compressed + cs // 2, cs // 4)
        g.write(size - 1500, 700, 4)
        g.discard_to_zero(2 * cs, cs)
        g.verify_open()
        model = bytes(g.model)
    verify_with_qemu(qemu, path, model, tmp_path)
