"""Power cuts in images with extended L2 entries and external data files (reference).

crash.power-cut: a cut after any single storage write leaves at most leaked clusters and
every sector reads its durable value or a value a later operation gave it.  Extended-L2 images
live in one storage (judged by ``qemu-img check``); an image with an external data file in two,
whose writes are numbered in one global order, and a cut after global write ``g`` leaves each
storage as its own writes up to ``g`` left it (judged by the reference's ``check``, which
agrees with qemu-img on such images: tests/interop/test_check_vs_qemu.py).
"""

from __future__ import annotations

import random
import shutil
from typing import Any

import pytest
from pyimago.oracle.crash import (
    CrashTimeline,
    RecordingStorage,
    TimelinePoint,
    check_cut,
    qemu_judge,
    reference_judge,
)
from pyimago.reference import (
    FormatAccess,
    MemoryStorage,
    PreallocateMode,
    Storage,
    create_image,
    open_image,
)

KiB = 1 << 10

SEQUENCES = 6
OPERATIONS = 14


class _Joint(RecordingStorage):
    """A recording storage that also numbers its mutations in an order shared with others."""

    def __init__(self, inner: Storage, order: list[str], tag: str) -> None:
        super().__init__(inner, name=tag)
        self._order, self._tag = order, tag

    def write(self, data: Any, offset: int) -> None:
        super().write(data, offset)
        self._order.append(self._tag)

    def write_zeroes(self, offset: int, length: int) -> None:
        super().write_zeroes(offset, length)
        self._order.append(self._tag)

    def discard(self, offset: int, length: int) -> None:
        super().discard(offset, length)
        self._order.append(self._tag)

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        super().resize(new_size, prealloc)
        self._order.append(self._tag)


def _op(rng: random.Random, img: FormatAccess, step: int, unit: int
        ) -> tuple[str, bool, tuple[tuple[int, int], ...]]:
    size = img.size
    at = min(size - 1, rng.randrange(0, size // unit) * unit + rng.choice([0, rng.randrange(unit)]))
    n = max(1, min(size - at, rng.choice([1, unit, 3 * unit, rng.randrange(1, 40 * unit)])))
    r = rng.random()
    if r < 0.4:
        img.write(bytes([step % 250 + 1]) * n, at)
        return f"write {at}+{n}", False, ()
    if r < 0.55:
        img.write_zeroes(at, n)
        return f"write_zeroes {at}+{n}", False, ()
    if r < 0.65:
        img.discard_to_zero(at, n)
        return f"discard_to_zero {at}+{n}", False, ()
    if r < 0.72:
        img.discard_to_any(at, n)
        return f"discard_to_any {at}+{n}", False, ((at, n),)
    if r < 0.78:
        grow = rng.choice([512, 32 * unit, 100 * unit])
        mode = rng.choice([PreallocateMode.NONE, PreallocateMode.ZERO,
                           PreallocateMode.FORMAT_ALLOCATE])
        img.resize(size + grow, mode)
        return f"grow +{grow} {mode.name}", False, ((size, grow),) if mode is \
            PreallocateMode.NONE else ()
    if r < 0.84 and size > 64 * unit:
        new_size = size - rng.choice([512, 32 * unit])
        img.resize(new_size)
        return f"shrink to {new_size}", False, ((new_size, size - new_size),)
    if r < 0.9:
        img.flush()
        return "flush", False, ()
    img.flush()
    img.sync()
    return "flush+sync", True, ()


@pytest.mark.qemu
@pytest.mark.clause("crash.power-cut", "qcow2.extended-l2.write")
@pytest.mark.parametrize("seed", range(SEQUENCES))
def test_extended_l2_power_cuts(seed: int) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img missing")
    rng = random.Random(seed)
    cs = rng.choice([16 * KiB, 64 * KiB])
    size = cs * rng.choice([5, 40]) + 512
    backing = None
    if rng.random() < 0.5:
        base = MemoryStorage(name="base")
        create_image(base, size)
        with open_image(base, writable=True, backing=None) as b:
            b.write(rng.randbytes(size), 0)
        backing = open_image(base, backing=None)
    top = MemoryStorage(name="top")
    create_image(top, size, cluster_size=cs, extended_l2=True)
    rec = RecordingStorage(top)
    img = open_image(rec, writable=True, backing=backing, l2_cache_tables=1)
    timeline = CrashTimeline(TimelinePoint(rec.mutations, img.read(0, img.size), True))
    log = []
    for step in range(1, OPERATIONS + 1):
        label, durable, loose = _op(rng, img, step, cs // 32)
        log.append(label)
        timeline.add(TimelinePoint(rec.mutations, img.read(0, img.size), durable, loose, label))
    img.close()
    timeline.add(TimelinePoint(rec.mutations, timeline.points[-1].content, False, (), "close"))
    judge = qemu_judge(qemu_img)
    failures = []
    for k, state in rec.cut_states(rec.sample_cuts(0, 80, rng)):
        verdict = check_cut(k, bytes(state), timeline,
                            lambda s: open_image(s, backing=backing), judge)
        if verdict.problems:
            failures.append("\n  ".join(verdict.problems))
            break
    assert not failures, f"seed {seed} ops: {'; '.join(log)}\n  {failures[0]}"


@pytest.mark.clause("crash.power-cut", "qcow2.data-file.write", "qcow2.data-file.raw")
@pytest.mark.parametrize("seed", range(SEQUENCES))
def test_data_file_power_cuts(seed: int) -> None:
    judge = reference_judge()
    assert judge is not None
    rng = random.Random(1000 + seed)
    cs = rng.choice([4 * KiB, 64 * KiB])
    extended = cs >= 16 * KiB and rng.random() < 0.5
    raw = rng.random() < 0.5
    size = cs * 7 + 512 if extended or cs > 4 * KiB else cs * (cs // 8) + 2 * cs
    top, data = MemoryStorage(name="top"), MemoryStorage(name="data")
    _create_with_data(top, data, size, cs, raw, extended)
    order: list[str] = []
    rec_top, rec_data = _Joint(top, order, "top"), _Joint(data, order, "data")
    img = open_image(rec_top, writable=True, backing=None, data_file=rec_data,
                     l2_cache_tables=1)
    timeline = CrashTimeline(TimelinePoint(0, img.read(0, img.size), True))
    log = []
    for step in range(1, OPERATIONS + 1):
        label, durable, loose = _op(rng, img, step, cs // 32 if extended else cs // 2)
        log.append(label)
        timeline.add(TimelinePoint(len(order), img.read(0, img.size), durable, loose, label))
    img.close()
    timeline.add(TimelinePoint(len(order), timeline.points[-1].content, False, (), "close"))
    cuts = sorted(set(rng.sample(range(len(order) + 1), min(80, len(order) + 1))))
    failures = []
    for g in cuts:
        top_state = rec_top.state_after(order[:g].count("top"))
        data_state = rec_data.state_after(order[:g].count("data"))
        verdict = check_cut(
            g, bytes(top_state), timeline,
            lambda s, d=bytes(data_state): open_image(s, backing=None,
                                                      data_file=MemoryStorage(d)),
            judge,
        )
        if verdict.problems:
            failures.append("\n  ".join(verdict.problems))
            break
    assert not failures, (f"seed {seed} cs={cs} raw={raw} extended={extended} ops: "
                          f"{'; '.join(log)}\n  {failures[0]}")


def _create_with_data(top: MemoryStorage, data: MemoryStorage, size: int, cs: int, raw: bool,
                      extended: bool) -> None:
    """create_image makes the data file as a file; in memory, the layout is made with a data
    file the test names, then attached by hand (as open_image(data_file=...) does)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.qcow2"
        create_image(path, size, cluster_size=cs, data_file="d.raw", data_file_raw=raw,
                     extended_l2=extended)
        top.write(path.read_bytes(), 0)
        data.write((Path(d) / "d.raw").read_bytes(), 0)
