"""Internal snapshots made, applied and deleted by pyimago.fast (QEMU's block/qcow2-snapshot.c).

The three operations work on storage directly: the layer's caches are written back first
and reloaded afterwards.  Every write is ordered so that a power cut leaves at worst leaked
clusters, or an active entry whose COPIED flag is missing though its refcount is 1 (which
costs an unneeded copy-on-write, never data: crash.snapshot.copied-conservative).  Never is
a cluster shared while an active entry says it is not:

* create: the snapshot's L1 copy; COPIED cleared in the active tables; the references the
  snapshot adds; the new snapshot table; the header pointing at it; the old table freed.
* apply: references for what the snapshot reaches (its tables' COPIED flags cleared); a new
  active L1 table; the header switching L1 table and disk size at once; the old active
  state's references dropped; COPIED set where a refcount came back to 1.
* delete: the snapshot table without it, the header; its references dropped; COPIED set
  where a refcount came back to 1.

Refcounts always reach storage before a table that relies on them
(crash.order.refcount-before-reference), and the snapshot table is written whole before the
header points at it (crash.order.new-structure-before-pointer).
"""

from __future__ import annotations

import re
import struct
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import groupby
from typing import TYPE_CHECKING

from pyimago.reference._errors import (
    CorruptImageError,
    InvalidRequestError,
    UnsupportedError,
)
from pyimago.reference._snapshot import SnapshotInfo

from ._codec import clear_top_bit, decode_u64_table, encode_u64_table
from ._entries import COMPRESSED, COPIED, HOST_MASK
from ._header import MAX_L1_ENTRIES, Span
from ._snapshots import SNAPSHOT_HEADER, read_snapshot_table

if TYPE_CHECKING:
    from ._qcow2 import Qcow2Layer

__all__ = ["RawSnapshot", "apply_snapshot", "create_snapshot", "delete_snapshot",
           "encode_snapshot_table", "read_raw_snapshots"]

#: QCowSnapshotExtraData: vm_state_size_large, disk_size, icount.
_EXTRA = struct.Struct(">QQq")
#: QEMU's bounds: QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE, QCOW_MAX_SNAPSHOT_EXTRA_DATA.
_MAX_SNAPSHOTS = 65536
_MAX_TABLE_BYTES = 64 << 20
_MAX_EXTRA = 1024
#: Runs of referenced clusters in a ``_Tally``.
_NONZERO = re.compile(rb"[^\x00]+")


@dataclass(frozen=True, slots=True)
class RawSnapshot:
    """A snapshot table entry as stored, ready to be written back unchanged."""

    l1: Span
    id: bytes
    name: bytes
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int
    #: Extra data past the 24 bytes QEMU knows, kept as it is (qcow2.snapshots.extra-data).
    unknown_extra: bytes


def read_raw_snapshots(
    read: Callable[[int, int], bytes], table: Span, disk_size: int
) -> list[RawSnapshot]:
    """The entries of the snapshot table (bounds as QEMU's qcow2_read_snapshots)."""
    found: list[RawSnapshot] = []
    pos = table.at
    for i in range(table.n):
        pos += -pos % 8
        raw = read(pos, SNAPSHOT_HEADER.size)
        if len(raw) < SNAPSHOT_HEADER.size:
            raise CorruptImageError(f"qcow2: snapshot table entry {i} at 0x{pos:x} is cut short")
        l1_at, l1_n, id_n, name_n, sec, nsec, clock, vm32, extra_n = SNAPSHOT_HEADER.unpack(raw)
        if extra_n > _MAX_EXTRA:
            raise CorruptImageError(
                f"qcow2: snapshot table entry {i} has {extra_n} bytes of extra data"
            )
        pos += SNAPSHOT_HEADER.size
        extra = read(pos, extra_n) if extra_n else b""
        pos += extra_n
        names = read(pos, id_n + name_n)
        if len(extra) < extra_n or len(names) < id_n + name_n:
            raise CorruptImageError(f"qcow2: snapshot table entry {i} runs past the file end")
        pos += id_n + name_n
        if pos - table.at > _MAX_TABLE_BYTES:
            raise CorruptImageError("qcow2: the snapshot table is larger than 64 MiB")
        padded = extra.ljust(_EXTRA.size, b"\0")
        vm_large, disk, icount = _EXTRA.unpack_from(padded)
        found.append(RawSnapshot(
            l1=Span(l1_at, l1_n),
            id=names[:id_n],
            name=names[id_n:],
            date_sec=sec,
            date_nsec=nsec,
            vm_clock_nsec=clock,
            # qcow2_read_snapshots: the 64-bit fields where present, else the defaults.
            vm_state_size=vm_large if extra_n >= 8 else vm32,
            disk_size=disk if extra_n >= 16 else disk_size,
            icount=icount if extra_n >= 24 else -1,
            unknown_extra=extra[_EXTRA.size:],
        ))
    return found


def encode_snapshot_table(entries: list[RawSnapshot]) -> bytes:
    """The table as qcow2_write_snapshots lays it out: each entry 8-aligned, with (at
    least) the 24 bytes of extra data QEMU knows."""
    out = bytearray()
    for sn in entries:
        out += bytes(-len(out) % 8)
        extra = _EXTRA.pack(sn.vm_state_size, sn.disk_size, sn.icount) + sn.unknown_extra
        # "If it doesn't fit in 32 bit, older implementations should treat it as a
        # disk-only snapshot rather than truncate the VM state"
        vm32 = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
        out += SNAPSHOT_HEADER.pack(sn.l1.at, sn.l1.n, len(sn.id), len(sn.name), sn.date_sec,
                                    sn.date_nsec, sn.vm_clock_nsec, vm32, len(extra))
        out += extra + sn.id + sn.name
    if len(out) > _MAX_TABLE_BYTES:
        raise UnsupportedError("qcow2: the snapshot table would be larger than 64 MiB")
    return bytes(out)


def info_of(sn: RawSnapshot) -> SnapshotInfo:
    return SnapshotInfo(
        sn.id.decode("utf-8", "replace"), sn.name.decode("utf-8", "replace"), sn.vm_state_size,
        sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, sn.disk_size,
        None if sn.icount == -1 else sn.icount,
    )


# -- the operations -----------------------------------------------------------------------


def _start(layer: Qcow2Layer, op: str) -> list[RawSnapshot]:
    """Refuse what cannot be done, put every cached change on storage, read the table."""
    layer.refuse_read_only(op)
    layer.refuse_corrupt(op)
    if layer.hdr.has_data_file:
        # qcow2_snapshot_create: "if (has_data_file(bs)) return -ENOTSUP;"
        raise UnsupportedError(f"{op}: {layer} has an external data file, which internal "
                               "snapshots cannot share (QEMU refuses them too)")
    layer._commit()
    layer.comp_next = 0
    return read_raw_snapshots(layer._meta_read, layer.hdr.snapshots, layer.hdr.size)


def _key(key: object, op: str) -> str:
    """A snapshot ID or name argument, checked before anything else."""
    if type(key) is not str or not key:
        raise InvalidRequestError(f"{op}: a snapshot ID or name must be a non-empty str, "
                                  f"not {key!r}")
    return key


def _pick(entries: list[RawSnapshot], key: str, op: str) -> int:
    """Index of the snapshot with ID ``key``, else the first named ``key``
    (find_snapshot_by_id_or_name)."""
    raw = key.encode("utf-8", "surrogateescape")
    for field in ("id", "name"):
        for i, sn in enumerate(entries):
            if getattr(sn, field) == raw:
                return i
    known = ", ".join(f"{s.id.decode(errors='replace')}:{s.name.decode(errors='replace')}"
                      for s in entries) or "none"
    raise InvalidRequestError(f"{op}: no snapshot with ID or name {key!r} (snapshots: {known})")


def create_snapshot(layer: Qcow2Layer, name: object) -> SnapshotInfo:
    """qcow2_snapshot_create for a disk-only snapshot named ``name``."""
    if type(name) is not str or not name:
        raise InvalidRequestError(f"create_snapshot: the name must be a non-empty str, "
                                  f"not {name!r}")
    raw_name = name.encode("utf-8", "surrogateescape")
    if len(raw_name) > 0xFFFF:
        raise InvalidRequestError(f"create_snapshot: a name of {len(raw_name)} bytes is too long")
    entries = _start(layer, "create_snapshot")
    if any(sn.name == raw_name for sn in entries):
        raise InvalidRequestError(f"create_snapshot: a snapshot named {name!r} exists already")
    if len(entries) >= _MAX_SNAPSHOTS:
        raise UnsupportedError(f"create_snapshot: {layer} has {_MAX_SNAPSHOTS} snapshots, "
                               "QEMU's limit")
    # find_new_snapshot_id: one past the largest ID strtoul reads.
    new_id = str(max((_strtoul(sn.id) for sn in entries), default=0) + 1).encode()
    now = time.time_ns()
    l1 = layer._l1
    hdr = layer.hdr
    tables = _tables(layer, l1)
    # Check every reference the snapshot adds fits before anything is written.
    bumps = _references(layer, l1, tables)
    _check_room(layer, bumps)

    cs, cb = layer._cs, layer._cbits
    first, _ = layer.refs.allocate(max(1, -(-hdr.l1.n * 8 // cs)), exact=True)
    snap_l1 = Span(first << cb, hdr.l1.n)
    layer.refs.write_back()
    layer.storage.write(encode_u64_table(l1[: hdr.l1.n]), snap_l1.at)
    # The active entries lose COPIED before their clusters become shared.
    cleared_l1 = array(l1.typecode, (e & ~COPIED for e in l1))
    for ofs, tbl in tables.items():
        _clear_copied(layer, ofs, tbl)
    if cleared_l1 != l1:
        layer.storage.write(encode_u64_table(cleared_l1[: hdr.l1.n]), hdr.l1.at)
    layer._l1 = cleared_l1
    layer._l1_dirty = False
    _add_references(layer, bumps)
    layer.refs.write_back()
    new = RawSnapshot(snap_l1, new_id, raw_name, now // 1_000_000_000, now % 1_000_000_000,
                      0, 0, hdr.size, 0, b"")
    _write_table(layer, [*entries, new])
    return info_of(new)


def apply_snapshot(layer: Qcow2Layer, key: object) -> None:
    """qcow2_snapshot_goto: the active state becomes the snapshot's (disk size included)."""
    name = _key(key, "apply_snapshot")
    entries = _start(layer, "apply_snapshot")
    sn = entries[_pick(entries, name, "apply_snapshot")]
    sn_l1 = _snapshot_l1(layer, sn)
    sn_tables = _tables(layer, sn_l1)
    bumps = _references(layer, sn_l1, sn_tables)
    _check_room(layer, bumps)
    new_n = max(layer.hdr.l1.n, sn.l1.n, layer._tables_for(sn.disk_size))
    if new_n > MAX_L1_ENTRIES:
        raise CorruptImageError(f"apply_snapshot: snapshot {info_of(sn).id!r} needs an L1 "
                                f"table of {new_n} entries")
    old_l1 = layer._l1[: layer.hdr.l1.n]
    old_tables = _tables(layer, old_l1)
    _add_references(layer, bumps)
    layer.refs.write_back()
    # What the snapshot reaches is shared now: none of its entries may claim otherwise
    # once they are active.
    for ofs, tbl in sn_tables.items():
        _clear_copied(layer, ofs, tbl)
    new_l1 = array(sn_l1.typecode, (e & ~COPIED for e in sn_l1))
    new_l1.extend(array(new_l1.typecode, bytes(8 * (new_n - len(new_l1)))))
    cs, cb = layer._cs, layer._cbits
    clusters = max(1, -(-new_n * 8 // cs))
    first, _ = layer.refs.allocate(clusters, exact=True)
    layer.refs.write_back()
    layer.storage.write(encode_u64_table(new_l1), first << cb)
    old_span = layer.hdr.l1
    layer.hdr = replace(layer.hdr, l1=Span(first << cb, new_n), size=sn.disk_size)
    layer._write_header()
    layer.size = sn.disk_size
    layer._l1 = new_l1
    layer._l1_dirty = False
    _reset(layer)
    # The old active state lets go of what it held.
    _drop_references(layer, _references(layer, old_l1, old_tables))
    if old_span.n:
        layer.refs.free(old_span.at >> cb, max(1, -(-old_span.n * 8 // cs)))
    layer.refs.write_back()
    _fix_copied(layer)


def delete_snapshot(layer: Qcow2Layer, key: object) -> None:
    """qcow2_snapshot_delete: the table without it first, then its references go."""
    name = _key(key, "delete_snapshot")
    entries = _start(layer, "delete_snapshot")
    i = _pick(entries, name, "delete_snapshot")
    sn = entries[i]
    sn_l1 = _snapshot_l1(layer, sn)
    drops = _references(layer, sn_l1, _tables(layer, sn_l1))
    _write_table(layer, entries[:i] + entries[i + 1 :])
    # "If we fail after this point, we won't recover but just leak clusters."
    _drop_references(layer, drops)
    if sn.l1.n:
        layer.refs.free(sn.l1.at >> layer._cbits, max(1, -(-sn.l1.n * 8 // layer._cs)))
    layer.refs.write_back()
    _fix_copied(layer)


# -- pieces -------------------------------------------------------------------------------


def _strtoul(raw: bytes) -> int:
    digits = raw.lstrip(b" \t\n")
    n = 0
    for ch in digits:
        if not 0x30 <= ch <= 0x39:
            break
        n = n * 10 + ch - 0x30
    return n


def _snapshot_l1(layer: Qcow2Layer, sn: RawSnapshot) -> array[int]:
    """The snapshot's L1 table, after qcow2_validate_table's checks."""
    at, n = sn.l1.at, sn.l1.n
    what = f"snapshot {info_of(sn).id!r}"
    if n > MAX_L1_ENTRIES:
        raise CorruptImageError(f"qcow2: {what} has an L1 table of {n} entries")
    if n and (at % layer._cs or at < layer._cs or at + 8 * n > layer._file_size_now()):
        raise CorruptImageError(f"qcow2: {what} has its L1 table at 0x{at:x}, not inside the "
                                "file past the header")
    return decode_u64_table(layer._meta_read(at, 8 * n) if n else b"")


def _tables(layer: Qcow2Layer, l1: array[int]) -> dict[int, array[int]]:
    """The L2 tables ``l1`` points at, read from storage (offset -> entries)."""
    found: dict[int, array[int]] = {}
    for i, e in enumerate(l1):
        if e & layer._l1_bad:
            raise CorruptImageError(f"qcow2: L1 entry {i} (0x{e:016x}) has reserved bits set "
                                    "or an unaligned L2 table offset")
        ofs = e & HOST_MASK
        if ofs and ofs not in found:
            layer._vet_table("L2 table", ofs)
            found[ofs] = decode_u64_table(layer._meta_read(ofs, layer._cs))
    return found


class _Tally:
    """References per host cluster: a byte per cluster of the file (a cluster referenced 255
    times or more, or past the end of the file, is counted in a dict beside it), so that an
    image of N clusters costs N bytes here, not a dict entry per cluster."""

    __slots__ = ("counts", "over")

    def __init__(self, clusters: int) -> None:
        self.counts = bytearray(clusters)
        self.over: dict[int, int] = {}

    def add(self, cluster: int) -> None:
        counts = self.counts
        if cluster < len(counts) and counts[cluster] < 254:
            counts[cluster] += 1
        else:
            self._add_over(cluster)

    def _add_over(self, cluster: int) -> None:
        # From 255 on the byte says "see the dict", which holds the whole count.
        if cluster < len(self.counts) and self.counts[cluster] != 255:
            self.over[cluster] = self.counts[cluster]
            self.counts[cluster] = 255
        self.over[cluster] = self.over.get(cluster, 0) + 1

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """``(first cluster, clusters, references each)``: runs of clusters with the same
        number of references, in ascending order."""
        counts, over = self.counts, self.over
        for m in _NONZERO.finditer(counts):
            first = m.start()
            for n, group in groupby(m.group()):
                length = len(list(group))
                if n == 255:
                    for c in range(first, first + length):
                        yield c, 1, over[c]
                else:
                    yield first, length, n
                first += length
        for c in sorted(c for c in over if c >= len(counts)):
            yield c, 1, over[c]


def _references(layer: Qcow2Layer, l1: array[int], tables: dict[int, array[int]]) -> _Tally:
    """References an L1 table holds to each host cluster (qcow2_update_snapshot_refcount's
    walk: each L2 table once per L1 entry, each data or compressed cluster its entries
    touch)."""
    cb = layer._cbits
    tally = _Tally((layer._file_size_now() >> cb) + 1)
    counts = tally.counts
    add = tally.add
    step = 1 << layer._ext
    # Entries that are not a plain reference to one cluster: compressed ones, and malformed
    # ones (refused below, where they hold a host offset).
    odd = COMPRESSED | layer._l2_bad
    for e in l1:
        ofs = e & HOST_MASK
        if not ofs:
            continue
        add(ofs >> cb)
        tbl = tables[ofs]
        words = tbl[::step] if step > 1 else tbl
        for x in filter(None, words):
            host = x & HOST_MASK
            if x & odd:
                if x & COMPRESSED:
                    for c in layer._held(x):
                        add(c)
                    continue
                if host:
                    layer._check_entry(step * words.index(x), x)
            if host:
                c = host >> cb
                # bytearray's own bounds: past the file or at 255 references the tally's
                # dict takes over.
                try:
                    if counts[c] < 254:
                        counts[c] += 1
                        continue
                except IndexError:
                    pass
                add(c)
    return tally


def _check_room(layer: Qcow2Layer, bumps: _Tally) -> None:
    """Every refcount can take the references about to be added (else nothing changes)."""
    top = layer.refs.ceiling
    count = layer.refs.count
    for first, length, n in bumps.runs():
        for cluster in range(first, first + length):
            have = count(cluster)
            if have == 0:
                raise layer.mark_corrupt(
                    f"qcow2: host cluster 0x{cluster << layer._cbits:x} is referenced but its "
                    "refcount is 0"
                )
            if have + n > top:
                raise UnsupportedError(
                    f"qcow2: host cluster 0x{cluster << layer._cbits:x} would need refcount "
                    f"{have + n}, more than refcount_bits allow ({top}): no snapshot taken"
                )


def _clear_copied(layer: Qcow2Layer, ofs: int, tbl: array[int]) -> None:
    """Clear COPIED in the entries of the L2 table at ``ofs`` and write it if that changed
    anything (extended L2: the entry words only; bit 63 of a bitmap word is a zero bit)."""
    if clear_top_bit(tbl, 1 << layer._ext):  # COPIED is bit 63
        layer.storage.write(encode_u64_table(tbl), ofs)


def _add_references(layer: Qcow2Layer, tally: _Tally) -> None:
    for first, length, n in tally.runs():
        for _ in range(n):
            layer.refs.incref(first, length)


def _drop_references(layer: Qcow2Layer, tally: _Tally) -> None:
    for first, length, n in tally.runs():
        for _ in range(n):
            layer.refs.free(first, length)


def _write_table(layer: Qcow2Layer, entries: list[RawSnapshot]) -> None:
    """qcow2_write_snapshots: a new table (refcounts first), then the header, then the old
    table freed."""
    data = encode_snapshot_table(entries)
    cs, cb = layer._cs, layer._cbits
    old = layer.hdr.snapshots
    old_bytes = (read_snapshot_table(layer._meta_read, old, layer._file_size_now())[1]
                 if old.n else 0)
    at = 0
    if entries:
        first, _ = layer.refs.allocate(-(-len(data) // cs), exact=True)
        at = first << cb
        layer.refs.write_back()
        layer.storage.write(data, at)
    layer.hdr = replace(layer.hdr, snapshots=Span(at, len(entries)))
    layer._write_header()
    if old.n and old_bytes:
        layer.refs.free(old.at >> cb, -(-(old.at % cs + old_bytes) // cs))
    layer.refs.write_back()
    _reset(layer)


def _reset(layer: Qcow2Layer) -> None:
    """The layer's views of the tables and the metadata index start afresh."""
    layer._l2.clear()
    layer._snapshots = None
    layer._snap_parts = None
    layer._last_inflated = None
    layer._file_size_now()
    layer._meta_moved()


#: Entries per run _fix_copied skips at once when all zero (times two with extended L2).
_FIX_RUN = 512
_ZERO_RUN = bytes(16 * _FIX_RUN)


def _fix_copied(layer: Qcow2Layer) -> None:
    """qcow2_update_snapshot_refcount(active L1, 0): COPIED exactly where a refcount is 1
    (refcounts are on storage already: the flag follows them)."""
    cb = layer._cbits
    step = 1 << layer._ext
    l1 = layer._l1
    count = layer.refs.count
    for e in l1:
        ofs = e & HOST_MASK
        if not ofs:
            continue
        raw = layer._meta_read(ofs, layer._cs)
        tbl = decode_u64_table(raw)
        changed = False
        # Only the runs of the table that hold anything are walked entry by entry (a 2 MiB
        # table holds 262,144 entries, mostly zero): a run of zeroes is one memcmp.
        run = _FIX_RUN * step
        for lo in range(0, len(tbl), run):
            if raw[8 * lo : 8 * (lo + run)] == _ZERO_RUN[: 8 * min(run, len(tbl) - lo)]:
                continue
            for j in range(lo, min(lo + run, len(tbl)), step):
                x = tbl[j]
                host = x & HOST_MASK
                if x & COMPRESSED or not host:
                    continue
                want = (x | COPIED) if count(host >> cb) == 1 else (x & ~COPIED)
                if want != x:
                    tbl[j] = want
                    changed = True
        if changed:
            layer.storage.write(encode_u64_table(tbl), ofs)
    flagged = array(l1.typecode, (e | COPIED if e & HOST_MASK and count((e & HOST_MASK) >> cb)
                                  == 1 else e & ~COPIED for e in l1))
    if flagged != l1:
        layer._l1 = flagged
        layer.storage.write(encode_u64_table(flagged[: layer.hdr.l1.n]), layer.hdr.l1.at)
    layer._l1_dirty = False
    _reset(layer)

