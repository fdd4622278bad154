"""A power-cut campaign: random operation sequences, a cut after every storage mutation.

Each sequence builds a small chain in memory (an optional raw or qcow2 backing, a qcow2 top
of random version, cluster size and refcount width, sometimes made by ``qemu-img`` with
compressed clusters or an internal snapshot), records the top's storage, applies random
operations (writes, zeroing, the three discards, grows and shrinks, flushes, syncs), and then
judges the image after a cut at every mutation (or a sample) by the ``crash.power-cut`` rule:

* ``qemu-img check`` finds no corruption (leaks are allowed and counted); without qemu-img,
  ``pyimago.reference.check`` is the judge;
* the image opens read-only with no error that is not a pyimago error, and the open changes
  no byte;
* every sector reads its durable value or one a later operation gave it
  (:meth:`~pyimago.oracle.crash.CrashTimeline.violations`).

``python -m pyimago.oracle.crash_campaign --impl pyimago.fast --sequences 100`` runs it and
prints a summary; tests run a few sequences.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyimago.reference import MemoryStorage, PreallocateMode, UnsupportedError
from pyimago.reference import create_image as ref_create
from pyimago.reference import open_image as ref_open

from .crash import (
    CrashTimeline,
    CutJudge,
    RecordingStorage,
    TimelinePoint,
    check_cut,
    qemu_judge,
    reference_judge,
)
from .targets import ImplementationTarget, resolve_target

__all__ = ["CampaignStats", "CutJudge", "qemu_judge", "run_campaign", "run_sequence"]

_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None


@dataclass(slots=True)
class CampaignStats:
    """What a campaign did and found."""

    sequences: int = 0
    operations: int = 0
    mutations: int = 0
    cuts: int = 0
    leaked_clusters: int = 0
    cuts_with_leaks: int = 0
    corruptions: int = 0
    lost_or_wrong: int = 0
    open_errors: int = 0
    readonly_writes: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.lost_or_wrong or self.open_errors
                    or self.readonly_writes)

    def summary(self) -> str:
        return (
            f"{self.sequences} sequences, {self.operations} operations, {self.mutations} "
            f"storage mutations, {self.cuts} cut states checked: {self.corruptions} corrupt, "
            f"{self.lost_or_wrong} with lost or wrong data, {self.open_errors} that would not "
            f"open, {self.readonly_writes} changed by a read-only open; {self.cuts_with_leaks} "
            f"with leaks ({self.leaked_clusters} leaked clusters in all)"
        )


# -- building a chain ----------------------------------------------------------------------------

@dataclass(slots=True)
class _Chain:
    backing: Any
    backing_storage: MemoryStorage | None
    top: MemoryStorage
    cluster_size: int
    description: str


def _qemu_made_top(rng: random.Random, qemu_img: str, size: int, cs: int, compat: str,
                   refcount_bits: int) -> bytes:
    """A top layer qemu-img made: compressed clusters (convert -c) or an internal snapshot
    taken over data (so later writes meet refcount-2 clusters)."""
    with tempfile.TemporaryDirectory(dir=_TMP) as d:
        base = os.path.join(d, "b.raw")
        out = os.path.join(d, "t.qcow2")
        data = bytearray(size)
        for _ in range(rng.randint(2, 6)):
            at = rng.randrange(0, size // cs) * cs
            n = min(size - at, cs * rng.randint(1, 4))
            data[at : at + n] = rng.randbytes(n // 2) * 2
        with open(base, "wb") as f:
            f.write(data)
        opts = f"cluster_size={cs},compat={compat},refcount_bits={refcount_bits}"
        # A snapshot needs refcounts of 2: not with refcount_bits=1.
        if refcount_bits == 1 or rng.random() < 0.5:
            cmd = [qemu_img, "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts,
                   base, out]
            subprocess.run(cmd, check=True, capture_output=True)
        else:
            subprocess.run([qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", opts,
                            base, out], check=True, capture_output=True)
            subprocess.run([qemu_img, "snapshot", "-q", "-c", "s1", out], check=True,
                           capture_output=True)
        with open(out, "rb") as f:
            return f.read()


def _build_chain(rng: random.Random, target: ImplementationTarget,
                 qemu_img: str | None) -> _Chain:
    cs = rng.choice([512, 512, 1024, 4096, 4096, 65536])
    compat = rng.choice(["1.1", "1.1", "0.10"])
    refcount_bits = rng.choice([16, 16, 1, 2, 4, 8, 32, 64]) if compat == "1.1" else 16
    # Small clusters over a disk big enough for a second L2 table (and, with narrow
    # refcounts, a second refcount block) when writes land far apart.
    per_l2 = cs * cs // 8
    size = rng.choice([cs * rng.randint(3, 40), min(per_l2 * 2 + cs * 3, 8 << 20)])
    size = max(512, size - size % 512)
    kind = rng.choice(["none", "none", "raw", "qcow2"])
    backing: Any = None
    bstore: MemoryStorage | None = None
    if kind != "none":
        bstore = MemoryStorage(name="base")
        bsize = max(512, size + rng.choice([-cs, 0, cs]) * rng.randint(0, 3))
        bsize -= bsize % 512
        if kind == "raw":
            ref_create(bstore, bsize, format="raw")
        else:
            ref_create(bstore, bsize, cluster_size=rng.choice([512, 4096, 65536]))
        with ref_open(bstore, writable=True, backing=None) as b:
            for _ in range(rng.randint(1, 5)):
                at = rng.randrange(0, bsize)
                n = min(bsize - at, rng.randint(1, 3 * cs))
                b.write(rng.randbytes(n), at)
        backing = target.open(bstore, writable=False, format=kind, explicit_backing=True,
                              backing=None)
    top = MemoryStorage(name="top")
    if qemu_img and kind == "none" and rng.random() < 0.25:
        # Standalone only: qemu-img would need the backing as a file.
        top = MemoryStorage(_qemu_made_top(rng, qemu_img, size, cs, compat, refcount_bits),
                            name="top")
        how = "qemu-made"
    else:
        opts: dict[str, Any] = {"format": "qcow2", "cluster_size": cs, "compat": compat}
        if compat == "1.1":
            opts["refcount_bits"] = refcount_bits
        if kind != "none":
            opts["backing_file"] = "base"
            opts["backing_fmt"] = kind
        target.create_image(top, size, **opts)
        how = "created"
    desc = (f"qcow2 v{'3' if compat == '1.1' else '2'} cs={cs} refcount_bits={refcount_bits} "
            f"size={size} backing={kind} ({how})")
    return _Chain(backing, bstore, top, cs, desc)


# -- operations --------------------------------------------------------------------------------

def _range(rng: random.Random, size: int, cs: int) -> tuple[int, int]:
    """A guest range, often aimed at cluster and L2-table boundaries and the disk end."""
    per_l2 = cs * cs // 8
    aim = rng.random()
    if aim < 0.25 and size > per_l2:
        at = max(0, (rng.randrange(1, size // per_l2 + 1) * per_l2) - rng.randint(1, 2 * cs))
    elif aim < 0.4:
        at = max(0, size - rng.randint(1, 3 * cs))
    elif aim < 0.7:
        at = rng.randrange(0, max(1, size // cs)) * cs
    else:
        at = rng.randrange(0, size)
    at = min(at, size - 1)
    n = min(size - at, rng.choice([rng.randint(1, 2 * cs), cs, rng.randint(1, 6 * cs)]))
    return at, max(1, n)


def _apply(rng: random.Random, img: Any, size: int, cs: int, step: int,
           ) -> tuple[str, bool, tuple[tuple[int, int], ...]]:
    """One random operation; returns its label, whether it made things durable, and the
    ranges it left unspecified."""
    r = rng.random()
    if r < 0.38:
        at, n = _range(rng, size, cs)
        data = bytes([step % 251 + 1]) * n
        if rng.random() < 0.15:
            img.set_write_parallelization(2)
            img.write(data, at)
            img.set_write_parallelization(1)
        else:
            img.write(data, at)
        return f"write {at}+{n}", False, ()
    if r < 0.46:
        at, n = _range(rng, size, cs)
        img.write_zeroes(at, n)
        return f"write_zeroes {at}+{n}", False, ()
    if r < 0.52:
        at, n = _range(rng, size, cs)
        img.discard_to_zero(at, n)
        return f"discard_to_zero {at}+{n}", False, ()
    if r < 0.57:
        at, n = _range(rng, size, cs)
        img.discard_to_any(at, n)
        return f"discard_to_any {at}+{n}", False, ((at, n),)
    if r < 0.62:
        at, n = _range(rng, size, cs)
        img.discard_to_backing(at, n)
        return f"discard_to_backing {at}+{n}", False, ()
    if r < 0.70:
        per_l2 = cs * cs // 8
        # Past the next L2-table boundary where that is cheap (small clusters).
        grow = rng.choice([512, cs, 3 * cs + 512, per_l2 + cs if per_l2 <= 2 << 20 else 8 * cs])
        mode = rng.choice(list(PreallocateMode))
        try:
            img.resize(size + grow, mode)
        except UnsupportedError as exc:  # a v2 image with snapshots (QEMU refuses it too)
            return f"grow +{grow} refused ({exc})", False, ()
        loose = ((size, grow),) if mode is PreallocateMode.NONE else ()
        return f"grow +{grow} {mode.name}", False, loose
    if r < 0.76 and size > 2 * cs:
        cut = rng.choice([512, cs, cs + 512])
        new_size = max(512, size - cut)
        try:
            img.resize(new_size)
        except UnsupportedError as exc:
            return f"shrink -{cut} refused ({exc})", False, ()
        # Until the new size is on storage, the part being cut off may read anything.
        return f"shrink -{cut}", False, ((new_size, size - new_size),)
    if r < 0.84:
        img.flush()
        return "flush", False, ()
    img.flush()
    img.sync()
    return "flush+sync", True, ()


def _guest(img: Any) -> bytes:
    return bytes(img.read(0, img.size))


def run_sequence(
    target: ImplementationTarget,
    seed: int,
    *,
    judge: CutJudge | None,
    stats: CampaignStats,
    operations: int = 16,
    max_cuts: int = 200,
) -> list[str]:
    """One random sequence and the check of its cut states; returns failure messages."""
    rng = random.Random(seed)
    chain = _build_chain(rng, target, shutil.which("qemu-img"))
    rec = RecordingStorage(chain.top)
    img = target.open(rec, writable=True, format="qcow2", explicit_backing=True,
                      backing=chain.backing)
    timeline = CrashTimeline(TimelinePoint(rec.mutations, _guest(img), True, (), "open"))
    log: list[str] = []
    try:
        for step in range(1, operations + 1):
            label, durable, loose = _apply(rng, img, img.size, chain.cluster_size, step)
            log.append(label)
            timeline.add(TimelinePoint(rec.mutations, _guest(img), durable, loose, label))
        img.close()
        timeline.add(TimelinePoint(rec.mutations, timeline.points[-1].content, False, (),
                                   "close"))
    finally:
        if not img.closed:
            img.close()
    stats.sequences += 1
    stats.operations += operations
    stats.mutations += rec.mutations
    failures: list[str] = []
    cuts = rec.sample_cuts(0, max_cuts, rng)
    def open_cut(storage: MemoryStorage) -> Any:
        return target.open(storage, writable=False, format="qcow2", explicit_backing=True,
                           backing=chain.backing)

    for k, state in rec.cut_states(cuts):
        stats.cuts += 1
        verdict = check_cut(k, bytes(state), timeline, open_cut, judge)
        stats.leaked_clusters += verdict.leaks
        stats.cuts_with_leaks += bool(verdict.leaks)
        stats.corruptions += bool(verdict.corruptions)
        stats.open_errors += verdict.open_error
        stats.readonly_writes += verdict.readonly_write
        stats.lost_or_wrong += verdict.wrong
        if verdict.problems:
            failures.append("\n  ".join(verdict.problems))
            if len(failures) >= 3:
                break
    if failures:
        head = (f"seed {seed}: {chain.description}\n  ops: " + "; ".join(log) + "\n  ")
        return [head + failures[0], *failures[1:]]
    return []


def run_campaign(
    target: ImplementationTarget,
    *,
    sequences: int,
    seed: int = 0,
    judge: CutJudge | None = None,
    operations: int = 16,
    max_cuts: int = 200,
    stop_after: int | None = None,
    progress: Callable[[CampaignStats], None] | None = None,
) -> CampaignStats:
    """Run ``sequences`` random sequences (seeds ``seed``, ``seed + 1``, ...)."""
    stats = CampaignStats()
    for i in range(sequences):
        found = run_sequence(target, seed + i, judge=judge, stats=stats,
                             operations=operations, max_cuts=max_cuts)
        stats.failures += found[:1]
        if progress is not None:
            progress(stats)
        if stop_after is not None and len(stats.failures) >= stop_after:
            break
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyimago.oracle.crash_campaign",
        description="Power-cut campaign: random sequences, a cut after every storage write.",
    )
    parser.add_argument("--impl", default="pyimago.reference",
                        help="implementation module (default: pyimago.reference)")
    parser.add_argument("--sequences", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--operations", type=int, default=16)
    parser.add_argument("--max-cuts", type=int, default=200)
    parser.add_argument("--judge", choices=["qemu-img", "reference"], default="qemu-img")
    parser.add_argument("--show", type=int, default=5, help="failures to print")
    args = parser.parse_args(argv)
    if args.sequences < 1 or args.operations < 1 or args.max_cuts < 2:
        parser.error("--sequences and --operations must be >= 1, --max-cuts >= 2")
    target = resolve_target(args.impl)
    judge: CutJudge | None
    if args.judge == "qemu-img":
        qemu_img = shutil.which("qemu-img")
        if qemu_img is None:
            parser.error("qemu-img not found (install qemu-utils, or --judge reference)")
        judge = qemu_judge(qemu_img)
    else:
        judge = reference_judge()
        if judge is None:
            parser.error("pyimago.reference has no check() yet")
    started = time.monotonic()
    stats = run_campaign(target, sequences=args.sequences, seed=args.seed, judge=judge,
                         operations=args.operations, max_cuts=args.max_cuts)
    print(f"{target.name}: {stats.summary()} in {time.monotonic() - started:.1f} s")
    for failure in stats.failures[: args.show]:
        print("FAIL", failure)
    return 0 if stats.clean else 1


if __name__ == "__main__":
    sys.exit(main())
