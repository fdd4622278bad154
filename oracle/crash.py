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

import atexit
import bisect
import contextlib
import itertools
import json
import operator
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
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

#: The offset bits of an L1 or refcount-table entry (as ``_pointer_regions`` reads them).
_POINTER_MASK = 0x00FF_FFFF_FFFF_FE00

#: The header bytes that place the L1 and refcount tables (up to refcount_table_clusters).
_HEADER_TABLES = 60


def _header_tables(header: bytes | bytearray) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """What a qcow2 header says of its tables: the cluster bits, then ``(offset, bytes)`` of
    the L1 table and of the refcount table (bits 0 for a header that is not one)."""
    bits = int.from_bytes(header[20:24], "big")
    if len(header) < _HEADER_TABLES or header[:4] != b"QFI\xfb" or not 9 <= bits <= 21:
        return 0, (0, 0), (0, 0)
    l1 = (int.from_bytes(header[40:48], "big"), 8 * int.from_bytes(header[36:40], "big"))
    rt = (int.from_bytes(header[48:56], "big"), int.from_bytes(header[56:60], "big") << bits)
    return bits, l1, rt


def _table_places(header: bytes | bytearray) -> list[tuple[int, int]]:
    """Where a qcow2 header puts its L1 table and its refcount table: ``(offset, bytes)``
    each (empty ones for a header that is not one)."""
    _, l1, rt = _header_tables(header)
    # (Bounded: a hostile header must not make the oracle copy gigabytes.)
    return [(at, min(n, 1 << 20)) for at, n in (l1, rt)]


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

    #: _pointer_regions of the base, and which base (its id and index) they were found in.
    _regions: tuple[tuple[int, int], list[tuple[int, int]]] | None = None

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
        # bytes cannot change under the log; anything else is copied.
        payload = data if type(data) is bytes else bytes(memoryview(data).cast("B"))
        self.inner.write(payload, offset)
        self._record(Mutation("write", offset, len(payload), payload))

    def write_zeroes(self, offset: int, length: int) -> None:
        self.inner.write_zeroes(offset, length)
        self._record(Mutation("write_zeroes", offset, length))

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)
        # What a discarded range reads back as is the storage's choice (a punched hole reads
        # zeroes; FileStorage keeps the data, discarding being advisory): record what it now
        # holds, so a cut state is one this storage can really be left in.
        end = min(offset + length, self.inner.size())
        after = self.inner.read(offset, end - offset) if end > offset else b""
        self._record(Mutation("discard", offset, length, after))

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        self.inner.resize(new_size, prealloc)
        self._record(Mutation("resize", new_size, 0))

    def _record(self, m: Mutation) -> None:
        """Log one mutation (subclasses route it elsewhere: a journal, a paired image)."""
        self.log.append(m)

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

    def _wanted_cuts(self, cuts: Iterable[int] | None, since: int | None) -> list[int]:
        """The cut points ``cut_states`` builds, ascending and checked to be in the log."""
        first = self._base_index if since is None else since
        wanted = sorted(set(range(first, self.mutations + 1) if cuts is None else cuts))
        if wanted:
            self._check_index(wanted[0])
            self._check_index(wanted[-1])
        return wanted

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
        wanted = self._wanted_cuts(cuts, since)
        if not wanted:
            return
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
        blocks (none for anything but qcow2).  Kept until the base changes (a checkpoint
        with mutations: each check asks twice, for its sample and for its judged cuts)."""
        key = (id(self._base), self._base_index)
        if self._regions is None or self._regions[0] != key:
            self._regions = (key, _pointer_regions(self._base))
        return self._regions[1]

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

    #: Of the writes that set a pointer in the L1 table, and of those in the refcount table,
    #: at most this many (the newest) are judged per check (see ``new_pointer_cuts``).
    NEW_POINTER_CUTS = 2

    def new_pointer_cuts(self, since: int) -> list[int]:
        """The cuts right after the writes since ``since`` that set an entry of the L1 table
        or of the refcount table to a new pointer: the newest ``NEW_POINTER_CUTS`` of each
        table's, newest first.  The tables are followed where the header moves them.

        crash.order.new-structure-before-pointer: an L2 table or a refcount block written
        after the entry that points at it leaves the entry pointing at garbage in the
        states between those writes.  Reads do not show it (refcounts are not read; a flush
        writes the L2 tables before anything reads them): only the judge does, and only in
        those states, which a sample of the stretch's metadata writes (every L2 table and
        refcount block written counts as one) seldom holds.
        """
        if not self._pointer_regions():
            return []
        header = bytearray(self._base[:_HEADER_TABLES])
        places = _table_places(header)
        shadows = [self._region_state(at, n, 0) for at, n in places]
        hits: list[list[int]] = [[] for _ in places]
        for i, m in enumerate(self.log):
            if m.kind == "resize":
                continue
            data = bytes(m.length) if m.data is None else m.data
            if m.offset < _HEADER_TABLES:
                piece = data[: _HEADER_TABLES - m.offset]
                header[m.offset : m.offset + len(piece)] = piece
                moved = _table_places(header)
                if moved != places:
                    # A table moved (or grew): follow it there, as it is now.
                    places = moved
                    shadows = [self._region_state(at, n, i + 1) for at, n in places]
                    continue
            k = self._base_index + i + 1
            for (at, n), shadow, found in zip(places, shadows, hits, strict=True):
                lo, hi = max(at, m.offset), min(at + n, m.offset + len(data))
                if lo >= hi:
                    continue
                first, last = (lo - at) // 8 * 8, min(-(-(hi - at) // 8) * 8, n)
                old = bytes(shadow[first:last])
                shadow[lo - at : hi - at] = data[lo - m.offset : hi - m.offset]
                if k >= since and any(
                    (new := int.from_bytes(shadow[j : j + 8], "big") & _POINTER_MASK)
                    and new != int.from_bytes(old[j - first : j - first + 8], "big")
                    & _POINTER_MASK
                    for j in range(first, last - 7, 8)
                ):
                    found.append(k)
        return sorted((k for found in hits for k in found[::-1][: self.NEW_POINTER_CUTS]),
                      reverse=True)

    def _region_state(self, at: int, n: int, upto: int) -> bytearray:
        """``[at, at + n)`` of the state after the first ``upto`` mutations of the log."""
        buf = bytearray(self._base[at : at + n])
        buf.extend(bytes(n - len(buf)))
        for m in self.log[:upto]:
            if m.kind == "resize" or m.offset >= at + n or m.offset + m.length <= at:
                continue
            data = bytes(m.length) if m.data is None else m.data
            lo, hi = max(at, m.offset), min(at + n, m.offset + len(data))
            buf[lo - at : hi - at] = data[lo - m.offset : hi - m.offset]
        return buf

    def reordered_state(self, since: int, keep: Iterable[int]) -> bytearray:
        """The reorder model: a cut after mutation ``mutations`` where, of the mutations after
        ``since`` (a sync point), only those numbered in ``keep`` reached the medium."""
        kept = set(keep)
        buf = self.state_after(since)
        for i, m in enumerate(self.log[since - self._base_index :], start=since + 1):
            if i in kept:
                apply_mutation(buf, m)
        return buf

    def checkpoint(self, current: bytearray | None = None) -> None:
        """Forget the log up to now: the current bytes become the base.  ``current``: those
        bytes already rebuilt (``state_after(mutations)``, handed over: not copied)."""
        if current is not None:
            self._base = current
        else:
            for m in self.log:
                apply_mutation(self._base, m)
        self._base_index += len(self.log)
        self.log.clear()


_ZERO_BLOCK = bytes(1 << 15)


def _used_prefix(data: bytes) -> int:
    """The length of ``data`` without its trailing zero bytes (compared a block at a time:
    ``rstrip`` walks them one by one)."""
    end = len(data)
    block = len(_ZERO_BLOCK)
    while end >= block and _ZERO_BLOCK.startswith(data[end - block : end]):
        end -= block
    return len(data[max(0, end - block) : end].rstrip(b"\0")) + max(0, end - block)


def _pointer_regions(base: bytearray) -> list[tuple[int, int]]:
    """RecordingStorage._pointer_regions of the bytes ``base``."""
    bits, l1, rt = _header_tables(base)
    if len(base) < 72 or not bits:
        return []
    cs = 1 << bits
    regions = [(0, cs), l1, rt]
    # The L2 tables the L1 table points at, the refcount blocks the refcount table does.
    for at, n in (l1, rt):
        table = bytes(base[at : at + min(n, 8 << 16)])
        # Tables are mostly zero past their last entry (a 2 MiB refcount table holds
        # 262,144): only the used prefix is decoded, in C.
        used = -(-_used_prefix(table) // 8) * 8
        entries = array("Q", table[:used])
        if sys.byteorder == "little":
            entries.byteswap()
        regions += [(pointed, cs) for pointed in
                    {e & _POINTER_MASK for e in entries} - {0}]
    return regions


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


_mutations = operator.attrgetter("mutations")


class CrashTimeline:
    """What a recorded storage's image looked like after each operation, for judging cuts.

    Begin with the state the storage was wrapped in (durable: it existed before the run),
    then :meth:`add` a point after each operation.
    """

    def __init__(self, initial: TimelinePoint) -> None:
        self.points: list[TimelinePoint] = [initial]
        self._pieces: _WindowPieces | None = None

    def add(self, point: TimelinePoint) -> None:
        if point.mutations < self.points[-1].mutations:
            raise InvalidRequestError("timeline points must come in mutation order")
        self.points.append(point)

    def window(self, cut: int) -> list[TimelinePoint]:
        """The points a cut after mutation ``cut`` may show: from the last durable point at
        or before the cut, to the first point at or after it (the operation in progress)."""
        points = self.points
        # (Points come in mutation order: bisection, then back to the last durable one.)
        first = 0
        for i in range(bisect.bisect_right(points, cut, key=_mutations) - 1, -1, -1):
            if points[i].durable:
                first = i
                break
        last = min(bisect.bisect_left(points, cut, lo=first, key=_mutations), len(points) - 1)
        return points[first : last + 1]

    def violations(self, cut: int, size: int, content: bytes | bytearray, *,
                   limit: int = 4) -> list[str]:
        """What is wrong with a cut state whose image has ``size`` and reads ``content``.

        The rule (``crash.power-cut``): the size is one some operation in the window gave the
        image; every 512-byte sector reads a value some point of the window had there (the
        durable value or one a later operation gave it), or lies in a range an operation of
        the window left unspecified.
        """
        window = self.window(cut)
        pieces = self._window_pieces(window)
        if size not in pieces.sizes:
            return [f"cut after mutation {cut}: disk size {size} is none of "
                    f"{sorted(pieces.sizes)} (operations {window[0].label!r}.."
                    f"{window[-1].label!r})"]
        problems: list[str] = []
        for at in pieces.suspects(size, content):
            durable = window[0]
            problems.append(
                f"cut after mutation {cut}: sector at guest 0x{at:x} reads "
                f"{content[at : at + 8].hex()}.. which no operation from {durable.label!r} "
                f"(durable) to {window[-1].label!r} put there"
            )
            if len(problems) >= limit:
                break
        return problems

    def _window_pieces(self, window: list[TimelinePoint]) -> _WindowPieces:
        """The distinct pieces of ``window``, grown from the last window's when that one is
        a prefix of it (the cuts of one check come in order: their windows mostly grow)."""
        cached = self._pieces
        if cached is None or len(cached.points) > len(window) \
                or any(map(operator.is_not, cached.points, window)):
            cached = self._pieces = _WindowPieces(window[0])
        for p in window[len(cached.points):]:
            cached.add(p)
        return cached


def _chunks(content: bytes | ChunkedContent) -> tuple[bytes, ...]:
    if isinstance(content, ChunkedContent):
        return content.chunks
    return tuple(content[a : a + CHUNK] for a in range(0, len(content), CHUNK))


class _WindowPieces:
    """Chunk by chunk, the distinct pieces the points of a window hold: a cut state's chunk
    equal to one of them is right whole; only the sectors of other chunks are compared one
    by one.

    Points of one timeline share the chunks no operation changed (:class:`ChunkedContent`),
    so the chunks a point changed are found by identity at C speed, and a chunk most
    operations left alone has a single piece: a cut state costs one memcmp per chunk, not
    one per chunk and point of the window.
    """

    __slots__ = ("_loose", "first", "last", "loose", "more", "points", "sizes")

    def __init__(self, first: TimelinePoint) -> None:
        self.points = [first]
        #: The disk sizes the points of the window have.
        self.sizes = {first.size}
        self.first = self.last = _chunks(first.content)
        #: Chunk index -> the pieces other points of the window have there.
        self.more: dict[int, list[bytes]] = {}
        #: The ranges operations of the window left unspecified (the durable point's own
        #: count too: a point built from a model has no actual bytes there to compare with).
        self.loose: set[tuple[int, int]] = set(first.unspecified)
        self._loose: tuple[list[int], list[int]] | None = None

    def add(self, point: TimelinePoint) -> None:
        chunks = _chunks(point.content)
        last, first, more = self.last, self.first, self.more
        # ``!=`` on the same object is an identity test; on two objects a memcmp.
        changed = itertools.compress(range(len(chunks)), map(operator.ne, chunks, last))
        grown = range(len(last), len(chunks))
        for i in itertools.chain(changed, grown):
            piece = chunks[i]
            if i < len(first) and first[i] == piece:
                continue
            pieces = more.setdefault(i, [])
            if piece not in pieces:  # (== on each, in C)
                pieces.append(piece)
        self.points.append(point)
        self.sizes.add(point.size)
        self.last = chunks
        if not self.loose.issuperset(point.unspecified):
            self.loose.update(point.unspecified)
            self._loose = None

    def _loose_index(self) -> tuple[list[int], list[int]]:
        """The unspecified ranges by start, and the furthest end among each prefix: a
        sector lies inside one of them when the furthest end of those starting at or
        before it reaches its end."""
        if self._loose is None:
            ranges = sorted(self.loose)
            ends = list(itertools.accumulate((a + n for a, n in ranges), max))
            self._loose = [a for a, _ in ranges], ends
        return self._loose

    def _unspecified(self, at: int, length: int = SECTOR) -> bool:
        """Whether ``[at, at + length)`` lies inside one range the window left unspecified."""
        starts, ends = self._loose_index()
        j = bisect.bisect_right(starts, at) - 1
        return j >= 0 and ends[j] >= at + length

    def suspects(self, size: int, content: bytes | bytearray) -> Iterator[int]:
        """The sectors of ``content`` (``size`` bytes) no point of the window had, outside
        the ranges the window left unspecified."""
        first, more = self.first, self.more
        actual = [content[a : a + CHUNK] for a in range(0, size, CHUNK)]
        odd = itertools.chain(
            itertools.compress(range(len(actual)), map(operator.ne, actual, first)),
            range(len(first), len(actual)),
        )
        for i in odd:
            chunk = actual[i]
            others = more.get(i, ())
            if chunk in others:
                continue
            base = i * CHUNK
            if self.loose and self._unspecified(base, len(chunk)):
                continue
            pieces = [first[i], *others] if i < len(first) else list(others)
            for off in range(0, len(chunk), SECTOR):
                sector = chunk[off : off + SECTOR]
                if not any(p[off : off + SECTOR] == sector for p in pieces if off < len(p)) \
                        and not (self.loose and self._unspecified(base + off)):
                    yield base + off


def unknown_ranges(known: bytes | bytearray) -> tuple[tuple[int, int], ...]:
    """The ranges where a model's ``known`` mask is 0, widened to whole sectors (the crash
    rule judges sectors, and a sector partly unspecified may read anything)."""
    out: list[tuple[int, int]] = []
    # find() runs at memchr speed; the masks are mostly ones with a few runs of zeroes.  A
    # run is widened to its sectors' ends, so the search goes on from there: the rest of
    # that sector is covered whatever it holds (a mask of short runs costs two finds a
    # sector, not two a run).
    pos = known.find(0)
    while pos >= 0:
        stop = known.find(1, pos)
        stop = len(known) if stop < 0 else stop
        start = pos - pos % SECTOR
        end = -(-stop // SECTOR) * SECTOR
        if out and out[-1][0] + out[-1][1] >= start:
            start = out.pop()[0]
        out.append((start, end - start))
        pos = known.find(0, end)
    return tuple(out)


# -- judging one cut state --------------------------------------------------------------------

#: Judges one cut state (the image file's bytes): ``(corruptions, leaks, messages)``.
CutJudge = Callable[[bytes | bytearray], tuple[int, int, list[str]]]

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


JudgeResult = tuple[int, int, list[str]]


class _JudgeFile:
    """A temporary file qemu-img checks a cut state in, reused from one state to the next.

    A new file in /dev/shm costs its pages (allocated on the first write, freed by the
    unlink): several milliseconds for an image of tens of MiB, more than the copy itself.
    Where ``/proc`` lets a process reopen its own descriptors, the file is unlinked at once
    and qemu-img opens it as ``/proc/<pid>/fd/<n>``: nothing is left behind, however the
    process ends."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(suffix=".qcow2", dir=_TMP)
        self.fd = fd
        self._name: str | None = name
        self._data_fd: int | None = None
        proc = f"/proc/{os.getpid()}/fd"
        if os.path.isdir(proc):
            os.unlink(name)
            self._name = None
            self.path = f"{proc}/{fd}"
        else:
            self.path = name

    def _data(self) -> int:
        """The data file's descriptor (made on first use)."""
        if self._data_fd is None:
            if self._name is None:
                fd, name = tempfile.mkstemp(suffix=".data", dir=_TMP)
                os.unlink(name)
                self._data_fd = fd
            else:
                self._data_fd = os.open(self._name + ".data", os.O_RDWR | os.O_CREAT, 0o600)
        return self._data_fd

    @property
    def data_path(self) -> str:
        """Where the image's external data file is (see :meth:`fill`)."""
        fd = self._data()
        return self._name + ".data" if self._name is not None else f"/proc/{os.getpid()}/fd/{fd}"

    def fill(self, image: bytes | bytearray, data: bytes | bytearray | None = None) -> None:
        """Make the file hold ``image`` (and its data file ``data``), overwriting in place."""
        _overwrite(self.fd, image)
        if data is not None:
            _overwrite(self._data(), data)

    def close(self) -> None:
        for fd in (self.fd, self._data_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._name is not None:
            for name in (self._name, self._name + ".data"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)


def _overwrite(fd: int, data: bytes | bytearray) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
    os.ftruncate(fd, len(data))


class _JudgeFiles:
    """The process's idle judge files (a qemu-img run holds one until its verdict)."""

    def __init__(self) -> None:
        self._idle: list[_JudgeFile] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        atexit.register(self.close)

    def take(self) -> _JudgeFile:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's files are not its own
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        return _JudgeFile()

    def give_back(self, file: _JudgeFile) -> None:
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < 8:
                self._idle.append(file)
                return
        file.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for file in idle:
            file.close()


_JUDGE_FILES = _JudgeFiles()


class _QemuJudge:
    """``qemu-img check`` as a :data:`CutJudge`; :meth:`start` runs it in the background."""

    def __init__(self, qemu_img: str, repair: bool,
                 data_file: Callable[[], bytes | bytearray | None] | None) -> None:
        self.qemu_img = qemu_img
        self.repair = repair
        self.data_file = data_file

    def __call__(self, image: bytes | bytearray) -> JudgeResult:
        return self.start(image)()

    def start(self, image: bytes | bytearray) -> Callable[[], JudgeResult]:
        """Write a copy of ``image`` (and of the data file as ``data_file`` gives it now)
        and start qemu-img on it; the returned function waits for the verdict.  (``image``
        may change once this returns: qemu-img has its copy.)"""
        file = _JUDGE_FILES.take()
        try:
            data = None if self.data_file is None else bytes(self.data_file() or b"")
            file.fill(image, data)
        except BaseException:
            file.close()
            raise
        # The backing is not needed to check one file's metadata: json: with backing null.
        spec = json.dumps({"driver": "qcow2", "backing": None,
                           "file": {"driver": "file", "filename": file.path},
                           **({} if data is None else {"data-file": {
                               "driver": "file", "filename": file.data_path}})})
        argv = [self.qemu_img, "check", *(("-r", "all") if self.repair else ()),
                "--output=json", f"json:{spec}"]
        # qemu-img starts (its exec is milliseconds of waiting) and runs on a thread of its
        # own: the caller goes on checking cut states meanwhile.
        verdict = _judge_threads().submit(_run_check, argv, file)
        return verdict.result


def _run_check(argv: list[str], file: _JudgeFile) -> JudgeResult:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except BaseException:
        file.close()
        raise
    _JUDGE_FILES.give_back(file)
    return _qemu_verdict(proc.returncode, proc.stdout, proc.stderr)


_JUDGE_THREADS: dict[int, ThreadPoolExecutor] = {}


def _judge_threads() -> ThreadPoolExecutor:
    """The threads qemu-img runs are waited on from (a forked child makes its own: it
    has none of its parent's threads)."""
    pid = os.getpid()
    pool = _JUDGE_THREADS.get(pid)
    if pool is None:
        pool = _JUDGE_THREADS[pid] = ThreadPoolExecutor(4, thread_name_prefix="qemu-img check")
    return pool


def _qemu_verdict(returncode: int, stdout: str, stderr: str) -> JudgeResult:
    try:
        out = json.loads(stdout)
    except json.JSONDecodeError:
        return 1, 0, [f"qemu-img check failed (exit {returncode}): {stderr.strip()[:300]}"]
    corrupt = int(out.get("corruptions", 0)) + int(out.get("check-errors", 0))
    corrupt -= benign_copied(stderr.splitlines())
    msgs = [stderr.strip()[:600]] if corrupt else []
    return corrupt, int(out.get("leaks", 0)), msgs


def qemu_judge(qemu_img: str, *, repair: bool = False,
               data_file: Callable[[], bytes | bytearray | None] | None = None) -> CutJudge:
    """``qemu-img check --output=json`` on a copy of the bytes (in /dev/shm when there).

    ``repair``: ``check -r all``, counting what is left after the repair (an image with lazy
    refcounts promises only that: qcow2.features.lazy-refcounts).  ``data_file``: gives
    the bytes of the image's external data file in the cut state being judged.  The judge
    can also be started in the background (:func:`start_judge`)."""
    return _QemuJudge(qemu_img, repair, data_file)


def start_judge(judge: CutJudge, image: bytes | bytearray) -> Callable[[], JudgeResult]:
    """Start judging ``image``; the returned function gives the verdict.  A qemu-img judge
    runs meanwhile (its wall time overlaps the caller's own checks); any other judges now.
    ``image`` may change once this returns."""
    start = getattr(judge, "start", None)
    if start is not None:
        return start(image)  # type: ignore[no-any-return]
    result = judge(image)
    return lambda: result


def reference_judge() -> CutJudge | None:
    """``pyimago.reference.check`` as the judge, where it exists (None until then)."""
    import pyimago.reference as reference

    check = getattr(reference, "check", None)
    if check is None:
        return None

    def judge(image: bytes | bytearray) -> tuple[int, int, list[str]]:
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


class _CutStorage(MemoryStorage):
    """A cut state as a storage, over the caller's buffer (no copy of the image per cut).

    A read-only open must write nothing; should it write anyway, the first mutation keeps
    the bytes as they were (``original``), so the caller can tell whether any changed and
    its buffer is put back (:meth:`restore`)."""

    def __init__(self, image: bytearray) -> None:
        super().__init__(name="cut")
        self._data = image  # the buffer itself: it is only ever read unless a bug writes
        self.original: bytes | None = None

    def _keep(self) -> None:
        if self.original is None:
            self.original = bytes(self._data)

    def write(self, data: Buffer, offset: int) -> None:
        self._keep()
        super().write(data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._keep()
        super().write_zeroes(offset, length)

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        self._keep()
        super().resize(new_size, prealloc)

    def changed(self) -> bool:
        return self.original is not None and self.original != self._data

    def restore(self) -> None:
        if self.original is not None:
            self._data[:] = self.original


def check_cut(
    cut: int,
    image: bytes | bytearray,
    timeline: CrashTimeline,
    open_cut: Callable[[MemoryStorage], Any],
    judge: CutJudge | None = None,
    scratch: bytearray | None = None,
) -> CutVerdict:
    """Check the image a cut after mutation ``cut`` leaves (``image``: the top layer's bytes;
    a ``bytearray`` is used in place and left as it was).

    ``crash.power-cut``: ``judge`` (when given) finds no corruption (leaks are counted); the
    image opens read-only (``open_cut(storage)`` returns an open FormatAccess) with no error
    that is not a pyimago error; the open changes no byte (``crash.readonly-open``); every
    sector reads what :meth:`CrashTimeline.violations` allows.  ``scratch``: a buffer the
    content is read into (kept by a caller that checks many states, resized as needed).
    """
    verdict = CutVerdict(cut)
    if judge is not None:
        # (A qemu-img judge runs while the image is opened and read below.)
        finish = start_judge(judge, image)
        verdict = _check_content(cut, image, timeline, open_cut, scratch)
        corrupt, leaks, msgs = finish()
        verdict.judged = True
        verdict.corruptions, verdict.leaks = corrupt, leaks
        if corrupt:
            verdict.problems[:0] = [f"cut after mutation {cut}: check finds {corrupt} "
                                    "corruption(s)", *msgs]
        return verdict
    return _check_content(cut, image, timeline, open_cut, scratch)


def _check_content(cut: int, image: bytes | bytearray, timeline: CrashTimeline,
                   open_cut: Callable[[MemoryStorage], Any],
                   scratch: bytearray | None = None) -> CutVerdict:
    """check_cut's part without a judge: open, read, the read-only open, the content."""
    verdict = CutVerdict(cut)
    copy = _CutStorage(image if isinstance(image, bytearray) else bytearray(image))
    try:
        try:
            with open_cut(copy) as img:
                size = img.size
                if scratch is None:
                    content: bytes | bytearray = bytes(img.read(0, size))
                else:
                    # (No new buffer, and no copy of it into bytes, per state.)
                    if len(scratch) > size:
                        del scratch[size:]
                    else:
                        scratch.extend(bytes(size - len(scratch)))
                    img.readinto(scratch, 0)
                    content = scratch
        except PyimagoError as exc:
            verdict.open_error = True
            verdict.problems.append(f"cut after mutation {cut}: does not open: {exc}")
            return verdict
        except Exception as exc:
            verdict.open_error = True
            verdict.problems.append(f"cut after mutation {cut}: opening raises "
                                    f"{type(exc).__name__}: {exc}")
            return verdict
        if copy.changed():
            verdict.readonly_write = True
            verdict.problems.append(
                f"cut after mutation {cut}: a read-only open changed the image")
    finally:
        copy.restore()
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
