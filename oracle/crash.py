"""Power cuts: a storage that records every mutation, and the states a cut can leave.

The crash model is QEMU's for qcow2 without lazy refcounts: a power cut can hit after any
single storage mutation (write, write_zeroes, discard, resize); each mutation is atomic and
mutations reach the medium in the order they were issued.  ``sync`` is a barrier: what was
issued before a completed sync survives any later cut.  (The reorder model, where any
subset of the mutations since the last sync may be lost, is :meth:`RecordingStorage.
reordered_state`.)

:class:`RecordingStorage` wraps any :class:`~pyimago.reference.Storage` (memory or file),
forwards every call, and logs each mutation; :meth:`RecordingStorage.state_after` and
:meth:`RecordingStorage.cut_states` rebuild the bytes the storage would hold after a cut.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pyimago.reference import InvalidRequestError, MemoryStorage, PreallocateMode, PyimagoError
from pyimago.reference._storage import Buffer, Storage, WritableBuffer

__all__ = [
    "ChunkedContent",
    "CrashTimeline",
    "CutJudge",
    "CutVerdict",
    "Mutation",
    "RecordingStorage",
    "TimelinePoint",
    "apply_mutation",
    "check_cut",
    "crash_clauses",
    "qemu_judge",
    "reference_judge",
    "unknown_ranges",
]

MutationKind = Literal["write", "write_zeroes", "discard", "resize"]


@dataclass(frozen=True, slots=True)
class Mutation:
    """One storage-level change: ``write`` carries ``data``; ``write_zeroes`` and ``discard``
    cover ``[offset, offset + length)`` (a discard's ``data`` is what the storage held there
    right after it, up to its end); ``resize`` sets the size to ``offset``."""

    kind: MutationKind
    offset: int
    length: int
    data: bytes | None = None

    def describe(self) -> str:
        if self.kind == "resize":
            return f"resize to {self.offset}"
        return f"{self.kind} [0x{self.offset:x}, 0x{self.offset + self.length:x})"


def apply_mutation(buf: bytearray, m: Mutation) -> None:
    """Apply ``m`` to ``buf`` as the storage did (writes past the end extend it; a discard
    leaves what the storage read back after it, zeroes where none was recorded)."""
    if m.kind == "resize":
        if m.offset < len(buf):
            del buf[m.offset :]
        else:
            buf.extend(bytes(m.offset - len(buf)))
        return
    # A write, or a discard as the storage left it (its bytes read back right after it).
    data = bytes(m.length) if m.data is None else m.data
    end = m.offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[m.offset : end] = data


class RecordingStorage:
    """A Storage that forwards to ``inner`` and records every mutation and sync barrier.

    The bytes ``inner`` holds when it is wrapped are the *base*; mutation ``k`` (counting
    from 1) is the k-th change since.  ``state_after(k)`` is what a cut right after mutation
    ``k`` leaves (``state_after(0)`` is the base).  ``synced`` is the number of mutations a
    completed ``sync`` made durable.  ``checkpoint()`` makes the current bytes the new base
    (so long runs do not keep every mutation), keeping the numbering.
    """

    def __init__(self, inner: Storage, *, name: str | None = None) -> None:
        self.inner = inner
        self._name = name or inner.name
        self._base = bytearray(inner.read(0, inner.size()))
        self._base_index = 0
        self.log: list[Mutation] = []
        self.syncs: list[int] = []
        self.synced = 0

    # -- Storage protocol ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Any:
        return getattr(self.inner, "path", None)

    @property
    def writable(self) -> bool:
        return self.inner.writable

    @property
    def req_align(self) -> int:
        return self.inner.req_align

    @property
    def mem_align(self) -> int:
        return self.inner.mem_align

    def __str__(self) -> str:
        return str(self.inner)

    def size(self) -> int:
        return self.inner.size()

    def readinto(self, buf: WritableBuffer, offset: int) -> None:
        self.inner.readinto(buf, offset)

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def write(self, data: Buffer, offset: int) -> None:
        payload = bytes(memoryview(data).cast("B"))
        self.inner.write(payload, offset)
        self.log.append(Mutation("write", offset, len(payload), payload))

    def write_zeroes(self, offset: int, length: int) -> None:
        self.inner.write_zeroes(offset, length)
        self.log.append(Mutation("write_zeroes", offset, length))

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)
        # What a discarded range reads back as is the storage's choice (a punched hole reads
        # zeroes; FileStorage keeps the data, discarding being advisory): record what it now
        # holds, so a cut state is one this storage can really be left in.
        end = min(offset + length, self.inner.size())
        after = self.inner.read(offset, end - offset) if end > offset else b""
        self.log.append(Mutation("discard", offset, length, after))

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        self.inner.resize(new_size, prealloc)
        self.log.append(Mutation("resize", new_size, 0))

    def flush(self) -> None:
        self.inner.flush()

    def sync(self) -> None:
        self.inner.sync()
        self.synced = self.mutations
        self.syncs.append(self.synced)

    def invalidate_cache(self) -> None:
        self.inner.invalidate_cache()

    def close(self) -> None:
        self.inner.close()

    # -- crash states -------------------------------------------------------------------------

    @property
    def mutations(self) -> int:
        """How many mutations there have been since the storage was wrapped."""
        return self._base_index + len(self.log)

    def _check_index(self, k: int) -> None:
        if not self._base_index <= k <= self.mutations:
            raise InvalidRequestError(
                f"crash state after mutation {k}: only mutations {self._base_index}.."
                f"{self.mutations} are recorded"
            )

    def state_after(self, k: int) -> bytearray:
        """The bytes the storage holds after a cut right after mutation ``k``."""
        self._check_index(k)
        buf = bytearray(self._base)
        for m in self.log[: k - self._base_index]:
            apply_mutation(buf, m)
        return buf

    def cut_states(
        self, cuts: Iterable[int] | None = None, *, since: int | None = None
    ) -> Iterator[tuple[int, bytearray]]:
        """``(k, bytes)`` for each cut point ``k`` (ascending), built incrementally.

        ``cuts`` defaults to every mutation from ``since`` (default: the base) to the last
        one.  The yielded buffer is reused and changes on the next iteration: copy it to keep
        it.
        """
        first = self._base_index if since is None else since
        wanted = sorted(set(range(first, self.mutations + 1) if cuts is None else cuts))
        if not wanted:
            return
        self._check_index(wanted[0])
        self._check_index(wanted[-1])
        buf = bytearray(self._base)
        at = self._base_index
        for k in wanted:
            for m in self.log[at - self._base_index : k - self._base_index]:
                apply_mutation(buf, m)
            at = k
            yield k, buf

    def describe_mutation(self, k: int) -> str:
        """What mutation ``k`` was (while it is still in the log)."""
        if self._base_index < k <= self.mutations:
            return self.log[k - 1 - self._base_index].describe()
        return f"mutation {k}"

    def sample_cuts(self, since: int, limit: int, rng: random.Random) -> list[int]:
        """Up to ``limit`` cut points in ``[since, mutations]``: all of them when they fit,
        else the first and last and a random sample between."""
        points = list(range(max(since, self._base_index), self.mutations + 1))
        if len(points) <= limit:
            return points
        inner = rng.sample(points[1:-1], max(0, limit - 2))
        return sorted({points[0], points[-1], *inner, *self.pointer_cuts(points[0])})

    #: At most this many writes to the header, and to other metadata, (each with the cut
    #: after it and one mutation later) join a sample.
    HEADER_CUTS = 2
    POINTER_CUTS = 5

    def _pointer_regions(self) -> list[tuple[int, int]]:
        """Where a qcow2 image keeps its metadata, as the base state's header names it: the
        header cluster, the L1 table, the refcount table, the L2 tables and the refcount
        blocks (none for anything but qcow2)."""
        base = self._base
        if len(base) < 72 or base[:4] != b"QFI\xfb":
            return []
        bits = int.from_bytes(base[20:24], "big")
        if not 9 <= bits <= 21:
            return []
        cs = 1 << bits
        l1_size = int.from_bytes(base[36:40], "big")
        l1_at = int.from_bytes(base[40:48], "big")
        rt_at = int.from_bytes(base[48:56], "big")
        rt_clusters = int.from_bytes(base[56:60], "big")
        regions = [(0, cs), (l1_at, l1_size * 8), (rt_at, rt_clusters * cs)]
        # The L2 tables the L1 table points at, the refcount blocks the refcount table does.
        for at, n in ((l1_at, l1_size), (rt_at, rt_clusters * cs // 8)):
            table = base[at : at + 8 * min(n, 1 << 16)]
            for i in range(0, len(table) - 7, 8):
                pointed = int.from_bytes(table[i : i + 8], "big") & 0x00FF_FFFF_FFFF_FE00
                if pointed:
                    regions.append((pointed, cs))
        return regions

    def pointer_cuts(self, since: int) -> list[int]:
        """The cuts right after the last writes to the image's metadata (see
        ``_pointer_regions``), and one mutation later: the header's first, then the
        others', newest first.

        A metadata write (a header field, an L1 or refcount-table entry, an L2 entry, a
        refcount) switches the image to what it points at or counts: a write order that
        puts it before that (crash.order.*) breaks only in the few states around it, which
        a uniform sample of a long stretch (a disk fill: thousands of mutations) all but
        never draws."""
        regions = self._pointer_regions()
        if not regions:
            return []
        header_end = regions[0][1]
        header: list[int] = []
        others: list[int] = []
        for i in range(len(self.log) - 1, max(since - self._base_index, 0) - 1, -1):
            m = self.log[i]
            if m.kind == "resize":
                continue
            end = m.offset + max(m.length, 1)
            in_header = m.offset < header_end
            found, cap = (header, self.HEADER_CUTS) if in_header else (others, self.POINTER_CUTS)
            if len(found) >= 2 * cap:
                if len(header) >= 2 * self.HEADER_CUTS and len(others) >= 2 * self.POINTER_CUTS:
                    break
                continue
            if in_header or any(a < end and m.offset < a + n for a, n in regions):
                k = self._base_index + i + 1
                found += [k, k + 1] if k < self.mutations else [k]
        return header + others

    def reordered_state(self, since: int, keep: Iterable[int]) -> bytearray:
        """The reorder model: a cut after mutation ``mutations`` where, of the mutations after
        ``since`` (a sync point), only those numbered in ``keep`` reached the medium."""
        kept = set(keep)
        buf = self.state_after(since)
        for i, m in enumerate(self.log[since - self._base_index :], start=since + 1):
            if i in kept:
                apply_mutation(buf, m)
        return buf

    def checkpoint(self) -> None:
        """Forget the log up to now: the current bytes become the base."""
        for m in self.log:
            apply_mutation(self._base, m)
        self._base_index += len(self.log)
        self.log.clear()


# -- the power-cut rule ------------------------------------------------------------------------

SECTOR = 512
#: The crash rule compares whole chunks first and only the sectors of chunks no single point
#: of the window matches one by one; :class:`ChunkedContent` keeps points in such chunks.
CHUNK = 64 * SECTOR


class ChunkedContent:
    """A guest view cut into pieces of ``CHUNK`` bytes (the last one may be short).

    Points taken after consecutive operations share every piece an operation did not
    change, so a timeline point costs a copy of what changed, not of the whole disk.  Reads
    like the ``bytes`` it stands for: ``len``, slices, ``==`` with bytes.
    """

    __slots__ = ("chunks", "size")

    def __init__(self, chunks: tuple[bytes, ...]) -> None:
        self.chunks = chunks
        self.size = sum(map(len, chunks))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks)

    def __getitem__(self, key: slice) -> bytes:
        start, stop, stride = key.indices(self.size)
        if stride != 1:
            return bytes(self)[key]
        if start >= stop:
            return b""
        first, last = start // CHUNK, (stop - 1) // CHUNK
        base = first * CHUNK
        if first == last:
            return self.chunks[first][start - base : stop - base]
        return b"".join(self.chunks[first : last + 1])[start - base : stop - base]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkedContent):
            return self.chunks == other.chunks
        if isinstance(other, (bytes, bytearray)):
            return len(other) == self.size and all(
                other[i * CHUNK : (i + 1) * CHUNK] == chunk
                for i, chunk in enumerate(self.chunks))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """The image as the implementation reported it after one operation.

    ``mutations``: the storage's mutation count when the operation returned; ``content``: the
    whole guest content then; ``durable``: the operation completed a ``flush()`` + ``sync()``
    (everything up to here must survive any later cut); ``unspecified``: guest ranges the
    operation left with contents the contract does not fix (``discard_to_any``, a grow with
    ``PreallocateMode.NONE``); ``label``: what the operation was, for messages.
    """

    mutations: int
    content: bytes | ChunkedContent
    durable: bool = False
    unspecified: tuple[tuple[int, int], ...] = ()
    label: str = ""

    @property
    def size(self) -> int:
        return len(self.content)


class CrashTimeline:
    """What a recorded storage's image looked like after each operation, for judging cuts.

    Begin with the state the storage was wrapped in (durable: it existed before the run),
    then :meth:`add` a point after each operation.
    """

    def __init__(self, initial: TimelinePoint) -> None:
        self.points: list[TimelinePoint] = [initial]

    def add(self, point: TimelinePoint) -> None:
        if point.mutations < self.points[-1].mutations:
            raise InvalidRequestError("timeline points must come in mutation order")
        self.points.append(point)

    def window(self, cut: int) -> list[TimelinePoint]:
        """The points a cut after mutation ``cut`` may show: from the last durable point at
        or before the cut, to the first point at or after it (the operation in progress)."""
        first = 0
        for i, p in enumerate(self.points):
            if p.mutations > cut:
                break
            if p.durable:
                first = i
        last = len(self.points) - 1
        for i in range(first, len(self.points)):
            if self.points[i].mutations >= cut:
                last = i
                break
        return self.points[first : last + 1]

    def violations(self, cut: int, size: int, content: bytes, *, limit: int = 4) -> list[str]:
        """What is wrong with a cut state whose image has ``size`` and reads ``content``.

        The rule (``crash.power-cut``): the size is one some operation in the window gave the
        image; every 512-byte sector reads a value some point of the window had there (the
        durable value or one a later operation gave it), or lies in a range an operation of
        the window left unspecified.
        """
        window = self.window(cut)
        sizes = {p.size for p in window}
        if size not in sizes:
            return [f"cut after mutation {cut}: disk size {size} is none of "
                    f"{sorted(sizes)} (operations {window[0].label!r}..{window[-1].label!r})"]
        if any(p.content == content for p in window if p.size == size):
            return []
        # The durable point's own unspecified ranges count too: a point built from a model
        # (the machines) has no actual bytes there to compare with.
        loose = [r for p in window for r in p.unspecified]
        problems: list[str] = []
        for at in self._suspect_sectors(window, size, content):
            if any(a <= at and at + SECTOR <= a + n for a, n in loose):
                continue
            durable = window[0]
            problems.append(
                f"cut after mutation {cut}: sector at guest 0x{at:x} reads "
                f"{content[at : at + 8].hex()}.. which no operation from {durable.label!r} "
                f"(durable) to {window[-1].label!r} put there"
            )
            if len(problems) >= limit:
                break
        return problems

    @staticmethod
    def _suspect_sectors(window: list[TimelinePoint], size: int,
                         content: bytes) -> Iterator[int]:
        """The sectors no point of the window had: a chunk equal to one point's is right
        whole (that compare runs at memcmp speed); only the sectors of other chunks are
        compared one by one."""
        for index, start in enumerate(range(0, size, CHUNK)):
            end = min(start + CHUNK, size)
            actual = content[start:end]
            # Consecutive points share the pieces an operation did not change: each distinct
            # piece is compared once (by identity; the dict keeps them alive, so no id is
            # reused while it is in use).
            pieces: dict[int, bytes] = {}
            for p in window:
                if start < p.size:
                    piece = _piece(p.content, index, start, min(end, p.size))
                    pieces.setdefault(id(piece), piece)
            if any(len(piece) == end - start and piece == actual
                   for piece in pieces.values()):
                continue
            for off in range(0, end - start, SECTOR):
                sector = actual[off : off + SECTOR]
                if not any(piece[off : off + SECTOR] == sector
                           for piece in pieces.values() if off < len(piece)):
                    yield start + off


def _piece(content: bytes | ChunkedContent, index: int, start: int, end: int) -> bytes:
    """``content[start:end]`` of chunk ``index``, without a copy when it is a whole chunk."""
    if isinstance(content, ChunkedContent):
        chunks = content.chunks
        if index < len(chunks) and len(chunks[index]) == end - start:
            return chunks[index]
    return content[start:end]


def unknown_ranges(known: bytes | bytearray) -> tuple[tuple[int, int], ...]:
    """The ranges where a model's ``known`` mask is 0, widened to whole sectors (the crash
    rule judges sectors, and a sector partly unspecified may read anything)."""
    out: list[tuple[int, int]] = []
    # find() runs at memchr speed; the masks are mostly ones with a few runs of zeroes.
    pos = known.find(0)
    while pos >= 0:
        stop = known.find(1, pos)
        stop = len(known) if stop < 0 else stop
        start = pos - pos % SECTOR
        end = -(-stop // SECTOR) * SECTOR
        if out and out[-1][0] + out[-1][1] >= start:
            start = out.pop()[0]
        out.append((start, end - start))
        pos = known.find(0, stop)
    return tuple(out)


# -- judging one cut state --------------------------------------------------------------------

#: Judges one cut state (the image file's bytes): ``(corruptions, leaks, messages)``.
CutJudge = Callable[[bytes], tuple[int, int, list[str]]]

_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None


#: qemu-img check's line for a COPIED flag that disagrees with a refcount of 1: the flag is
#: missing (it is set on a refcount-1 cluster only).
_COPIED_MISSING = re.compile(r"^(ERROR |corruption.*: )OFLAG_COPIED (L2|data) cluster: "
                             r".*\brefcount=1$")


def benign_copied(lines: Iterable[str]) -> int:
    """How many findings are a COPIED flag missing on a cluster whose refcount is 1.

    crash.power-cut does not count them: such a cluster is only copied on its next write
    (needlessly), never overwritten in place, and QEMU itself leaves them between dropping
    a snapshot's references and its pass restoring COPIED (qcow2_snapshot_delete)."""
    return sum(1 for line in lines if _COPIED_MISSING.search(line.strip()))


def qemu_judge(qemu_img: str, *, repair: bool = False,
               data_file: Callable[[], bytes | bytearray | None] | None = None) -> CutJudge:
    """``qemu-img check --output=json`` on a copy of the bytes (in /dev/shm when there).

    ``repair``: ``check -r all``, counting what is left after the repair (an image with lazy
    refcounts promises only that: qcow2.features.lazy-refcounts)."""

    def judge(image: bytes) -> tuple[int, int, list[str]]:
        with tempfile.NamedTemporaryFile(suffix=".qcow2", dir=_TMP) as f:
            f.write(image)
            f.flush()
            # The backing is not needed to check one file's metadata: json: with backing null.
            spec = json.dumps({"driver": "qcow2", "backing": None,
                               "file": {"driver": "file", "filename": f.name},
                               **_data_file_option(f.name, data_file)})
            proc = subprocess.run(
                [qemu_img, "check", *(("-r", "all") if repair else ()), "--output=json",
                 f"json:{spec}"],
                capture_output=True, text=True, check=False,
            )
            if data_file is not None:
                os.unlink(f.name + ".data")
        try:
            out = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return 1, 0, [f"qemu-img check failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[:300]}"]
        corrupt = int(out.get("corruptions", 0)) + int(out.get("check-errors", 0))
        corrupt -= benign_copied(proc.stderr.splitlines())
        msgs = [proc.stderr.strip()[:600]] if corrupt else []
        return corrupt, int(out.get("leaks", 0)), msgs

    return judge


def _data_file_option(image: str, data_file: Callable[[], bytes | bytearray | None] | None
                      ) -> dict[str, Any]:
    """qemu_judge's ``data_file``: the bytes of the image's external data file in the same
    cut state, written beside the image's copy (the json: spec's ``data-file``)."""
    if data_file is None:
        return {}
    with open(image + ".data", "wb") as f:
        f.write(bytes(data_file() or b""))
    return {"data-file": {"driver": "file", "filename": image + ".data"}}


def reference_judge() -> CutJudge | None:
    """``pyimago.reference.check`` as the judge, where it exists (None until then)."""
    import pyimago.reference as reference

    check = getattr(reference, "check", None)
    if check is None:
        return None

    def judge(image: bytes) -> tuple[int, int, list[str]]:
        result = check(MemoryStorage(image, name="cut"))
        found = [str(p) for p in result.problems if p.kind.value != "leak"]
        corrupt = result.corruptions + result.check_errors - benign_copied(found)
        return corrupt, result.leaks, found[:5] if corrupt else []

    return judge


@dataclass(slots=True)
class CutVerdict:
    """What checking one cut state found (``problems`` empty: the cut is fine)."""

    cut: int
    judged: bool = False
    corruptions: int = 0
    leaks: int = 0
    open_error: bool = False
    readonly_write: bool = False
    wrong: bool = False
    problems: list[str] = field(default_factory=list)


def check_cut(
    cut: int,
    image: bytes,
    timeline: CrashTimeline,
    open_cut: Callable[[MemoryStorage], Any],
    judge: CutJudge | None = None,
) -> CutVerdict:
    """Check the image a cut after mutation ``cut`` leaves (``image``: the top layer's bytes).

    ``crash.power-cut``: ``judge`` (when given) finds no corruption (leaks are counted); the
    image opens read-only (``open_cut(storage)`` returns an open FormatAccess) with no error
    that is not a pyimago error; the open changes no byte (``crash.readonly-open``); every
    sector reads what :meth:`CrashTimeline.violations` allows.
    """
    verdict = CutVerdict(cut)
    if judge is not None:
        verdict.judged = True
        corrupt, leaks, msgs = judge(image)
        verdict.corruptions, verdict.leaks = corrupt, leaks
        if corrupt:
            verdict.problems += [f"cut after mutation {cut}: check finds {corrupt} "
                                 "corruption(s)", *msgs]
    copy = MemoryStorage(image, name="cut")
    try:
        with open_cut(copy) as img:
            size = img.size
            content = bytes(img.read(0, size))
    except PyimagoError as exc:
        verdict.open_error = True
        if not verdict.problems:
            verdict.problems.append(f"cut after mutation {cut}: does not open: {exc}")
        return verdict
    except Exception as exc:
        verdict.open_error = True
        verdict.problems.append(f"cut after mutation {cut}: opening raises "
                                f"{type(exc).__name__}: {exc}")
        return verdict
    if copy.snapshot() != image:
        verdict.readonly_write = True
        verdict.problems.append(f"cut after mutation {cut}: a read-only open changed the image")
    wrong = timeline.violations(cut, size, content)
    if wrong:
        verdict.wrong = True
        verdict.problems += wrong
    return verdict


def crash_clauses(exc: BaseException) -> tuple[str, ...]:
    """The ``crash.*`` spec clauses a failure names (looking inside exception groups and
    causes): how a test tells a broken power-cut promise from any other failure."""
    found: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        found += [c for c in getattr(e, "clauses", ()) if str(c).startswith("crash.")]
        if isinstance(e, BaseExceptionGroup):
            todo += list(e.exceptions)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return tuple(dict.fromkeys(found))
