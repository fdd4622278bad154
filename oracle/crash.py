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

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pyimago.reference import InvalidRequestError, PreallocateMode
from pyimago.reference._storage import Buffer, Storage, WritableBuffer

__all__ = ["Mutation", "RecordingStorage", "apply_mutation"]

MutationKind = Literal["write", "write_zeroes", "discard", "resize"]


@dataclass(frozen=True, slots=True)
class Mutation:
    """One storage-level change: ``write`` carries ``data``; ``write_zeroes`` and ``discard``
    cover ``[offset, offset + length)``; ``resize`` sets the size to ``offset``."""

    kind: MutationKind
    offset: int
    length: int
    data: bytes | None = None

    def describe(self) -> str:
        if self.kind == "resize":
            return f"resize to {self.offset}"
        return f"{self.kind} [0x{self.offset:x}, 0x{self.offset + self.length:x})"


def apply_mutation(buf: bytearray, m: Mutation) -> None:
    """Apply ``m`` to ``buf`` as a storage would (writes past the end extend it; a discard
    reads back as zeroes, as a punched hole does)."""
    if m.kind == "resize":
        if m.offset < len(buf):
            del buf[m.offset :]
        else:
            buf.extend(bytes(m.offset - len(buf)))
        return
    end = m.offset + m.length
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    if m.kind == "write":
        assert m.data is not None
        buf[m.offset : end] = m.data
    else:
        buf[m.offset : end] = bytes(m.length)


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
        self.log.append(Mutation("discard", offset, length))

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

    def sample_cuts(self, since: int, limit: int, rng: random.Random) -> list[int]:
        """Up to ``limit`` cut points in ``[since, mutations]``: all of them when they fit,
        else the first and last and a random sample between."""
        points = list(range(max(since, self._base_index), self.mutations + 1))
        if len(points) <= limit:
            return points
        inner = rng.sample(points[1:-1], max(0, limit - 2))
        return sorted({points[0], points[-1], *inner})

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
    content: bytes
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
        loose = [r for p in window[1:] for r in p.unspecified]
        problems: list[str] = []
        for at in range(0, size, SECTOR):
            actual = content[at : at + SECTOR]
            if any(p.content[at : at + SECTOR] == actual for p in window if at < p.size):
                continue
            if any(a <= at and at + SECTOR <= a + n for a, n in loose):
                continue
            durable = window[0]
            problems.append(
                f"cut after mutation {cut}: sector at guest 0x{at:x} reads "
                f"{actual[:8].hex()}.. which no operation from {durable.label!r} (durable) to "
                f"{window[-1].label!r} put there"
            )
            if len(problems) >= limit:
                break
        return problems
