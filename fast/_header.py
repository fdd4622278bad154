"""The qcow2 header of pyimago.fast: a layout table, a decoded value and its checks.

The header is described once, as data (:data:`LAYOUT`: field name, byte offset, width);
decoding and encoding both walk that table.  :func:`parse_header` checks what the numbers
may be (so that later code can use them as offsets, counts and shifts without an exception
from deep inside, or an allocation the size of a claimed table), and where the tables lie
in the file when it is given the file size; :func:`check_features` decides whether the
features the image uses can be honoured, naming refused bits with the image's own feature
name table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from pyimago.reference._errors import CorruptImageError, UnsupportedFeatureError

__all__ = [
    "AUTOCLEAR_BITMAPS",
    "AUTOCLEAR_DATA_FILE_RAW",
    "EXT_BACKING_FORMAT",
    "EXT_BITMAPS",
    "EXT_DATA_FILE",
    "EXT_FEATURE_TABLE",
    "LAYOUT",
    "MAGIC",
    "MAX_L1_ENTRIES",
    "MAX_REFTABLE_BYTES",
    "Extension",
    "Features",
    "Header",
    "Incompat",
    "Span",
    "check_features",
    "decode_extensions",
    "encode_extensions",
    "feature_names",
    "parse_header",
]

MAGIC = b"QFI\xfb"

#: (field, byte offset, width in bytes) of every header field this module reads or writes;
#: all big-endian.  The v3 fields start at byte 72.
LAYOUT: tuple[tuple[str, int, int], ...] = (
    ("version", 4, 4),
    ("backing.at", 8, 8),
    ("backing.n", 16, 4),
    ("cluster_bits", 20, 4),
    ("size", 24, 8),
    ("crypt_method", 32, 4),
    ("l1.n", 36, 4),
    ("l1.at", 40, 8),
    ("reftable.at", 48, 8),
    ("reftable.n", 56, 4),
    ("snapshots.n", 60, 4),
    ("snapshots.at", 64, 8),
    ("features.incompatible", 72, 8),
    ("features.compatible", 80, 8),
    ("features.autoclear", 88, 8),
    ("refcount_order", 96, 4),
    ("header_length", 100, 4),
    ("compression_type", 104, 1),
)
_V2_END = 72
_V3_MIN = 104
#: The LAYOUT fields that make up :class:`Features`, in its order.
_FEATURE_FIELDS = ("features.incompatible", "features.compatible", "features.autoclear")


class Incompat(enum.IntFlag):
    """The incompatible feature bits this implementation knows (header bytes 72-79)."""

    DIRTY = 1
    CORRUPT = 2
    DATA_FILE = 4
    COMPRESSION = 8
    EXTL2 = 16


#: Autoclear bit 0: the bitmaps extension is consistent (QCOW2_AUTOCLEAR_BITMAPS).
AUTOCLEAR_BITMAPS = 1
#: Autoclear bit 1: the external data file holds the raw guest disk.
AUTOCLEAR_DATA_FILE_RAW = 2

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_BITMAPS = 0x23852875
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441
#: Extension types an image may hold once only (two that disagree leave no way to choose).
_SINGLETONS = frozenset({EXT_BACKING_FORMAT, EXT_DATA_FILE})

#: QEMU's bounds (QCOW_MAX_L1_SIZE 32 MiB, QCOW_MAX_REFTABLE_SIZE 8 MiB, 65536 snapshots):
#: they cap what a hostile header can make us read or allocate.
MAX_L1_ENTRIES = (32 << 20) // 8
MAX_REFTABLE_BYTES = 8 << 20
_MAX_SNAPSHOTS = 65536
_MAX_NAME = 1023


@dataclass(frozen=True, slots=True)
class Span:
    """A structure in the image file: where it starts and how many units it holds (L1
    entries, refcount table clusters, snapshots or name bytes, depending on the field)."""

    at: int
    n: int


@dataclass(frozen=True, slots=True)
class Features:
    """The three feature bitmasks of a v3 header (all zero for v2)."""

    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded qcow2 header; ``tail`` keeps header bytes past the fields we know."""

    version: int
    cluster_bits: int
    size: int
    l1: Span
    reftable: Span
    snapshots: Span
    backing: Span
    features: Features = Features()
    crypt_method: int = 0
    refcount_order: int = 4
    header_length: int = _V2_END
    compression_type: int = 0
    tail: bytes = b""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l1_size(self) -> int:
        """Entries in the L1 table (the field's name in qcow2.txt)."""
        return self.l1.n

    @property
    def extended_l2(self) -> bool:
        """L2 entries carry a subcluster bitmap (incompatible bit 4)."""
        return bool(self.features.incompatible & Incompat.EXTL2)

    @property
    def has_data_file(self) -> bool:
        """Guest data lives in an external data file (incompatible bit 2)."""
        return bool(self.features.incompatible & Incompat.DATA_FILE)

    def _value(self, name: str) -> int:
        obj: object = self
        for part in name.split("."):
            obj = getattr(obj, part)
        assert isinstance(obj, int)
        return obj

    def to_bytes(self) -> bytes:
        """The header structure (``header_length`` bytes), header extensions excluded."""
        out = bytearray(self.header_length)
        out[:4] = MAGIC
        limit = self.header_length if self.version >= 3 else _V2_END
        for name, at, width in LAYOUT:
            if at + width <= limit:
                out[at : at + width] = self._value(name).to_bytes(width, "big")
        if self.tail:
            out[112 : 112 + len(self.tail)] = self.tail
        return bytes(out)

    def moved(self, **spans: Span) -> Header:
        """A copy whose tables (``l1``, ``reftable``) now lie elsewhere."""
        return replace(self, **spans)  # type: ignore[arg-type]

    def resized(self, size: int) -> Header:
        return replace(self, size=size)

    def cleared_autoclear(self, keep: int = 0) -> Header:
        """A copy without the auto-clear bits, but those in ``keep``."""
        feats = self.features
        return replace(self, features=replace(feats, autoclear=feats.autoclear & keep))

    def with_incompatible(self, bits: int) -> Header:
        """A copy with incompatible feature ``bits`` set as well (v3)."""
        feats = self.features
        return replace(self, features=replace(feats, incompatible=feats.incompatible | bits))


def _bad(msg: str) -> CorruptImageError:
    return CorruptImageError(f"qcow2 header: {msg}")


def _number(data: bytes | bytearray | memoryview, at: int, width: int) -> int:
    return int.from_bytes(data[at : at + width], "big")


def _fields(data: bytes | bytearray | memoryview, limit: int) -> dict[str, int]:
    return {name: _number(data, at, w) for name, at, w in LAYOUT if at + w <= limit}


def parse_header(data: bytes | bytearray | memoryview, file_size: int | None = None) -> Header:
    """Decode ``data`` (the start of the image, up to one cluster) and check every value
    that later code relies on; features are judged separately by :func:`check_features`.

    With ``file_size``, the L1, refcount and snapshot tables are also checked against the
    file: each must start past the header cluster and inside the file, and the L1 and
    refcount tables must not overlap.
    """
    if len(data) < _V2_END:
        raise _bad(f"only {len(data)} bytes: not a qcow2 image")
    if bytes(data[:4]) != MAGIC:
        raise _bad(f"magic {bytes(data[:4])!r} is not {MAGIC!r}: not a qcow2 image")
    version = _number(data, 4, 4)
    if version not in (2, 3):
        raise UnsupportedFeatureError(
            f"qcow2 version {version}: only versions 2 and 3 can be read",
            feature=f"qcow2 version {version}",
        )
    limit = _V2_END
    if version == 3:
        if len(data) < _V3_MIN:
            raise _bad(f"v3 header cut short at {len(data)} bytes")
        limit = _number(data, 100, 4)
        if limit < _V3_MIN or limit % 8 or limit > len(data):
            raise _bad(f"header_length {limit} is not a multiple of 8 from 104 to the cluster end")
    f = _fields(data, limit)
    bits = f["cluster_bits"]
    if not 9 <= bits <= 21:
        raise _bad(f"cluster_bits {bits} outside [9, 21]")
    cs = 1 << bits
    if limit > cs:
        raise _bad(f"header_length {limit} exceeds the {cs}-byte cluster")
    order = f.get("refcount_order", 4)
    if order > 6:
        raise _bad(f"refcount_order {order} > 6 (64-bit refcounts)")
    size = f["size"]
    if size >> 63:
        raise _bad(f"disk size {size} is 2^63 or more")
    l1 = Span(f["l1.at"], f["l1.n"])
    rt = Span(f["reftable.at"], f["reftable.n"])
    if l1.n > MAX_L1_ENTRIES:
        raise _bad(f"l1_size {l1.n} exceeds the limit of {MAX_L1_ENTRIES} entries")
    # Extended L2 entries (incompatible bit 4) are 16 bytes: half as many per table.
    entry_bytes = 16 if f.get("features.incompatible", 0) & Incompat.EXTL2 else 8
    per_table = cs * (cs // entry_bytes)
    if l1.n * per_table < size:
        raise _bad(f"l1_size {l1.n} cannot map a disk of {size} bytes")
    if l1.n and (l1.at == 0 or l1.at % cs):
        raise _bad(f"l1_table_offset 0x{l1.at:x} is not a cluster-aligned offset")
    if rt.n == 0 or rt.n * cs > MAX_REFTABLE_BYTES:
        raise _bad(f"refcount_table_clusters {rt.n} outside 1..{MAX_REFTABLE_BYTES // cs}")
    if rt.at % cs:
        raise _bad(f"refcount_table_offset 0x{rt.at:x} is not cluster-aligned")
    if max(l1.at + 8 * l1.n, rt.at + cs * rt.n) >> 63:
        raise _bad("a table ends at 2^63 or beyond")
    snaps = Span(f["snapshots.at"], f["snapshots.n"])
    if snaps.n > _MAX_SNAPSHOTS:
        raise _bad(f"nb_snapshots {snaps.n} > {_MAX_SNAPSHOTS}")
    # QEMU validates the offset whatever the count (qcow2_validate_table).
    if snaps.at % cs:
        raise _bad(f"snapshots_offset 0x{snaps.at:x} is not cluster-aligned")
    name = Span(f["backing.at"], f["backing.n"] if f["backing.at"] else 0)
    if name.at:
        if not 0 < name.n <= _MAX_NAME:
            raise _bad(f"backing_file_size {name.n} outside 1..{_MAX_NAME}")
        if name.at < limit or name.at + name.n > cs:
            raise _bad(f"backing file name at {name.at}+{name.n} lies outside [{limit}, {cs})")
    if file_size is not None:
        _place_tables(cs, file_size, l1, rt, snaps)
    features = Features(*(f.get(k, 0) for k in _FEATURE_FIELDS))
    tail = bytes(data[112:limit]) if limit > 112 else b""
    # (positional: the order of Header's fields)
    return Header(version, bits, size, l1, rt, snaps, name, features, f["crypt_method"], order,
                  limit, f.get("compression_type", 0), tail)


def _place_tables(cs: int, file_size: int, l1: Span, rt: Span, snaps: Span) -> None:
    tables = (
        ("L1 table", l1.at, 8 * l1.n),
        ("refcount table", rt.at, cs * rt.n),
        ("snapshot table", snaps.at, 1 if snaps.n else 0),
    )
    for what, at, n in tables:
        if n and at < cs:
            raise _bad(f"the {what} at 0x{at:x} overlaps the header cluster")
        if n and at >= file_size:
            raise _bad(f"the {what} at 0x{at:x} lies wholly outside the {file_size}-byte file")
    if l1.n and l1.at < rt.at + cs * rt.n and rt.at < l1.at + 8 * l1.n:
        raise _bad(f"the L1 table (0x{l1.at:x}) and the refcount table (0x{rt.at:x}) overlap")


#: Bits that allow reading only, with what the user can do about them.
_READ_ONLY = (
    (Incompat.CORRUPT, "corrupt bit",
     "it may only be opened read-only, or repaired with 'qemu-img check -r all'"),
    (Incompat.DIRTY, "dirty bit", "open it read-only, or repair its refcounts first"),
)
_KNOWN = sum(Incompat)


def _refuse(what: str, msg: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(f"qcow2: {msg}", feature=what)


def check_features(hdr: Header, names: dict[tuple[int, int], str], *, writable: bool) -> None:
    """Refuse what this implementation cannot honour; ``names`` is the image's feature name
    table (``(type, bit) -> name``) and names refused bits where it has them."""
    bits = hdr.features.incompatible
    strange = bits & ~_KNOWN
    unknown = [b for b in range(64) if strange >> b & 1]
    if unknown:
        what = ", ".join(
            f"incompatible bit {b}" + (f" ({names[0, b]})" if (0, b) in names else "")
            for b in unknown
        )
        raise _refuse(what, f"the image needs features this implementation lacks: {what}")
    if hdr.crypt_method:
        raise _refuse("encryption", f"encryption (crypt_method {hdr.crypt_method}) is unsupported")
    if bits & Incompat.EXTL2 and hdr.cluster_bits < 14:
        # 32 subclusters per cluster, none smaller than a 512-byte sector (QEMU's limit).
        raise CorruptImageError(
            f"qcow2: extended L2 entries need clusters of 16 KiB or more, not {hdr.cluster_size}"
        )
    ctype = hdr.compression_type
    if ctype > 1:
        raise _refuse(f"compression type {ctype}", f"compression type {ctype} is unknown")
    if bool(bits & Incompat.COMPRESSION) != bool(ctype):
        # The bit says "compression_type is not zero"; a field and a bit that disagree leave
        # no way to tell which one is damaged.
        state = "set" if bits & Incompat.COMPRESSION else "clear"
        raise CorruptImageError(
            f"qcow2: incompatible bit 3 is {state} but compression_type is {ctype}"
        )
    if writable:
        for flag, what, advice in _READ_ONLY:
            if bits & flag:
                raise _refuse(what, f"the image has its {what} set: {advice}")


@dataclass(frozen=True, slots=True)
class Extension:
    """One header extension: its type and payload (kept as they are)."""

    kind: int
    data: bytes


def decode_extensions(
    area: bytes | bytearray | memoryview, start: int, stop: int
) -> list[Extension]:
    """The extensions in ``area[start:stop]``, up to the end marker or the end of the area."""
    found: list[Extension] = []
    seen: dict[int, bytes] = {}
    pos = start
    while pos < stop:
        # As QEMU's qcow2_read_extensions: an extension (its 8-byte head included, even the
        # end marker's) that crosses the end of the area (the backing file name, or the
        # cluster end) is refused, not cut short.
        if pos + 8 > stop:
            raise CorruptImageError(
                f"qcow2: header extension at byte {pos} crosses byte {stop} (the backing file "
                "name or the header cluster end)"
            )
        kind, n = _number(area, pos, 4), _number(area, pos + 4, 4)
        body = pos + 8
        if body + n > stop:
            raise CorruptImageError(
                f"qcow2: header extension 0x{kind:08x} ({n} bytes at {body}) overruns byte {stop}"
            )
        if kind == 0:
            break
        data = bytes(area[body : body + n])
        if kind in _SINGLETONS and seen.setdefault(kind, data) != data:
            raise CorruptImageError(
                f"qcow2: header extension 0x{kind:08x} is given twice, with different contents"
            )
        found.append(Extension(kind, data))
        pos = body + (n + 7) // 8 * 8
    return found


def encode_extensions(exts: list[Extension]) -> bytes:
    """Extensions padded to 8 bytes each, then the end marker."""
    out = bytearray()
    for ext in exts:
        out += ext.kind.to_bytes(4, "big") + len(ext.data).to_bytes(4, "big") + ext.data
        out += bytes(-len(out) % 8)
    return bytes(out + bytes(8))


def feature_names(exts: list[Extension]) -> dict[tuple[int, int], str]:
    """``(feature type, bit) -> name`` from the feature name table extensions."""
    names: dict[tuple[int, int], str] = {}
    for ext in exts:
        if ext.kind == EXT_FEATURE_TABLE:
            raw = ext.data
            for at in range(0, len(raw) - 47, 48):
                label = raw[at + 2 : at + 48].split(b"\0", 1)[0]
                names[(raw[at], raw[at + 1])] = label.decode("utf-8", "replace")
    return names
