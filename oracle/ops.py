"""Operations and chain descriptions: the vocabulary of the machines and of replay files.

Everything here is plain data that round-trips through JSON, so a failing sequence can be
written to a replay file and run again without Hypothesis.
"""

from __future__ import annotations

import enum
import random
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

from pyimago.reference import PreallocateMode

__all__ = [
    "SNAPSHOT_OPS",
    "ChainSpec",
    "LayerSpec",
    "Op",
    "OpKind",
    "decode_word",
    "noise",
    "pattern",
]


class OpKind(enum.Enum):
    """Every operation the machines generate, named as in the fsx-style log."""

    READ = "read"
    WRITE = "write"
    WRITE_ZEROES = "write_zeroes"
    DISCARD_TO_ZERO = "discard_to_zero"
    DISCARD_TO_ANY = "discard_to_any"
    DISCARD_TO_BACKING = "discard_to_backing"
    WRITE_PAST_END = "write_past_end"
    RESIZE = "resize"
    FLUSH = "flush"
    INVALIDATE = "invalidate_cache"
    REOPEN = "reopen"
    SWEEP = "sweep"
    READ_PARALLEL = "read_parallelization"
    WRITE_PARALLEL = "write_parallelization"
    READINTO = "readinto"
    READV = "readv"
    """``readv`` into buffers of the sizes ``mode`` lists (``"3,510,7"``), summing to ``length``."""
    WRITEV = "writev"
    """``writev`` of buffers of the sizes ``mode`` lists, summing to ``length``."""
    ENSURE_DATA_MAPPING = "ensure_data_mapping"
    """``ensure_data_mapping(offset, length, overwrite)`` (``mode``: ``"overwrite"`` or
    ``"keep"``), then the data written through the returned storage mapping (all of it when
    overwriting, its first half when keeping)."""
    GET_MAPPING = "get_mapping"
    """``get_mapping`` and ``get_shallow_mapping`` at ``offset`` with ``max_length`` =
    ``length`` (small), checked for ``0 < length <= max_length`` (EOF past the end)."""
    SYNC = "sync"
    """``flush()`` then ``sync()``: everything so far must survive a power cut."""
    POWER_CUT = "power_cut"
    """Check the states a power cut after each storage mutation since the last check leaves."""
    WRITE_COMPRESSED = "write_compressed"
    """``write_compressed`` of the cluster at ``offset`` (``length``: the cluster, or the
    disk's tail); ``mode`` ``"noise"`` writes incompressible bytes (the plain-write
    fallback), ``"odd"`` pattern data made to compress to an odd length (see
    ``_feature_run.odd_compressed``), else :func:`pattern` data."""
    CREATE_SNAPSHOT = "create_snapshot"
    """``create_snapshot(mode)``: an internal snapshot of the top layer named ``mode``."""
    APPLY_SNAPSHOT = "apply_snapshot"
    """``apply_snapshot(mode)`` (``mode``: an ID or a name): the disk reverts to it."""
    DELETE_SNAPSHOT = "delete_snapshot"
    """``delete_snapshot(mode)`` (an ID or a name)."""
    READ_SNAPSHOT = "read_snapshot"
    """The snapshot ``mode`` opened read-only (``open_image(snapshot=...)``) and read whole."""


RANGED = frozenset(
    {
        OpKind.READ,
        OpKind.WRITE,
        OpKind.WRITE_ZEROES,
        OpKind.DISCARD_TO_ZERO,
        OpKind.DISCARD_TO_ANY,
        OpKind.DISCARD_TO_BACKING,
        OpKind.WRITE_PAST_END,
        OpKind.READINTO,
        OpKind.READV,
        OpKind.WRITEV,
        OpKind.ENSURE_DATA_MAPPING,
        OpKind.GET_MAPPING,
        OpKind.WRITE_COMPRESSED,
    }
)

#: Operations on internal snapshots; ``Op.mode`` names the snapshot.
SNAPSHOT_OPS = frozenset(
    {OpKind.CREATE_SNAPSHOT, OpKind.APPLY_SNAPSHOT, OpKind.DELETE_SNAPSHOT, OpKind.READ_SNAPSHOT}
)


@dataclass(frozen=True, slots=True)
class Op:
    """One operation.

    Ranged operations use ``offset``/``length``; ``resize`` uses ``value`` (the new size) and
    ``mode`` (a ``PreallocateMode`` value); ``write_past_end`` names the rejected operation
    in ``mode``; the parallelization settings use ``value``; a
    ``sweep`` writes ``length`` bytes every ``value`` bytes from ``offset``.  The data a write
    puts down depends only on its offsets and its step number (see :func:`pattern`).
    """

    kind: OpKind
    offset: int = 0
    length: int = 0
    value: int = 0
    mode: str | None = None

    @property
    def buffers(self) -> tuple[int, ...]:
        """The buffer sizes of a ``readv`` / ``writev`` (one buffer when none are listed)."""
        if not self.mode:
            return (self.length,)
        return tuple(int(n) for n in self.mode.split(","))

    @property
    def prealloc(self) -> PreallocateMode:
        return PreallocateMode(self.mode) if self.mode else PreallocateMode.NONE

    def describe(self) -> str:
        """fsx-style one-line description."""
        name = self.kind.value.upper()
        if self.kind is OpKind.WRITE_PAST_END:
            name = f"{(self.mode or 'write').upper()}!PAST-END"
        if self.kind in RANGED:
            end = self.offset + self.length - 1 if self.length else self.offset
            extra = f" [{self.mode}]" if self.mode and self.kind is not OpKind.WRITE_PAST_END \
                else ""
            return (
                f"{name:<20} 0x{self.offset:x} thru 0x{end:x}\t(0x{self.length:x} bytes){extra}"
            )
        if self.kind is OpKind.RESIZE:
            return f"{name:<20} to 0x{self.value:x} ({self.prealloc.value})"
        if self.kind is OpKind.SWEEP:
            return (
                f"{name:<20} 0x{self.length:x} bytes every 0x{self.value:x} from 0x{self.offset:x}"
            )
        if self.kind in (OpKind.READ_PARALLEL, OpKind.WRITE_PARALLEL):
            return f"{name:<20} {self.value}"
        if self.kind in SNAPSHOT_OPS:
            return f"{name:<20} {self.mode!r}"
        return name

    def touches(self, offset: int) -> bool:
        """Whether this operation covers guest ``offset`` (used to mark the log)."""
        if self.kind in RANGED:
            return self.offset <= offset < self.offset + self.length
        if self.kind is OpKind.SWEEP and self.value > 0 and offset >= self.offset:
            return (offset - self.offset) % self.value < self.length
        return False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.kind.value}
        if self.kind in RANGED or self.kind is OpKind.SWEEP:
            out["offset"] = self.offset
            out["length"] = self.length
        if self.kind in (
            OpKind.RESIZE,
            OpKind.SWEEP,
            OpKind.READ_PARALLEL,
            OpKind.WRITE_PARALLEL,
        ):
            out["value"] = self.value
        if self.mode is not None:
            out["mode"] = self.mode
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Op:
        return cls(
            OpKind(obj["op"]),
            int(obj.get("offset", 0)),
            int(obj.get("length", 0)),
            int(obj.get("value", 0)),
            obj.get("mode"),
        )


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer of a chain: its format, geometry and the operations that fill it.

    ``build`` runs on the layer (writable) before the next overlay is created on it; the top
    layer's ``build`` is normally empty (the machine's steps take over from there).
    """

    format: str
    size: int
    cluster_size: int = 65536
    compat: str = "1.1"
    preallocation: str = "off"
    build: tuple[Op, ...] = field(default_factory=tuple)
    refcount_bits: int = 16
    """qcow2 v3 refcount width (1..64 bits): narrow ones pack several refcounts per byte and
    fill refcount blocks fast (more blocks, a refcount table that must grow)."""
    extended_l2: bool = False
    """qcow2 v3 extended L2 entries: 32 subclusters per cluster, the model's unit."""
    data_file: str = ""
    """An external data file: ``""`` none, ``"file"`` one, ``"raw"`` one with
    ``data_file_raw`` (QEMU then preallocates the metadata)."""
    lazy_refcounts: bool = False
    """qcow2 v3 lazy refcounts (the dirty bit while open)."""
    compression_type: str = "zlib"
    """``"zlib"`` or ``"zstd"`` (qcow2 v3): how compressed clusters are stored."""
    maker: str = "target"
    """Who creates and fills the layer: ``"target"`` (the implementation under test) or
    ``"qemu"`` (``qemu-img create`` and ``qemu-io``, file chains below the top only)."""

    @property
    def granularity(self) -> int:
        """The model's unit: the subcluster with extended L2, else the cluster (raw: 512)."""
        if self.format == "raw":
            return 512
        return self.cluster_size // 32 if self.extended_l2 else self.cluster_size

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps (16-byte entries with extended L2, else 8)."""
        return self.cluster_size * (self.cluster_size // (16 if self.extended_l2 else 8))

    def features(self) -> tuple[str, ...]:
        """The issue-13 features this layer uses (for summaries and capability checks)."""
        out = []
        if self.extended_l2:
            out.append("extended_l2")
        if self.data_file:
            out.append("data_file_raw" if self.data_file == "raw" else "data_file")
        if self.lazy_refcounts:
            out.append("lazy_refcounts")
        if self.compression_type != "zlib":
            out.append("zstd")
        return tuple(out)

    def create_options(self, data_file_name: str = "data.bin") -> dict[str, Any]:
        """The ``-o`` options of the features (qemu-img names, as ``create_image`` takes);
        the data file (if any) is ``data_file_name``, relative to the layer's folder."""
        options: dict[str, Any] = {}
        if self.extended_l2:
            options["extended_l2"] = True
        if self.data_file:
            options["data_file"] = data_file_name
            if self.data_file == "raw":
                options["data_file_raw"] = True
        if self.lazy_refcounts:
            options["lazy_refcounts"] = True
        if self.compression_type != "zlib":
            options["compression_type"] = self.compression_type
        return options

    def describe(self) -> str:
        if self.format == "raw":
            return f"raw {self.size:#x} bytes"
        version = "v3" if self.compat != "0.10" else "v2"
        extra = f", preallocation={self.preallocation}" if self.preallocation != "off" else ""
        if self.refcount_bits != 16:
            extra += f", refcount_bits={self.refcount_bits}"
        for name in self.features():
            extra += f", {name}"
        if self.maker != "target":
            extra += f", made by {self.maker}"
        return f"qcow2 {version} {self.size:#x} bytes, {self.cluster_size} B clusters{extra}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "compat": self.compat,
            "preallocation": self.preallocation,
            "build": [op.to_json() for op in self.build],
            "refcount_bits": self.refcount_bits,
            **{key: value for key, value in (
                ("extended_l2", self.extended_l2), ("data_file", self.data_file),
                ("lazy_refcounts", self.lazy_refcounts),
                ("compression_type", self.compression_type), ("maker", self.maker),
            ) if value != _LAYER_DEFAULTS[key]},
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LayerSpec:
        return cls(
            str(obj["format"]),
            int(obj["size"]),
            int(obj.get("cluster_size", 65536)),
            str(obj.get("compat", "1.1")),
            str(obj.get("preallocation", "off")),
            tuple(Op.from_json(o) for o in obj.get("build", ())),
            int(obj.get("refcount_bits", 16)),
            bool(obj.get("extended_l2", False)),
            str(obj.get("data_file", "")),
            bool(obj.get("lazy_refcounts", False)),
            str(obj.get("compression_type", "zlib")),
            str(obj.get("maker", "target")),
        )


# Only the features a layer uses go into replay files (older files read the same).
_LAYER_DEFAULTS: dict[str, Any] = {
    "extended_l2": False, "data_file": "", "lazy_refcounts": False,
    "compression_type": "zlib", "maker": "target",
}


@dataclass(frozen=True, slots=True)
class ChainSpec:
    """A backing chain, base first, and where it lives (``"memory"`` or ``"file"``)."""

    layers: tuple[LayerSpec, ...]
    storage: str = "memory"
    l2_cache_tables: int | None = None
    """When set, ask the target to open qcow2 layers with this many cached L2 tables."""

    @property
    def top(self) -> LayerSpec:
        return self.layers[-1]

    def describe(self) -> str:
        parts = " <- ".join(layer.describe() for layer in self.layers)
        cache = f", L2 cache {self.l2_cache_tables}" if self.l2_cache_tables else ""
        return f"[{self.storage}{cache}] {parts}"

    def to_json(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "l2_cache_tables": self.l2_cache_tables,
            "layers": [layer.to_json() for layer in self.layers],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ChainSpec:
        cache = obj.get("l2_cache_tables")
        return cls(
            tuple(LayerSpec.from_json(layer) for layer in obj["layers"]),
            str(obj.get("storage", "memory")),
            int(cache) if cache is not None else None,
        )


def _step_byte(step: int) -> int:
    # Never zero, so written data never reads as a zero cluster.
    return step % 255 + 1


#: Words of :func:`pattern` data (step byte 0) from guest offset 0 on, grown as needed: a
#: pattern is a slice of it with the step byte stamped in, not a new range of numbers.
_WORDS = bytearray()
#: Indices wrap at 2^24 words (64 MiB); longer templates than this are not kept.
_MAX_TEMPLATE_WORDS = 1 << 22


def _template(last: int) -> bytearray | None:
    global _WORDS
    if last > _MAX_TEMPLATE_WORDS:
        return None
    have = len(_WORDS) // 4
    if last > have:
        want = min(max(last, 2 * have, 1 << 16), _MAX_TEMPLATE_WORDS)
        words = array("I", range(have, want))
        if sys.byteorder == "little":
            words.byteswap()
        _WORDS = _WORDS + words.tobytes()
    return _WORDS


def pattern(step: int, offset: int, length: int) -> bytes:
    """The bytes step ``step`` writes at guest ``offset`` (fsx-style, self-describing).

    The disk is seen as 4-byte words; the word at ``4*i`` is the step byte (``step % 255 + 1``)
    followed by ``i`` as a 24-bit big-endian number, so any 4 aligned bytes read back from
    the wrong place tell which step wrote them and for which offset (:func:`decode_word`).
    """
    if length <= 0:
        return b""
    first = offset // 4
    last = (offset + length + 3) // 4
    template = _template(last)
    if template is not None:
        buf = template[first * 4 : last * 4]
    else:
        # The step byte overwrites each word's top byte, so indices simply wrap at 2^24.
        words = array("I", range(first & 0xFFFFFFFF, (first & 0xFFFFFFFF) + (last - first)))
        if sys.byteorder == "little":
            words.byteswap()
        buf = bytearray(words.tobytes())
    buf[0::4] = bytes([_step_byte(step)]) * (last - first)
    skip = offset - first * 4
    return bytes(buf[skip : skip + length])


def noise(step: int, offset: int, length: int) -> bytes:
    """Incompressible bytes for step ``step`` at ``offset`` (a compressed write's fallback)."""
    return random.Random(step * 1_000_003 + offset).randbytes(length)


def decode_word(word: bytes) -> tuple[int, int] | None:
    """``(step % 255, offset)`` a 4-byte aligned word of :func:`pattern` data names, or None."""
    if len(word) != 4 or word[0] == 0:
        return None
    return word[0] - 1, int.from_bytes(word[1:], "big") * 4
