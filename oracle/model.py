"""The flat model: what a guest must see, and what the top layer of a chain may map.

The model knows nothing about formats beyond three facts per layer (:class:`LayerTraits`):
its allocation granularity, whether it can record explicit zeroes, and whether it can leave
ranges unallocated.  It holds

* the expected bytes of the disk and a ``known`` mask: bytes the contract leaves open (after
  ``discard_to_any``, a grow with ``PreallocateMode.NONE``) are unknown and never compared;
* the expected size;
* for each allocation unit ("cluster") of the top layer, the set of :class:`Alloc` states the
  contract permits there, so that ``get_shallow_mapping`` can be checked and not just content.

Where the contract leaves an implementation a choice, the permitted set holds every choice
that is consistent with the operation's promise (for example ``write_zeroes`` never frees, so
a data cluster cannot become unallocated); the content check catches a choice that would read
back wrong, so the allocation sets only need to encode what content cannot show.

The layers below the top are frozen once an overlay is created on them: the model keeps their
guest view as a :class:`BackingView` snapshot.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pyimago.reference import PreallocateMode

__all__ = [
    "ANY_ALLOC",
    "Alloc",
    "BackingView",
    "FlatModel",
    "LayerTraits",
    "SavedSnapshot",
    "first_mismatch",
]

_KNOWN = 1


class Alloc(enum.Enum):
    """What the top layer itself maps an allocation unit to (its shallow mapping)."""

    DATA = "data"
    """The top layer holds the data (a raw or special mapping)."""
    ZERO = "zero"
    """The top layer records explicit zeroes (a qcow2 zero cluster): no backing shows."""
    BACKING = "backing"
    """Unallocated in the top layer: the backing shows through (zeroes without a backing)."""


ANY_ALLOC: frozenset[Alloc] = frozenset(Alloc)
_DATA = frozenset({Alloc.DATA})
_ZERO = frozenset({Alloc.ZERO})
_BACKING = frozenset({Alloc.BACKING})
_NONE: frozenset[Alloc] = frozenset()


@dataclass(frozen=True, slots=True)
class LayerTraits:
    """The three facts about a layer's format the model needs."""

    format: str
    """``"raw"`` or ``"qcow2"``."""
    granularity: int
    """Allocation unit in bytes: the cluster size for qcow2, the sector for raw."""
    zero_flag: bool
    """Whether explicit zero units exist (qcow2 v3)."""
    subclusters: bool = False
    """Units are subclusters (extended L2): preallocation gives them a host cluster but
    leaves them unallocated, as QEMU does (create.qcow2.extended-l2)."""

    @classmethod
    def raw(cls) -> LayerTraits:
        """A raw layer: every byte is data, nothing can be unallocated or explicitly zero."""
        return cls("raw", 512, False)

    @classmethod
    def qcow2(
        cls, cluster_size: int, compat: str = "1.1", *, extended_l2: bool = False
    ) -> LayerTraits:
        """A qcow2 layer; ``compat`` ``"1.1"`` (v3) has zero clusters, ``"0.10"`` (v2) not.

        With ``extended_l2`` the unit is the subcluster (qcow2.extended-l2.subclusters):
        each of a cluster's 32 is allocated, zero or unallocated on its own.
        """
        if cluster_size < 512 or cluster_size & (cluster_size - 1):
            raise ValueError(f"bad qcow2 cluster size {cluster_size}")
        if extended_l2:
            return cls("qcow2", cluster_size // 32, True, subclusters=True)
        return cls("qcow2", cluster_size, compat != "0.10")

    @property
    def deallocates(self) -> bool:
        """Whether units can be unallocated (so a backing can show through)."""
        return self.format != "raw"


@dataclass(frozen=True, slots=True)
class BackingView:
    """The frozen guest view of everything below the top layer."""

    data: bytes
    known: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> tuple[bytes, bytes]:
        """``(data, known)`` for the range; past the backing's end it reads known zeroes."""
        end = offset + length
        inside = max(0, min(end, self.size) - offset)
        pad = length - inside
        data = self.data[offset : offset + inside] + bytes(pad)
        known = self.known[offset : offset + inside] + b"\x01" * pad
        return data, known

    def is_zero(self, offset: int, length: int) -> bool:
        """Whether the range is known to read as zeroes."""
        data, known = self.read(offset, length)
        return data.count(0) == length and known.count(_KNOWN) == length


@dataclass(frozen=True, slots=True)
class SavedSnapshot:
    """What an internal snapshot of the top layer holds: the disk as it was when taken."""

    id: str
    name: str
    size: int
    data: bytes
    known: bytes
    alloc: tuple[frozenset[Alloc], ...]


_EQ_TABLE = bytes([1] + [0] * 255)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _and(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") & int.from_bytes(b, "big")).to_bytes(len(a), "big")


#: Known stretches compared one by one before :func:`first_mismatch` switches to masks.
_STRETCHES = 16


def first_mismatch(actual: bytes, expected: bytes, known: bytes) -> int | None:
    """The first index where ``actual`` differs from ``expected`` on a known byte, or None."""
    if actual == expected:
        return None
    # The stretches between unknown runs, found with find() (memchr speed), each compared at
    # memcmp speed: a mask is mostly ones with a few unit-sized runs of zeroes.
    size = len(known)
    start = 0
    for _ in range(_STRETCHES):
        if not 0 <= start < size:
            return None
        stop = known.find(0, start)
        stop = size if stop < 0 else stop
        if actual[start:stop] != expected[start:stop]:
            return next(i for i in range(start, stop) if actual[i] != expected[i])
        start = known.find(_KNOWN, stop)
    if not 0 <= start < size:
        return None
    # A mask cut into many runs (what discard_to_any leaves where old and new bytes agree
    # here and there): the rest at once, as integers (a 0/1 byte times 255 is its mask).
    diff = int.from_bytes(actual[start:], "little") ^ int.from_bytes(expected[start:], "little")
    diff &= int.from_bytes(known[start:], "little") * 0xFF
    if not diff:
        return None
    return start + ((diff & -diff).bit_length() - 1) // 8


class FlatModel:
    """Expected guest view of one image (its top layer over a frozen :class:`BackingView`).

    The methods mirror ``FormatAccess``'s modifying operations and assume the request is
    valid (in range); :meth:`in_range` says whether the contract lets it through.
    """

    def __init__(
        self,
        size: int,
        traits: LayerTraits,
        backing: BackingView | None = None,
        *,
        prealloc: PreallocateMode | None = None,
    ) -> None:
        """A freshly created image.

        Without ``prealloc`` a qcow2 image is all unallocated (its backing, or zeroes) and a
        raw one all zero data.  With it, the image is what growing an empty image with that
        mode makes (``create_image(preallocation=...)`` does just that).
        """
        if size < 0:
            raise ValueError(f"negative size {size}")
        self.traits = traits
        self.backing = backing
        self.size = size
        self.data = bytearray(size)
        self.known = bytearray(b"\x01" * size)
        self._dirty = (0, size)
        units = self._units_for(size)
        if not traits.deallocates:
            self.alloc: list[frozenset[Alloc]] = [_DATA] * units
        else:
            self.alloc = [_BACKING] * units
            self._show_backing(0, size)
        if prealloc is not None:
            self.resize(0)
            self.resize(size, prealloc)
        self.snapshots: list[SavedSnapshot] = []
        """The top layer's internal snapshots, in table order."""

    # -- geometry -----------------------------------------------------------------------------

    @property
    def granularity(self) -> int:
        return self.traits.granularity

    def _units_for(self, size: int) -> int:
        return -(-size // self.traits.granularity)

    def unit_span(self, unit: int) -> tuple[int, int]:
        """Guest range ``[start, end)`` of an allocation unit (the last one may be short)."""
        g = self.traits.granularity
        return unit * g, min((unit + 1) * g, self.size)

    def _units_touched(self, offset: int, length: int) -> range:
        if length <= 0:
            return range(0)
        g = self.traits.granularity
        return range(offset // g, (offset + length - 1) // g + 1)

    def _is_whole(self, unit: int, offset: int, length: int) -> bool:
        # A unit cut short by the disk end counts as whole when the range reaches the end.
        start, end = self.unit_span(unit)
        return offset <= start and offset + length >= end

    def _cluster_whole(self, unit: int, offset: int, length: int) -> bool:
        """Whether the whole cluster (32 subclusters) holding ``unit`` lies in the range."""
        first = unit - unit % 32
        start = first * self.traits.granularity
        end = min((first + 32) * self.traits.granularity, self.size)
        return offset <= start and offset + length >= end

    def in_range(self, offset: int, length: int) -> bool:
        """Whether a modifying request on ``[offset, offset+length)`` lies inside the disk."""
        return offset >= 0 and length >= 0 and offset + length <= self.size

    # -- queries ------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> tuple[bytes, bytes]:
        """``(expected, known)`` for a guest read; past the end it reads known zeroes."""
        inside = max(0, min(offset + length, self.size) - offset)
        pad = length - inside
        # One copy each (through a view), not a slice copied again.
        data = bytes(memoryview(self.data)[offset : offset + inside])
        known = bytes(memoryview(self.known)[offset : offset + inside])
        if pad:
            data, known = data + bytes(pad), known + b"\x01" * pad
        return data, known

    def allowed(self, unit: int) -> frozenset[Alloc]:
        """The shallow mapping states the contract permits for an allocation unit."""
        return self.alloc[unit]

    def snapshot(self) -> BackingView:
        """The current guest view, frozen, to serve as the backing of a new overlay."""
        return BackingView(bytes(self.data), bytes(self.known))

    def known_count(self) -> int:
        return self.known.count(_KNOWN)

    def take_dirty(self) -> tuple[int, int]:
        """The byte range ``[lo, hi)`` whose content or mask may have changed since the last
        call (``lo >= hi``: none), for whoever keeps copies of the disk up to date (the
        power-cut timeline copies only that, not the whole disk after every operation)."""
        dirty, self._dirty = self._dirty, (self.size, 0)
        return dirty

    def _mark(self, lo: int, hi: int) -> None:
        old_lo, old_hi = self._dirty
        self._dirty = (min(old_lo, lo), max(old_hi, hi))

    # -- helpers ------------------------------------------------------------------------------

    def _set(self, offset: int, data: bytes, known: bytes) -> None:
        end = offset + len(data)
        self.data[offset:end] = data
        self.known[offset:end] = known
        self._mark(offset, end)

    def _set_zero(self, offset: int, length: int) -> None:
        self._set(offset, bytes(length), b"\x01" * length)

    def _set_unknown(self, offset: int, length: int) -> None:
        self._set(offset, bytes(length), bytes(length))

    def _show_backing(self, offset: int, length: int) -> None:
        if self.backing is None:
            self._set_zero(offset, length)
        else:
            self._set(offset, *self.backing.read(offset, length))

    def _backing_zero(self, offset: int, length: int) -> bool:
        return self.backing is None or self.backing.is_zero(offset, length)

    def _either(self, offset: int, data: bytes, known: bytes) -> None:
        """The range holds either its current content or ``data``: keep what both agree on."""
        end = offset + len(data)
        cur = bytes(self.data[offset:end])
        same = _xor(cur, data).translate(_EQ_TABLE)
        agree = _and(_and(same, bytes(self.known[offset:end])), known)
        self.known[offset:end] = agree
        self._mark(offset, end)

    # -- operations ---------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """Guest data written; every unit touched becomes data (partial ones copy-on-write)."""
        self._set(offset, data, b"\x01" * len(data))
        if self.traits.deallocates:
            touched = self._units_touched(offset, len(data))
            self._copied_on_write(touched)
            for unit in touched:
                self.alloc[unit] = _DATA

    def _copied_on_write(self, touched: Sequence[int]) -> None:
        """Data written into ``touched`` units: with subclusters, their clusters' other units
        may become data too.

        qcow2.extended-l2.write: a write into a cluster that needs a new host cluster copies
        from its first allocated subcluster to its last (calculate_l2_meta), so the
        subclusters between, untouched, may become data (holding what they read: the content
        is unchanged)."""
        if not (self.traits.subclusters and touched):
            return
        per = 32
        first = touched[0] - touched[0] % per
        last = min(len(self.alloc), touched[-1] - touched[-1] % per + per)
        for unit in range(first, last):
            self.alloc[unit] = self.alloc[unit] | _DATA

    def _zeroed(self, offset: int, length: int, *, discard: bool) -> None:
        self._set_zero(offset, length)
        if not self.traits.deallocates:
            return
        zero_flag = self.traits.zero_flag
        touched = self._units_touched(offset, length)
        # Partial units at the edges get zero data written (access.write-zeroes.soft), and
        # that write may copy a shared cluster on write before the whole units are zeroed.
        for unit in touched:
            if not self._is_whole(unit, offset, length):
                self._copied_on_write(range(unit, unit + 1))
        for unit in touched:
            prev = self.alloc[unit]
            start, end = self.unit_span(unit)
            lo, hi = max(start, offset), min(end, offset + length)
            # Leaving a unit to its backing is only right when the backing reads zero there;
            # write_zeroes never frees, so only a unit that may already be unallocated may.
            keep_backing = (
                _BACKING if Alloc.BACKING in prev and self._backing_zero(lo, hi - lo) else _NONE
            )
            if not self._is_whole(unit, offset, length):
                # A partial unit: zeroes written into data (copy-on-write), or a zero unit
                # when the rest of it already read zero.
                allowed = _DATA | (_ZERO if zero_flag else _NONE) | keep_backing
            elif discard:
                freed = _BACKING if self._backing_zero(start, end - start) else _NONE
                if zero_flag:
                    allowed = _ZERO | freed
                else:
                    # v2: freeing only reads zero without a (non-zero) backing; else zeroes
                    # are written.
                    allowed = (_DATA if self.backing is not None else _NONE) | freed
            elif zero_flag:
                allowed = _ZERO | keep_backing
            else:
                allowed = _DATA | keep_backing
            self.alloc[unit] = allowed

    def allow_data(self, offset: int, length: int) -> None:
        """The units meeting the range may also map as data (their content is unchanged): a
        peer that writes zeroes where pyimago sets zero bits, as QEMU does when it zeroes part
        of a compressed cluster."""
        if self.traits.deallocates:
            for unit in self._units_touched(offset, length):
                self.alloc[unit] = self.alloc[unit] | _DATA

    def write_zeroes(self, offset: int, length: int) -> None:
        """The range reads zero; nothing is freed (v3 whole units become explicit zeroes)."""
        self._zeroed(offset, length, discard=False)

    def discard_to_zero(self, offset: int, length: int) -> None:
        """The range reads zero; whole units are freed (v3: explicit zero; v2: unallocated)."""
        self._zeroed(offset, length, discard=True)

    def discard_to_any(self, offset: int, length: int) -> None:
        """The range's content becomes unknown; units touched may end up in any state.

        A unit only partly inside the range keeps its content outside it, which the content
        check enforces whatever the unit's state.
        """
        self._set_unknown(offset, length)
        if self.traits.deallocates:
            for unit in self._units_touched(offset, length):
                self.alloc[unit] = ANY_ALLOC

    def discard_to_backing(self, offset: int, length: int) -> None:
        """Whole units in the range become unallocated; partial ones at the edges are kept.

        The unit cut short by the disk end may be treated either way (it is whole in guest
        terms but not in the format's), so there the model accepts both outcomes.  A raw
        layer has no backing, so the range reads as zeroes (clause ``raw.no-backing``).
        """
        if not self.traits.deallocates:
            self._set_zero(offset, length)
            return
        g = self.traits.granularity
        for unit in self._units_touched(offset, length):
            start, end = self.unit_span(unit)
            if not self._is_whole(unit, offset, length):
                continue
            if self.traits.subclusters and not self._cluster_whole(unit, offset, length):
                # A whole subcluster of a partial cluster: QEMU 7.2 (and the reference) leave
                # partial clusters alone, fast frees the subcluster (qcow2.extended-l2.clear).
                self.alloc[unit] = self.alloc[unit] | _BACKING
                self._either(start, *self._backing_read(start, end - start))
            elif end - start == g:
                self.alloc[unit] = _BACKING
                self._show_backing(start, end - start)
            else:
                self.alloc[unit] = self.alloc[unit] | _BACKING
                self._either(start, *self._backing_read(start, end - start))

    def _backing_read(self, offset: int, length: int) -> tuple[bytes, bytes]:
        if self.backing is None:
            return bytes(length), b"\x01" * length
        return self.backing.read(offset, length)

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Shrink (discarding the tail) or grow (the new area as ``prealloc`` says)."""
        if new_size < 0:
            raise ValueError(f"negative size {new_size}")
        old = self.size
        self._mark(min(old, new_size), max(old, new_size))
        if new_size <= old:
            del self.data[new_size:]
            del self.known[new_size:]
            self.size = new_size
            del self.alloc[self._units_for(new_size) :]
            return
        grow = new_size - old
        self.data.extend(bytes(grow))
        if prealloc is PreallocateMode.NONE:
            # access.resize.grow-none: the new area may read anything, the backing included.
            self.known.extend(bytes(grow))
        else:
            self.known.extend(b"\x01" * grow)
        self.size = new_size
        if not self.traits.deallocates:
            self.alloc.extend([_DATA] * (self._units_for(new_size) - len(self.alloc)))
            return
        g = self.traits.granularity
        zero_flag = _ZERO if self.traits.zero_flag else _NONE
        if old % g and self.alloc:
            # The unit the old end cut short now extends into the new area: its stale tail
            # is zeroed in place (or the whole unit made zero).
            last = len(self.alloc) - 1
            if prealloc is PreallocateMode.NONE:
                self.alloc[last] = ANY_ALLOC
            else:
                self.alloc[last] = self.alloc[last] | _DATA | zero_flag
        for unit in range(len(self.alloc), self._units_for(new_size)):
            start, end = self.unit_span(unit)
            freed = _BACKING if self._backing_zero(start, end - start) else _NONE
            if prealloc is PreallocateMode.NONE:
                allowed = ANY_ALLOC
            elif self.traits.subclusters:
                # Host clusters are allocated, the subclusters left unallocated (reading
                # zero) or, by an implementation that does, allocated as the mode says.
                allowed = _DATA | zero_flag | freed
            elif prealloc is PreallocateMode.ZERO:
                # Reads zero, need not allocate: zero units, or unallocated where that reads
                # zero anyway, or (v2 over a backing) zeroes written as data.
                allowed = _DATA | zero_flag | freed
            elif prealloc is PreallocateMode.FORMAT_ALLOCATE:
                # Mapped in this layer: data, or (v3) zero-flagged units keeping a host cluster.
                allowed = _DATA | zero_flag
            else:
                # FULL_ALLOCATE / WRITE_DATA: host storage behind every unit, mapped as data.
                allowed = _DATA
            self.alloc.append(allowed)

    # -- internal snapshots (qcow2.snapshots.*) ----------------------------------------------

    def next_snapshot_id(self) -> str:
        """The ID QEMU gives a new snapshot: one more than the largest numeric ID."""
        ids = [int(s.id) for s in self.snapshots if s.id.isdigit()]
        return str(max(ids, default=0) + 1)

    def find_snapshot(self, name_or_id: str) -> SavedSnapshot | None:
        """The snapshot ``qemu-img snapshot -a/-d`` picks: by ID first, then by name."""
        for snap in self.snapshots:
            if snap.id == name_or_id:
                return snap
        for snap in self.snapshots:
            if snap.name == name_or_id:
                return snap
        return None

    def create_snapshot(self, name: str) -> SavedSnapshot:
        """The disk saved under ``name``; the active disk does not change."""
        snap = SavedSnapshot(self.next_snapshot_id(), name, self.size, bytes(self.data),
                             bytes(self.known), tuple(self.alloc))
        self.snapshots.append(snap)
        return snap

    def apply_snapshot(self, name_or_id: str) -> None:
        """The disk reverts to the snapshot: content, size and what each unit maps to."""
        snap = self.find_snapshot(name_or_id)
        if snap is None:
            raise KeyError(name_or_id)
        self.size = snap.size
        self.data = bytearray(snap.data)
        self.known = bytearray(snap.known)
        self._mark(0, max(self.size, len(self.data)))
        self.alloc = list(snap.alloc)

    def delete_snapshot(self, name_or_id: str) -> None:
        """The snapshot is gone; the active disk does not change."""
        snap = self.find_snapshot(name_or_id)
        if snap is None:
            raise KeyError(name_or_id)
        self.snapshots.remove(snap)
