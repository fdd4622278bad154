"""Refcounts: the two-level refcount structure (qcow2.txt, "Host cluster management").

"qcow2 manages the allocation of host clusters by maintaining a reference count for each host
cluster. A refcount of 0 means that the cluster is free, 1 means that it is used, and >= 2
means that it is used and any write access must perform a COW (copy on write) operation.

The refcounts are managed in a two-level table. The first level is called refcount table and
has a variable size (which is stored in the header). The refcount table can cover multiple
clusters, however it needs to be contiguous in the image file.

It contains pointers to the second level structures which are called refcount blocks and are
exactly one cluster in size."

Refcount blocks are written through: every change reaches storage before the call returns, so
a refcount is always on disk before any L2 entry that relies on it
(qcow2.refcount.order-of-updates).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

from .._errors import CorruptImageError, UnsupportedError
from .._storage import Storage
from .constants import QCOW_MAX_REFTABLE_SIZE, REFT_OFFSET_MASK
from .tables import unpack_table

__all__ = [
    "RefcountTable",
    "get_block_entry",
    "refcount_block_entries",
    "set_block_entry",
]


def refcount_block_entries(cluster_bits: int, refcount_order: int) -> int:
    """Refcounts per block: "refcount_block_entries = (cluster_size * 8 / refcount_bits)"."""
    return ((1 << cluster_bits) * 8) >> refcount_order


def get_block_entry(block: bytes | bytearray, index: int, refcount_order: int) -> int:
    """Read refcount ``index`` of a refcount block.

    Entries of 8 bits and more are big-endian integers; narrower ones are packed into bytes
    starting from the least significant bit, as QEMU's get_refcount_ro0..ro2 read them.

    pre: 0 <= refcount_order <= 6
    pre: 0 <= index < len(block) * 8 >> refcount_order
    post: 0 <= __return__ < 1 << (1 << refcount_order)
    """
    bits = 1 << refcount_order
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(block[index * width : (index + 1) * width], "big")
    per_byte = 8 // bits
    byte = block[index // per_byte]
    return (byte >> (bits * (index % per_byte))) & ((1 << bits) - 1)


def set_block_entry(block: bytearray, index: int, refcount_order: int, value: int) -> None:
    """Write refcount ``index`` of a refcount block (the inverse of get_block_entry)."""
    bits = 1 << refcount_order
    if not 0 <= value < (1 << bits):
        raise UnsupportedError(f"refcount {value} does not fit in {bits} bits")
    if bits >= 8:
        width = bits // 8
        block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
        return
    per_byte = 8 // bits
    shift = bits * (index % per_byte)
    mask = ((1 << bits) - 1) << shift
    block[index // per_byte] = (block[index // per_byte] & ~mask) | (value << shift)


class RefcountTable:
    """Reads and writes the refcount of host clusters, creating refcount blocks and growing
    the refcount table when a cluster beyond their reach gets a refcount.

    ``bump(n)`` hands out ``n`` never-used clusters at the end of the image (their index);
    ``peek_end()`` tells where the next bump starts; ``write_header(offset, clusters)`` points
    the header at a new refcount table.
    """

    _BLOCK_CACHE_SIZE = 32

    def __init__(
        self,
        storage: Storage,
        *,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        bump: Callable[[int], int],
        peek_end: Callable[[], int],
        write_header: Callable[[int, int], None],
    ) -> None:
        self._storage = storage
        self._cluster_bits = cluster_bits
        self._cluster_size = 1 << cluster_bits
        self._order = refcount_order
        self._entries = refcount_block_entries(cluster_bits, refcount_order)
        self._bump = bump
        self._peek_end = peek_end
        self._write_header = write_header
        self._table_offset = table_offset
        self._table_clusters = table_clusters
        raw = storage.read(table_offset, table_clusters * self._cluster_size)
        self._table: list[int] = unpack_table(raw)
        # block_offsets() is asked on every overlap check; a 2 MiB-cluster table has 256 Ki
        # entries, so the set is kept until the table changes (None: recompute).
        self._block_set: frozenset[int] | None = None
        # Refcount blocks are written through, so this cache only ever holds clean copies.
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()

    @property
    def max_refcount(self) -> int:
        return (1 << (1 << self._order)) - 1

    @property
    def table_offset(self) -> int:
        return self._table_offset

    @property
    def table_clusters(self) -> int:
        return self._table_clusters

    def block_offsets(self) -> frozenset[int]:
        """Host offsets of every refcount block in use."""
        if self._block_set is None:
            self._block_set = frozenset({e & REFT_OFFSET_MASK for e in self._table} - {0})
        return self._block_set

    def invalidate_cache(self) -> None:
        self._blocks.clear()

    def _block_offset(self, table_index: int) -> int:
        if table_index >= len(self._table):
            return 0
        offset = self._table[table_index] & REFT_OFFSET_MASK
        if offset % self._cluster_size:
            raise CorruptImageError(
                f"qcow2 refcount block offset 0x{offset:x} (table entry {table_index}) is not "
                "cluster-aligned"
            )
        if offset and offset >= self._storage.size():
            raise CorruptImageError(
                f"qcow2 refcount block offset 0x{offset:x} (table entry {table_index}) lies "
                "outside the image file"
            )
        return offset

    def _load_block(self, offset: int) -> bytearray:
        block = self._blocks.get(offset)
        if block is None:
            block = bytearray(self._storage.read(offset, self._cluster_size))
            self._blocks[offset] = block
            if len(self._blocks) > self._BLOCK_CACHE_SIZE:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(offset)
        return block

    def get(self, cluster_index: int) -> int:
        """The refcount of host cluster ``cluster_index`` (0 where no block covers it)."""
        offset = self._block_offset(cluster_index // self._entries)
        if not offset:
            return 0
        block = self._load_block(offset)
        return get_block_entry(block, cluster_index % self._entries, self._order)

    def last_used_cluster(self) -> int:
        """Index of the last host cluster with a non-zero refcount (-1 if none)."""
        packed = struct.pack(f">{len(self._table)}Q", *self._table)
        last_entry = (len(packed.rstrip(b"\0")) - 1) // 8
        for ti in range(last_entry, -1, -1):
            if not self._table[ti]:
                continue
            offset = self._block_offset(ti)
            if not offset:
                continue
            block = self._load_block(offset)
            used = len(bytes(block).rstrip(b"\0"))
            if not used:
                continue
            # The last non-zero byte holds the last non-zero entry: only look inside it.
            bits = 1 << self._order
            first = ((used - 1) * 8) // bits
            last = min(self._entries, (used * 8 + bits - 1) // bits) - 1
            for i in range(last, first - 1, -1):
                if get_block_entry(block, i, self._order):
                    return ti * self._entries + i
        return -1

    def set(self, cluster_index: int, value: int) -> None:
        """Set the refcount of host cluster ``cluster_index``, creating structures as needed."""
        if value < 0:
            raise CorruptImageError(
                f"qcow2 refcount of host cluster {cluster_index} would drop below zero"
            )
        if value > self.max_refcount:
            raise UnsupportedError(
                f"qcow2 refcount of host cluster {cluster_index} would exceed "
                f"{self.max_refcount} (refcount_bits {1 << self._order})"
            )
        table_index = cluster_index // self._entries
        offset = self._block_offset(table_index)
        if not offset:
            if value == 0:
                return
            offset = self._create_block(table_index)
        block = self._load_block(offset)
        index = cluster_index % self._entries
        set_block_entry(block, index, self._order, value)
        # Write back only the bytes that hold this entry.
        width = max(1, (1 << self._order) // 8)
        start = (index * (1 << self._order)) // 8
        start -= start % width
        self._storage.write(block[start : start + width], offset + start)

    def add(self, cluster_index: int, delta: int) -> int:
        """Change a refcount by ``delta``; return the new value."""
        value = self.get(cluster_index) + delta
        self.set(cluster_index, value)
        return value

    # -- structure growth ---------------------------------------------------------------------

    def _create_block(self, table_index: int) -> int:
        if table_index >= len(self._table):
            self._grow_table(table_index)
            offset = self._block_offset(table_index)
            if offset:
                return offset
        index = self._bump(1)
        offset = index << self._cluster_bits
        block = bytearray(self._cluster_size)
        # crash.order.new-structure-before-pointer: "a new refcount block that covers itself
        # holds its own refcount before it is linked into the refcount table."  A block that
        # does not cover itself is counted first (in the block that does, created by this
        # recursion if need be).
        if index // self._entries == table_index:
            set_block_entry(block, index % self._entries, self._order, 1)
        else:
            self.set(index, 1)
        self._storage.write(block, offset)
        self._blocks[offset] = block
        self._table[table_index] = offset
        self._block_set = None
        self._storage.write(struct.pack(">Q", offset), self._table_offset + 8 * table_index)
        return offset

    def _grow_table(self, needed_index: int) -> None:
        """Move the refcount table to a larger one at the end of the image.

        The new table and the refcount blocks it needs to describe itself are placed at the
        end, written completely, and only then is the header switched to them; the old table
        is freed last, so the image is consistent at every step.
        """
        cs = self._cluster_size
        old_len = len(self._table)
        start = self._peek_end()
        new_table_clusters = 0
        new_blocks: list[int] = []
        while True:
            end = start + new_table_clusters + len(new_blocks)
            entries = max(needed_index + 1, -(-end // self._entries), old_len * 3 // 2, 1)
            table_clusters = -(-entries * 8 // cs)
            end = start + table_clusters + len(new_blocks)
            blocks = [
                ti
                for ti in range(start // self._entries, (end - 1) // self._entries + 1)
                if ti >= old_len or not self._table[ti] & REFT_OFFSET_MASK
            ]
            if table_clusters == new_table_clusters and blocks == new_blocks:
                break
            new_table_clusters, new_blocks = table_clusters, blocks
        if new_table_clusters * cs > QCOW_MAX_REFTABLE_SIZE:
            raise UnsupportedError(
                f"qcow2 refcount table would need {new_table_clusters * cs} bytes, more than "
                f"QEMU's limit of {QCOW_MAX_REFTABLE_SIZE}"
            )
        first = self._bump(new_table_clusters + len(new_blocks))
        if first != start:
            raise CorruptImageError("qcow2 allocator moved during refcount table growth")
        new_range = range(start, start + new_table_clusters + len(new_blocks))
        new_entries = new_table_clusters * cs // 8
        table = self._table + [0] * (new_entries - old_len)
        for j, ti in enumerate(new_blocks):
            block_index = start + new_table_clusters + j
            block = bytearray(cs)
            for c in new_range:
                if c // self._entries == ti:
                    set_block_entry(block, c % self._entries, self._order, 1)
            offset = block_index << self._cluster_bits
            self._storage.write(block, offset)
            self._blocks[offset] = block
            table[ti] = offset
        new_offset = start << self._cluster_bits
        self._storage.write(
            b"".join(struct.pack(">Q", e) for e in table), new_offset
        )
        # crash.order.refcount-before-reference: "The refcount that counts a cluster is on
        # storage before any [...] header field that refers to the cluster is written."  New
        # clusters that existing blocks cover are counted there (through the old table, which
        # shares those blocks) before the header switches.
        for c in new_range:
            if c // self._entries not in new_blocks:
                self.add(c, 1)
        self._write_header(new_offset, new_table_clusters)
        old_offset, old_clusters = self._table_offset, self._table_clusters
        self._table = table
        self._block_set = None
        self._table_offset, self._table_clusters = new_offset, new_table_clusters
        for c in range(old_clusters):
            self.add((old_offset >> self._cluster_bits) + c, -1)
