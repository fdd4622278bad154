"""Power cuts over several storages at once: one log, in the order the writes were issued.

A power cut stops every file at the same instant.  An image with an external data file, or a
tool that writes two images (``commit`` writes the backing file, then empties the overlay),
changes several storages; a cut after the ``k``-th mutation of *all* of them leaves each
storage with its own mutations up to that one.  :class:`Journal` keeps that one log;
:meth:`Journal.storage` wraps a storage so that its mutations and syncs go into it (the
same name wrapped again, as a file reopened, continues its log).  The crash model is
:mod:`pyimago.oracle.crash`'s: each mutation is atomic and mutations reach the medium in
the order they were issued.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pyimago.reference import InvalidRequestError
from pyimago.reference._storage import Storage

from .crash import Mutation, RecordingStorage, apply_mutation

__all__ = ["DataFileMutation", "Journal", "JournaledStorage", "PairedRecording"]


class Journal:
    """The mutations and syncs of several named storages, in one order.

    ``watch(name, base)`` (or the first :meth:`storage` of a name) fixes what the storage
    held before mutation 1; mutation ``k`` (counting from 1) is the k-th change to any of
    them since.
    """

    def __init__(self) -> None:
        self._bases: dict[str, bytes] = {}
        self.log: list[tuple[str, Mutation]] = []
        #: Per name: how many mutations of the journal a completed sync of it covered.
        self.synced: dict[str, int] = {}
        #: Every completed sync: (mutations of the journal before it, name).
        self.sync_log: list[tuple[int, str]] = []

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._bases)

    @property
    def mutations(self) -> int:
        return len(self.log)

    def watch(self, name: str, base: bytes) -> None:
        """Record storage ``name``, which holds ``base`` now (before any later mutation)."""
        if name in self._bases:
            raise InvalidRequestError(f"journal: {name!r} is recorded already")
        self._bases[name] = bytes(base)

    def storage(self, name: str, inner: Storage) -> JournaledStorage:
        """``inner`` with its mutations logged here as storage ``name``."""
        if name not in self._bases:
            self.watch(name, inner.read(0, inner.size()))
        return JournaledStorage(inner, self, name)

    def note(self, name: str, mutation: Mutation) -> None:
        self.log.append((name, mutation))

    def note_sync(self, name: str) -> None:
        self.synced[name] = self.mutations
        self.sync_log.append((self.mutations, name))

    def unsynced(self) -> dict[str, int]:
        """Each storage whose last mutation no completed sync of it covers: that mutation's
        number (a tool that returns leaves nothing of its work unsynced)."""
        last: dict[str, int] = {}
        for k, (name, _) in enumerate(self.log, start=1):
            last[name] = k
        return {n: k for n, k in last.items() if self.synced.get(n, 0) < k}

    def describe(self, k: int) -> str:
        """What mutation ``k`` was (``base`` for 0)."""
        if k == 0:
            return "base"
        name, m = self.log[k - 1]
        return f"{name}: {m.describe()}"

    def state_after(self, k: int) -> dict[str, bytes]:
        """What each storage holds after a cut right after mutation ``k``."""
        for at, state in self.cut_states([k]):
            assert at == k
            return {n: bytes(b) for n, b in state.items()}
        raise AssertionError("unreachable")

    def cut_states(self, cuts: Iterable[int] | None = None, *, since: int = 0
                   ) -> Iterator[tuple[int, dict[str, bytearray]]]:
        """``(k, {name: bytes})`` for each cut point ``k`` (ascending; default: every
        mutation from ``since`` on), built incrementally: the buffers are reused, copy
        them to keep them."""
        wanted = sorted(set(range(since, self.mutations + 1) if cuts is None else cuts))
        if wanted and not 0 <= wanted[0] <= wanted[-1] <= self.mutations:
            raise InvalidRequestError(f"journal: cut points {wanted[0]}..{wanted[-1]} outside "
                                      f"0..{self.mutations}")
        state = {n: bytearray(b) for n, b in self._bases.items()}
        at = 0
        for k in wanted:
            for name, m in self.log[at:k]:
                apply_mutation(state[name], m)
            at = k
            yield k, state


    def lagging_states(self, cuts: Iterable[int],
                       groups: Iterable[Iterable[str]] | None = None
                       ) -> Iterator[tuple[int, str, dict[str, bytearray]]]:
        """Across files, only a sync orders writes: at a cut after mutation ``k``, one file
        may have lost every mutation since its last completed sync while another kept later
        ones.  ``(k, names, state)`` for each cut ``k`` and each group of files (default:
        each file alone; an image and its external data file lag together, as one
        image) whose unsynced mutations some other file's later mutation follows: the
        state with those lost.  (Buffers are fresh each time.)"""
        units = [tuple(g) for g in groups] if groups is not None else [
            (n,) for n in self._bases]
        for k in sorted(set(cuts)):
            for unit in units:
                # A sync completed right after mutation k may not have completed at the cut.
                durable = {name: max((at for at, n in self.sync_log if n == name and at < k),
                                     default=0) for name in unit}
                lost = [i for i in range(k) if self.log[i][0] in unit
                        and i >= durable[self.log[i][0]]]
                if not lost or all(n in unit for n, _ in self.log[lost[0] : k]):
                    continue  # nothing lost, or the same as an earlier cut in order
                state = {n: bytearray(b) for n, b in self._bases.items()}
                dropped = set(lost)
                for i, (n, m) in enumerate(self.log[:k]):
                    if i not in dropped:
                        apply_mutation(state[n], m)
                yield k, "+".join(unit), state


class JournaledStorage(RecordingStorage):
    """A storage whose mutations and syncs go into a :class:`Journal` (the Storage protocol,
    forwarded to ``inner``; any other attribute is ``inner``'s)."""

    def __init__(self, inner: Storage, journal: Journal, name: str) -> None:
        super().__init__(inner, name=getattr(inner, "name", name))
        self.journal = journal
        self.key = name

    def __getattr__(self, attr: str) -> Any:
        # Only for attributes the recorder does not have (locked, ...): the inner storage's.
        return getattr(self.__dict__["inner"], attr)

    def _record(self, m: Mutation) -> None:
        self.journal.note(self.key, m)

    def sync(self) -> None:
        super().sync()
        self.journal.note_sync(self.key)


# -- an image and its external data file, recorded as one ------------------------------------------


@dataclass(frozen=True, slots=True)
class DataFileMutation(Mutation):
    """A mutation of the data file, in the log of the image it belongs to."""

    def describe(self) -> str:
        return f"data file: {Mutation.describe(self)}"


class PairedRecording(RecordingStorage):
    """The qcow2 file of an image with an external data file, recorded together with the
    data file in one order (a cut stops both at the same instant).

    It is a :class:`RecordingStorage` of the qcow2 file whose mutation numbers count the
    data file's mutations too: everything that judges one recorded storage (the power-cut
    timeline, the sampled cuts, checkpoints) works unchanged.  :meth:`attach_data_file`
    gives the storage to open the image with as its ``data_file``; while
    :meth:`cut_states` (or :meth:`state_after`) runs, :attr:`data_state` holds the data
    file's bytes of the cut state last given out.
    """

    def __init__(self, inner: Storage, *, name: str | None = None) -> None:
        super().__init__(inner, name=name)
        self._data_base = bytearray()
        self._data: _DataFileRecorder | None = None
        #: The data file's bytes in the cut state last given out (None before any).
        self.data_state: bytearray | None = None

    def attach_data_file(self, data: Storage) -> RecordingStorage:
        """The recorded data file over ``data`` (the first time, its bytes become the data
        file's base; a reopened data file continues the log)."""
        if self._data is None:
            if self.log or self._base_index:
                raise InvalidRequestError("attach the data file before the first mutation")
            self._data_base = bytearray(data.read(0, data.size()))
            self._data = _DataFileRecorder(data, self)
        else:
            self._data.inner = data
        return self._data

    def close(self) -> None:
        # The image closes the storage it was opened on, not a data file it was given: the
        # pair closes together (its file locks go with it).
        try:
            super().close()
        finally:
            if self._data is not None:
                self._data.inner.close()

    def state_after(self, k: int) -> bytearray:
        for _, state in self.cut_states([k]):
            return bytearray(state)
        raise AssertionError("unreachable")

    def cut_states(self, cuts: Iterable[int] | None = None, *, since: int | None = None
                   ) -> Iterator[tuple[int, bytearray]]:
        wanted = self._wanted_cuts(cuts, since)
        if not wanted:
            return
        buf, data = bytearray(self._base), bytearray(self._data_base)
        self.data_state = data
        at = self._base_index
        for k in wanted:
            for m in self.log[at - self._base_index : k - self._base_index]:
                if isinstance(m, DataFileMutation):
                    apply_mutation(data, m)
                else:
                    apply_mutation(buf, m)
            at = k
            yield k, buf

    def reordered_state(self, since: int, keep: Iterable[int]) -> bytearray:
        raise InvalidRequestError("the reorder model is not kept for an image with a data file")

    def checkpoint(self, current: bytearray | None = None) -> None:
        # (``current`` holds the qcow2 file only: both files are replayed.)
        for m in self.log:
            if isinstance(m, DataFileMutation):
                apply_mutation(self._data_base, m)
            else:
                apply_mutation(self._base, m)
        self._base_index += len(self.log)
        self.log.clear()


class _DataFileRecorder(RecordingStorage):
    """The data file of a :class:`PairedRecording`: each mutation goes into the image's
    log, tagged as the data file's."""

    def __init__(self, inner: Storage, image: PairedRecording) -> None:
        # (No base read here: the image keeps the data file's base.)
        self.inner = inner
        self._name = inner.name
        self._base = bytearray()
        self._base_index = 0
        self.log: list[Mutation] = []
        self.syncs: list[int] = []
        self.synced = 0
        self._image = image

    def _record(self, m: Mutation) -> None:
        self._image.log.append(DataFileMutation(m.kind, m.offset, m.length, m.data))
