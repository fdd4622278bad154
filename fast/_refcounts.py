"""Refcounts and cluster allocation for the qcow2 layer of pyimago.fast.

The refcount table is kept whole (QEMU bounds it to 8 MiB); refcount blocks are decoded
into arrays (one element per cluster) in a bounded :class:`TableCache`.  Allocation is
first-fit from a hint and prefers contiguous runs, so sequential writes land in sequential
host clusters.  A new refcount block is placed in the first free cluster; when that cluster
lies in the range the block describes, the block counts itself.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Set
from typing import Any

from pyimago.reference._errors import CorruptImageError, UnsupportedError
from pyimago.reference._storage import Storage

from ._cache import TableCache
from ._codec import (
    decode_refblock,
    decode_u64_table,
    encode_refblock,
    encode_u64_table,
    refblock_typecode,
)
from ._entries import REFT_OFFSET_MASK
from ._header import MAX_REFTABLE_BYTES, Span

__all__ = ["REFTABLE_OFFSET_MASK", "Refcounts"]

REFTABLE_OFFSET_MASK = REFT_OFFSET_MASK


class Refcounts:
    """One image's refcounts: lookup, allocation, freeing and ordered write-back."""

    def __init__(
        self,
        storage: Storage,
        read_meta: Callable[[int, int], bytes],
        *,
        cluster_bits: int,
        order: int,
        table: Span,
        cache_bytes: int,
        moved: Callable[[Span], None],
        vet_block: Callable[[int], None],
        vet_alloc: Callable[[int, int], None] | None = None,
        placed_block: Callable[[int], None] | None = None,
    ) -> None:
        self._storage = storage
        self._read = read_meta
        self._cbits = cluster_bits
        self._cs = 1 << cluster_bits
        self._width = 1 << order
        self._ceiling = (1 << self._width) - 1
        per = self._cs * 8 // self._width
        self._per_block = per
        self._shift = per.bit_length() - 1
        self._code = refblock_typecode(self._width)
        self._one = array(self._code, [1])
        self._moved = moved
        self._vet_block = vet_block
        self._vet_alloc = vet_alloc
        self._placed_block = placed_block
        block_bytes = per * array(self._code).itemsize
        self.blocks = TableCache(max(2, cache_bytes // block_bytes), self._store_block)
        self.span = table
        # (``table`` and ``_offsets`` are read on first use: see __getattr__.)
        self._table_dirty = False
        #: First cluster that may be free (nothing below it is).  It starts at 0, as QEMU's
        #: allocator does: a header whose refcount says free is caught by the overlap check.
        self._hint = 0
        #: End (bytes) of the highest cluster handed out since opening.
        self.end = 0
        #: Bumped whenever a block is added or the table moves (metadata placement changed).
        self.generation = 0

    #: The refcount table (native entries) and the refcount blocks it points at.
    table: array[int]
    _offsets: set[int]
    #: A refcount block of zeroes.
    _blank: array[int]

    def __getattr__(self, name: str) -> Any:
        # Only reached while these are not made yet: a read-only open never counts
        # anything, and a table or block of 2 MiB clusters holds up to 2 Mi entries.
        if name in ("table", "_offsets"):
            self._load_table()
        elif name == "_blank":
            self._blank = array(self._code, bytes(self._per_block * array(self._code).itemsize))
        else:
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    def _load_table(self) -> None:
        self.table = decode_u64_table(self._read(self.span.at, self.span.n * self._cs))
        self._offsets = _block_offsets(self.table)

    def reload(self) -> None:
        """Forget everything cached and read the table again (it may have changed)."""
        self.blocks.clear()
        self._load_table()
        self._table_dirty = False
        self._hint = 0
        self.generation += 1

    # -- blocks ---------------------------------------------------------------------------

    def _store_block(self, ofs: int, blk: array[int]) -> None:
        self._storage.write(encode_refblock(blk, self._width), ofs)

    def block_offsets(self) -> Set[int]:
        """Host offsets of every refcount block (kept as blocks are added: O(1); the
        caller must not change the set)."""
        return self._offsets

    def _block(self, i: int) -> array[int] | None:
        """Refcount block ``i`` (None where the table has no block)."""
        if i >= len(self.table):
            return None
        ofs = self.table[i] & REFTABLE_OFFSET_MASK
        if not ofs:
            return None
        blk = self.blocks.get(ofs)
        if blk is None:
            self._vet_block(ofs)
            blk = decode_refblock(self._read(ofs, self._cs), self._width)
            self.blocks.add(ofs, blk)
        return blk

    def _mark(self, i: int) -> None:
        self.blocks.dirty.add(self.table[i] & REFTABLE_OFFSET_MASK)

    def count(self, cluster: int) -> int:
        """The refcount of host cluster number ``cluster``."""
        blk = self._block(cluster >> self._shift)
        return 0 if blk is None else blk[cluster & (self._per_block - 1)]

    def free(self, first: int, n: int = 1) -> None:
        """Drop one reference to each of ``n`` clusters from ``first``."""
        for cluster in range(first, first + n):
            blk = self._block(cluster >> self._shift)
            idx = cluster & (self._per_block - 1)
            if blk is None or blk[idx] == 0:
                raise CorruptImageError(
                    f"qcow2: host cluster 0x{cluster << self._cbits:x} is freed more often "
                    "than it is referenced"
                )
            blk[idx] -= 1
            self._mark(cluster >> self._shift)
            if blk[idx] == 0 and cluster < self._hint:
                self._hint = cluster

    # -- allocation -----------------------------------------------------------------------

    def _first_free(self, start: int) -> int:
        i = start >> self._shift
        while True:
            blk = self._block(i)
            base = i << self._shift
            if blk is None:
                return max(start, base)
            try:
                return base + blk.index(0, max(0, start - base))
            except ValueError:
                i += 1

    def _free_from(self, c: int, limit: int) -> int:
        """How many clusters from ``c`` on are free, up to ``limit``."""
        n = 0
        mask = self._per_block - 1
        while n < limit:
            here = c + n
            lo = here & mask
            hi = min(self._per_block, lo + limit - n)
            blk = self._block(here >> self._shift)
            if blk is not None:
                part = blk[lo:hi]
                if part != self._blank[: hi - lo]:
                    return n + next(j for j, v in enumerate(part) if v)
            n += hi - lo
        return n

    def allocate(self, want: int, *, exact: bool = False) -> tuple[int, int]:
        """Claim up to ``want`` contiguous free clusters (all of them with ``exact``), each
        with refcount 1: returns (first cluster, how many)."""
        start = self._hint
        while True:
            lowest = self._first_free(self._hint)
            c = lowest if start == self._hint else self._first_free(start)
            got = self._free_from(c, want)
            if exact and got < want:
                start = c + got + 1
                continue
            blockless = next(
                (
                    i
                    for i in range(c >> self._shift, ((c + got - 1) >> self._shift) + 1)
                    if self._block(i) is None
                ),
                -1,
            )
            if blockless >= 0:
                # The new block may take the very cluster we looked at: look again.
                self._add_block(blockless)
                continue
            self._claim(c, got)
            if c == lowest:
                self._hint = c + got
            self.end = max(self.end, (c + got) << self._cbits)
            return c, got

    def _claim(self, c: int, n: int) -> None:
        if self._vet_alloc is not None:
            # qcow2.corrupt.overlap-check: a free refcount may lie about metadata.
            self._vet_alloc(c, n)
        mask = self._per_block - 1
        while n:
            blk = self._block(c >> self._shift)
            assert blk is not None
            lo = c & mask
            take = min(n, self._per_block - lo)
            blk[lo : lo + take] = self._one * take
            self._mark(c >> self._shift)
            c += take
            n -= take

    def _add_block(self, i: int) -> None:
        """Create refcount block ``i`` (growing the table if it is too short)."""
        if i >= len(self.table):
            self._grow_table(i + 1)
            if self.table[i] & REFTABLE_OFFSET_MASK:
                return
        home = self._first_free(self._hint)
        if self._vet_alloc is not None:
            self._vet_alloc(home, 1)
        blk = array(self._code, self._blank)
        mask = self._per_block - 1
        if home >> self._shift == i:
            blk[home & mask] = 1
        else:
            counter = self._block(home >> self._shift)
            if counter is None:
                # The block's own cluster is not covered either: create that block first
                # (the caller asks again).
                self._add_block(home >> self._shift)
                return
            counter[home & mask] = 1
            self._mark(home >> self._shift)
        ofs = home << self._cbits
        self.table[i] = ofs
        self._offsets.add(ofs)
        self._table_dirty = True
        self.blocks.add(ofs, blk, dirty=True)
        if self._placed_block is not None:
            self._placed_block(home)
        self.end = max(self.end, ofs + self._cs)
        self.generation += 1

    def _grow_table(self, entries: int) -> None:
        per_cluster = self._cs // 8
        old = self.span
        clusters = max(-(-(entries + 4) // per_cluster), old.n + (old.n + 1) // 2)
        if clusters * self._cs > MAX_REFTABLE_BYTES:
            raise UnsupportedError("qcow2: the refcount table would outgrow QEMU's 8 MiB limit")
        grown = clusters * per_cluster - len(self.table)
        self.table.extend(array(self.table.typecode, bytes(8 * grown)))
        first, _ = self.allocate(clusters, exact=True)
        self.blocks.write_back()
        self._storage.write(encode_u64_table(self.table), first << self._cbits)
        self.span = Span(first << self._cbits, clusters)
        self._moved(self.span)
        self._table_dirty = False
        self.generation += 1
        self.free(old.at >> self._cbits, old.n)

    # -- write-back -----------------------------------------------------------------------

    def write_back(self) -> None:
        """Blocks first, then the table that points at new ones."""
        self.blocks.write_back()
        if self._table_dirty:
            self._storage.write(encode_u64_table(self.table), self.span.at)
            self._table_dirty = False

    # -- references added to clusters in use (compressed packing, snapshots) -------------

    @property
    def ceiling(self) -> int:
        """The largest refcount an entry can hold (2^refcount_bits - 1)."""
        return self._ceiling

    def incref(self, first: int, n: int = 1) -> None:
        """Add one reference to each of ``n`` clusters in use from ``first``."""
        for cluster in range(first, first + n):
            blk = self._block(cluster >> self._shift)
            idx = cluster & (self._per_block - 1)
            if blk is None or blk[idx] == 0:
                raise CorruptImageError(
                    f"qcow2: host cluster 0x{cluster << self._cbits:x} gains a reference but "
                    "its refcount says it is free"
                )
            if blk[idx] >= self._ceiling:
                raise UnsupportedError(
                    f"qcow2: host cluster 0x{cluster << self._cbits:x} already has the largest "
                    f"refcount {self._ceiling} refcount_bits allow"
                )
            blk[idx] += 1
            self._mark(cluster >> self._shift)


def _block_offsets(table: array[int]) -> set[int]:
    """The refcount-block offsets a refcount table points at."""
    # A refcount table is mostly zero past its last block (one 2 MiB cluster holds 262,144
    # entries): find the used prefix in C before walking entries in Python, so an open costs
    # what the image uses, not what its table could hold.
    used = len(table)
    while used >= _ZERO_SCAN and table[used - _ZERO_SCAN:used] == _ZERO_ENTRIES:
        used -= _ZERO_SCAN
    return {e & REFTABLE_OFFSET_MASK for e in table[:used]} - {0}


#: Entries tested per step when looking for the end of a refcount table's used prefix.
_ZERO_SCAN = 4096
_ZERO_ENTRIES = decode_u64_table(bytes(8 * _ZERO_SCAN))
