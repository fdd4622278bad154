"""A small, independent reader and editor of qcow2 bytes, for crafting and inspecting images.

The conformance suite must not trust the implementation it checks, so it reads and patches
qcow2 metadata with this code, written from QEMU's qcow2 specification alone: header fields,
header extensions, L1/L2 entries, refcounts of every width, and a consistency check like
``qemu-img check`` (refcounts equal references, COPIED exact) for images without snapshots.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Final

__all__ = [
    "EXT_BACKING_FORMAT",
    "EXT_END",
    "EXT_FEATURE_NAMES",
    "HEADER_FIELDS",
    "L1_OFFSET_MASK",
    "L2_COMPRESSED",
    "L2_COPIED",
    "L2_OFFSET_MASK",
    "L2_ZERO",
    "QCOW_MAGIC",
    "Extension",
    "Problem",
    "Qcow2Bytes",
    "deflate_raw",
]

QCOW_MAGIC: Final = 0x514649FB

#: name -> (byte offset, struct format); the v3 fields start at 72.
HEADER_FIELDS: Final[dict[str, tuple[int, str]]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

L1_OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
L2_COPIED: Final = 1 << 63
L2_COMPRESSED: Final = 1 << 62
L2_ZERO: Final = 1

EXT_END: Final = 0
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_NAMES: Final = 0x6803F857


def deflate_raw(data: bytes) -> bytes:
    """``data`` as a raw deflate stream (no zlib header), as qcow2 compression type 0 wants."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@dataclass(frozen=True, slots=True)
class Extension:
    """One header extension: its type, data (unpadded) and where its 8-byte header starts."""

    type: int
    data: bytes
    pos: int


@dataclass(frozen=True, slots=True)
class Problem:
    """One inconsistency found by :meth:`Qcow2Bytes.problems`."""

    kind: str
    """``leak``, ``refcount``, ``copied`` or ``reserved``."""
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


class Qcow2Bytes:
    """A qcow2 image's bytes, with typed access to the structures in them.

    Reads past the end of the bytes read zeroes, as storage reads do.
    """

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)

    # -- raw numbers ----------------------------------------------------------------------------

    def _pad(self, end: int) -> None:
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))

    def u64(self, pos: int) -> int:
        self._pad(pos + 8)
        return int(struct.unpack_from(">Q", self.data, pos)[0])

    def put_u64(self, pos: int, value: int) -> None:
        self._pad(pos + 8)
        struct.pack_into(">Q", self.data, pos, value)

    def u64s(self, pos: int, count: int) -> tuple[int, ...]:
        """``count`` consecutive big-endian 64-bit numbers (a table) at ``pos``."""
        self._pad(pos + 8 * count)
        return struct.unpack_from(f">{count}Q", self.data, pos)

    def u32(self, pos: int) -> int:
        self._pad(pos + 4)
        return int(struct.unpack_from(">I", self.data, pos)[0])

    def put_u32(self, pos: int, value: int) -> None:
        self._pad(pos + 4)
        struct.pack_into(">I", self.data, pos, value)

    # -- header ---------------------------------------------------------------------------------

    def get(self, field: str) -> int:
        """A header field; v3 fields of a version 2 image read as their v2 defaults."""
        if self.version < 3 and field in (
            "incompatible_features",
            "compatible_features",
            "autoclear_features",
            "compression_type",
        ):
            return 0
        if self.version < 3 and field == "refcount_order":
            return 4
        if self.version < 3 and field == "header_length":
            return 72
        pos, fmt = HEADER_FIELDS[field]
        self._pad(pos + struct.calcsize(fmt))
        return int(struct.unpack_from(fmt, self.data, pos)[0])

    def set(self, **fields: int) -> None:
        """Overwrite header fields in place (no validation: this is for crafting)."""
        for field, value in fields.items():
            pos, fmt = HEADER_FIELDS[field]
            self._pad(pos + struct.calcsize(fmt))
            struct.pack_into(fmt, self.data, pos, value)

    @property
    def version(self) -> int:
        return int(struct.unpack_from(">I", self.data, 4)[0])

    @property
    def cluster_bits(self) -> int:
        return self.get("cluster_bits")

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.get("refcount_order")

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def header_length(self) -> int:
        return self.get("header_length")

    def backing_name(self) -> bytes:
        off, size = self.get("backing_file_offset"), self.get("backing_file_size")
        return bytes(self.data[off : off + size]) if off else b""

    # -- header extensions ----------------------------------------------------------------------

    def extensions(self) -> list[Extension]:
        """The header extensions, up to (not including) the end marker."""
        pos = self.header_length
        limit = self.get("backing_file_offset") or self.cluster_size
        out = []
        while pos + 8 <= limit:
            etype, length = struct.unpack_from(">II", self.data, pos)
            if etype == EXT_END:
                break
            out.append(Extension(etype, bytes(self.data[pos + 8 : pos + 8 + length]), pos))
            pos += 8 + (length + 7) // 8 * 8
        return out

    def extension(self, etype: int) -> Extension | None:
        return next((e for e in self.extensions() if e.type == etype), None)

    @staticmethod
    def pack_extensions(exts: list[tuple[int, bytes]]) -> bytes:
        """Extensions (type, data) packed with padding and the end marker."""
        out = bytearray()
        for etype, data in exts:
            out += struct.pack(">II", etype, len(data)) + data + bytes(-len(data) % 8)
        return bytes(out + bytes(8))

    def set_extensions(self, exts: list[tuple[int, bytes]], *, start: int | None = None) -> None:
        """Rewrite the extension area (from ``start``, default ``header_length``) and move the
        backing file name, if any, right after it."""
        pos = self.header_length if start is None else start
        name = self.backing_name()
        packed = self.pack_extensions(exts)
        end = pos + len(packed)
        if end + len(name) > self.cluster_size:
            raise ValueError("extensions and backing name do not fit in cluster 0")
        self.data[pos : self.cluster_size] = bytes(self.cluster_size - pos)
        self.data[pos:end] = packed
        if name:
            self.data[end : end + len(name)] = name
            self.set(backing_file_offset=end)

    # -- L1 / L2 ----------------------------------------------------------------------------------

    def l1_entry_pos(self, guest: int) -> int:
        index = (guest // self.cluster_size) // self.l2_entries
        return self.get("l1_table_offset") + 8 * index

    def l1_entry(self, guest: int) -> int:
        return self.u64(self.l1_entry_pos(guest))

    def l2_entry_pos(self, guest: int) -> int | None:
        """File offset of the L2 entry for ``guest``; None when no L2 table maps it."""
        l2 = self.l1_entry(guest) & L1_OFFSET_MASK
        if not l2:
            return None
        return l2 + 8 * ((guest // self.cluster_size) % self.l2_entries)

    def l2_entry(self, guest: int) -> int:
        pos = self.l2_entry_pos(guest)
        return 0 if pos is None else self.u64(pos)

    def set_l2_entry(self, guest: int, value: int) -> None:
        pos = self.l2_entry_pos(guest)
        if pos is None:
            raise ValueError(f"no L2 table maps guest offset {guest:#x}")
        self.put_u64(pos, value)

    def host_offset(self, guest: int) -> int:
        """The host offset of a standard L2 entry (0 when unallocated)."""
        entry = self.l2_entry(guest)
        return 0 if entry & L2_COMPRESSED else entry & L2_OFFSET_MASK

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, length in bytes) of the sectors a compressed L2 entry covers."""
        x = 62 - (self.cluster_bits - 8)
        offset = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        start = offset & ~511
        return start, sectors * 512

    def compressed_entry(self, host: int, length: int) -> int:
        """A compressed L2 entry for ``length`` bytes of compressed data at ``host``."""
        x = 62 - (self.cluster_bits - 8)
        sectors = (host % 512 + length + 511) // 512
        return L2_COMPRESSED | (sectors - 1) << x | host

    # -- refcounts --------------------------------------------------------------------------------

    def _refblock_slot(self, cluster: int) -> tuple[int, int]:
        entries = self.cluster_size * 8 // self.refcount_bits
        table_index, block_index = divmod(cluster, entries)
        if table_index >= self.get("refcount_table_clusters") * self.cluster_size // 8:
            return 0, block_index
        block = self.u64(self.get("refcount_table_offset") + 8 * table_index) & ~0x1FF
        return block, block_index

    def refcount(self, cluster: int) -> int:
        """The stored refcount of host cluster ``cluster`` (an index, not an offset)."""
        block, index = self._refblock_slot(cluster)
        if not block:
            return 0
        bits = self.refcount_bits
        if bits >= 8:
            width = bits // 8
            pos = block + index * width
            self._pad(pos + width)
            return int.from_bytes(self.data[pos : pos + width], "big")
        pos = block + index * bits // 8
        shift = index * bits % 8
        self._pad(pos + 1)
        return (self.data[pos] >> shift) & ((1 << bits) - 1)

    def set_refcount(self, cluster: int, value: int) -> None:
        block, index = self._refblock_slot(cluster)
        if not block:
            raise ValueError(f"no refcount block covers host cluster {cluster}")
        bits = self.refcount_bits
        if bits >= 8:
            width = bits // 8
            pos = block + index * width
            self._pad(pos + width)
            self.data[pos : pos + width] = value.to_bytes(width, "big")
            return
        pos = block + index * bits // 8
        shift = index * bits % 8
        mask = ((1 << bits) - 1) << shift
        self._pad(pos + 1)
        self.data[pos] = (self.data[pos] & ~mask) | ((value << shift) & mask)

    # -- consistency ------------------------------------------------------------------------------

    def references(self) -> Counter[int]:
        """References to each host cluster, counted from the header, tables and entries."""
        cs = self.cluster_size
        refs: Counter[int] = Counter()

        def span(offset: int, length: int) -> None:
            for c in range(offset // cs, (offset + length - 1) // cs + 1):
                refs[c] += 1

        span(0, cs)
        l1_size, l1_offset = self.get("l1_size"), self.get("l1_table_offset")
        if l1_size:
            span(l1_offset, l1_size * 8)
        rt_offset, rt_clusters = self.get("refcount_table_offset"), self.get(
            "refcount_table_clusters"
        )
        span(rt_offset, rt_clusters * cs)
        for entry in self.u64s(rt_offset, rt_clusters * cs // 8):
            block = entry & ~0x1FF
            if block:
                span(block, cs)
        for l1e in self.u64s(l1_offset, l1_size):
            l2 = l1e & L1_OFFSET_MASK
            if not l2:
                continue
            span(l2, cs)
            for entry in self.u64s(l2, self.l2_entries):
                if not entry:
                    continue
                if entry & L2_COMPRESSED:
                    span(*self.compressed_range(entry))
                elif entry & L2_OFFSET_MASK:
                    span(entry & L2_OFFSET_MASK, cs)
        return refs

    def stored_refcounts(self) -> dict[int, int]:
        """Every non-zero stored refcount: ``{host cluster index: refcount}``."""
        cs = self.cluster_size
        entries = cs * 8 // self.refcount_bits
        rt_offset = self.get("refcount_table_offset")
        bits = self.refcount_bits
        out: dict[int, int] = {}
        table = self.u64s(rt_offset, self.get("refcount_table_clusters") * cs // 8)
        for ti, entry in enumerate(table):
            block = entry & ~0x1FF
            if not block:
                continue
            self._pad(block + cs)
            raw = bytes(self.data[block : block + cs])
            if bits >= 8:
                code = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
                values = list(struct.unpack(f">{entries}{code}", raw))
            else:
                mask = (1 << bits) - 1
                values = [(raw[i * bits // 8] >> (i * bits % 8)) & mask for i in range(entries)]
            for i, value in enumerate(values):
                if value:
                    out[ti * entries + i] = value
        return out

    def problems(self) -> list[Problem]:
        """What ``qemu-img check`` would complain about (images without snapshots).

        Refcounts below the references are errors, above them leaks; COPIED must be set
        exactly on L1/L2 entries whose cluster has refcount 1; reserved bits must be clear.
        """
        if self.get("nb_snapshots"):
            raise ValueError("problems() handles images without internal snapshots only")
        refs = self.references()
        stored = self.stored_refcounts()
        out: list[Problem] = []
        for c in sorted(set(refs) | set(stored)):
            want, have = refs.get(c, 0), stored.get(c, 0)
            if have < want:
                out.append(Problem("refcount", f"host cluster {c}: refcount {have}, {want} refs"))
            elif have > want:
                out.append(Problem("leak", f"host cluster {c}: refcount {have}, {want} refs"))
        cs = self.cluster_size
        l1_offset = self.get("l1_table_offset")
        for li, l1e in enumerate(self.u64s(l1_offset, self.get("l1_size"))):
            if l1e & ~(L1_OFFSET_MASK | L2_COPIED):
                out.append(Problem("reserved", f"L1 entry {li} = {l1e:#x}"))
            l2 = l1e & L1_OFFSET_MASK
            if not l2:
                continue
            if bool(l1e & L2_COPIED) != (stored.get(l2 // cs, 0) == 1):
                out.append(Problem("copied", f"L1 entry {li} = {l1e:#x}"))
            for i, entry in enumerate(self.u64s(l2, self.l2_entries)):
                if not entry:
                    continue
                where = f"L2 entry {li}/{i} (guest {(li * self.l2_entries + i) * cs:#x})"
                if entry & L2_COMPRESSED:
                    if entry & L2_COPIED:
                        out.append(Problem("copied", f"{where}: compressed entry has COPIED"))
                    continue
                if entry & ~(L2_OFFSET_MASK | L2_COPIED | L2_ZERO):
                    out.append(Problem("reserved", f"{where} = {entry:#x}"))
                host = entry & L2_OFFSET_MASK
                if host and bool(entry & L2_COPIED) != (stored.get(host // cs, 0) == 1):
                    out.append(Problem("copied", f"{where} = {entry:#x}"))
                if not host and entry & L2_COPIED:
                    out.append(Problem("copied", f"{where} = {entry:#x} without host cluster"))
        return out

    def errors(self) -> list[Problem]:
        """:meth:`problems` other than leaks (which are harmless, like qemu-img's)."""
        return [p for p in self.problems() if p.kind != "leak"]
