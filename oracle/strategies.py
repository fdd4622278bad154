"""Hypothesis strategies for chains and operations, aware of the disk's geometry.

Offsets are drawn around the places bugs live: cluster boundaries, L2-table boundaries
(``cluster_size / 8`` clusters per table), the disk end, sector boundaries, with small
deltas either side; lengths are tiny, sector-sized, cluster-sized or just off them.  Sizes
stay small (a few hundred clusters at most) so that checking the whole disk after every
step stays cheap.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from hypothesis import strategies as st
from pyimago.reference import PreallocateMode

from .ops import ChainSpec, LayerSpec, Op, OpKind

if TYPE_CHECKING:
    from .features import FeatureSupport

__all__ = [
    "CLUSTER_SIZES",
    "COMPRESSED",
    "PAST_END_NAMES",
    "Geometry",
    "build_ops",
    "chain_specs",
    "disk_sizes",
    "grow_ops",
    "mapping_lengths",
    "max_disk_size",
    "modify_ranges",
    "past_end_ops",
    "read_ranges",
    "shrink_ops",
    "split_buffers",
    "straddle_ranges",
    "sweep_ops",
    "top_compressed_build",
]

#: Cluster sizes to draw from, biased to small ones: they are fast, and small clusters put
#: L2-table boundaries (every cluster_size/8 clusters) inside small disks.
CLUSTER_SIZES = (512, 512, 512, 1024, 1024, 2048, 4096, 65536, 2 << 20)

_SECTOR = 512
_MAX_OP_LENGTH = 4 << 20


def max_disk_size(cluster_size: int) -> int:
    """Largest disk the strategies make for a cluster size (a few hundred clusters)."""
    return max(min(192 * cluster_size, 2 << 20), 2 * cluster_size)


@dataclass(frozen=True, slots=True)
class Geometry:
    """What the strategies need to know about the top layer."""

    size: int
    granularity: int
    max_size: int
    hot: tuple[int, ...] = ()
    """Offsets recent operations touched: when given, ranges are often drawn around them, so
    that operations meet (a write, then zeroing or discarding the same clusters)."""
    sharp: bool = False
    """Ranges also *end* at the places ranges start at, and one byte either side of a
    boundary is drawn more often: off-by-one bugs live at both ends of a range."""
    table_span: int = 0
    """Guest bytes one L2 table maps, when the unit is not the cluster (extended L2)."""

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps (``cluster_size / 8`` entries of a cluster each)."""
        return self.table_span or self.granularity * (self.granularity // 8)


def _sizes(cluster_size: int) -> st.SearchStrategy[int]:
    limit = max_disk_size(cluster_size) // _SECTOR
    per_cluster = max(cluster_size // _SECTOR, 1)
    clusters = max(limit // per_cluster, 1)
    # Mostly several clusters (small clusters: several L2 tables), whole or just off; now
    # and then anything down to a single sector.
    return st.one_of(
        st.integers(min(2, clusters), clusters).flatmap(
            lambda n: st.sampled_from([n * per_cluster, n * per_cluster - 1, n * per_cluster + 1])
        ),
        st.integers(clusters // 3 or 1, clusters).map(lambda n: n * per_cluster),
        st.integers(1, limit),
    ).map(lambda sectors: min(max(sectors, 1), limit) * _SECTOR)


def disk_sizes(cluster_size: int) -> st.SearchStrategy[int]:
    """Disk sizes (whole sectors) for a layer with this allocation unit."""
    return _sizes(cluster_size)


def _anchor(draw: st.DrawFn, geo: Geometry, *, past_end: bool) -> int:
    size, g = geo.size, geo.granularity
    places: tuple[str, ...] = ("cluster", "l2", "end", "sector", "anywhere", "zero")
    if geo.hot:
        places += ("hot", "hot")
    where = draw(st.sampled_from(places))
    if where == "hot":
        return min(draw(st.sampled_from(geo.hot)), size)
    if where == "cluster":
        return draw(st.integers(0, size // g)) * g
    if where == "l2":
        return draw(st.integers(0, size // geo.l2_span)) * geo.l2_span
    if where == "end":
        return size
    if where == "sector":
        return draw(st.integers(0, max(size // _SECTOR, 0))) * _SECTOR
    if where == "anywhere":
        return draw(st.integers(0, size + (g if past_end else 0)))
    return 0


def _delta(draw: st.DrawFn, g: int, sharp: bool = False) -> int:
    if sharp and draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from((-1, 1)))
    return draw(
        st.one_of(
            st.just(0),
            st.integers(-8, 8),
            st.sampled_from((-_SECTOR, _SECTOR, -g, g, 1 - g, g - 1)),
            st.integers(-g, g),
        )
    )


def _length(draw: st.DrawFn, g: int) -> int:
    n = draw(
        st.one_of(
            st.integers(1, 16),
            st.integers(1, 8).map(lambda k: k * _SECTOR),
            st.sampled_from((g, 2 * g, g + 1, g - 1, 3 * g)),
            st.integers(1, 2 * g),
        )
    )
    return max(1, min(n, _MAX_OP_LENGTH))


@st.composite
def _range(draw: st.DrawFn, geo: Geometry, inside: bool) -> tuple[int, int]:
    size, g = geo.size, geo.granularity
    shape = draw(st.integers(0, 8 if geo.sharp else 5))
    if shape == 8:
        shape = 0  # whole clusters twice as often: metadata bugs live there
    if shape >= 6:
        end = _anchor(draw, geo, past_end=False) + _delta(draw, g, geo.sharp)
        length = _length(draw, g)
        offset = max(min(end, size) - length, 0)
    elif shape == 0:
        # Whole clusters: the case discards and zeroing handle in the format's metadata.
        near_hot = draw(st.booleans()) if geo.hot else False
        if near_hot:
            # The cluster a recent write touched is the first or the last of the range.
            hot = min(draw(st.sampled_from(geo.hot)), max(size - 1, 0))
            length = draw(st.integers(1, 8)) * g
            offset = hot - hot % g
            if draw(st.booleans()):
                offset += g - length
        else:
            offset = draw(st.integers(0, max(size // g - 1, 0))) * g
            length = draw(st.integers(1, 8)) * g
        if geo.sharp:
            # Almost whole clusters: one byte short at either end, where a "<=" for "<"
            # takes a partial cluster for a whole one.
            trim = draw(st.sampled_from(("none", "head", "tail")))
            if trim == "head":
                offset, length = offset + 1, length - 1
            elif trim == "tail":
                length -= 1
    elif shape == 1:
        # Straddle a boundary: start a little before it, end a little after.
        boundary = _anchor(draw, geo, past_end=False)
        before = draw(st.integers(1, g))
        after = draw(st.integers(1, g))
        offset = max(boundary - before, 0)
        length = boundary + after - offset
    else:
        offset = _anchor(draw, geo, past_end=not inside) + _delta(draw, g, geo.sharp)
        length = _length(draw, g)
    offset = max(offset, 0)
    if inside:
        offset = min(offset, size - 1)
        length = max(1, min(length, size - offset))
    else:
        offset = min(offset, size + 2 * g)
    return offset, min(length, _MAX_OP_LENGTH)


def read_ranges(geo: Geometry) -> st.SearchStrategy[tuple[int, int]]:
    """Ranges to read: anywhere, the disk end and beyond included."""
    return _range(geo, False)


def modify_ranges(geo: Geometry) -> st.SearchStrategy[tuple[int, int]]:
    """Ranges inside the disk, for writes, zeroing and discards."""
    return _range(geo, True)


@st.composite
def split_buffers(draw: st.DrawFn, length: int) -> str:
    """``length`` bytes split into 2..4 buffers of odd sizes, as ``Op.mode`` lists them."""
    parts = min(draw(st.integers(2, 4)), length)
    if parts <= 1:
        return str(length)
    cuts = draw(st.lists(st.integers(1, length - 1), min_size=parts - 1, max_size=parts - 1,
                         unique=True))
    bounds = [0, *sorted(cuts), length]
    return ",".join(str(b - a) for a, b in itertools.pairwise(bounds))


@st.composite
def straddle_ranges(draw: st.DrawFn, geo: Geometry) -> tuple[int, int]:
    """Ranges inside the disk across an L2-table boundary or ending at the disk end: where
    an operation's work is split between two tables, or clipped by the disk's end."""
    size, g = geo.size, geo.granularity
    tables = size // geo.l2_span
    if tables and draw(st.booleans()):
        boundary = draw(st.integers(1, tables)) * geo.l2_span
        before = draw(st.one_of(st.integers(1, 2 * g), st.sampled_from((g, 1, _SECTOR))))
        after = draw(st.one_of(st.integers(1, 2 * g), st.sampled_from((g, 1, _SECTOR))))
        offset = max(boundary - before, 0)
        end = min(boundary + after, size)
    else:
        back = draw(st.one_of(st.integers(1, 3 * g), st.sampled_from((g, 1, _SECTOR, g + 1))))
        offset, end = max(size - back, 0), size
    return offset, max(min(end - offset, _MAX_OP_LENGTH), 1)


def mapping_lengths(geo: Geometry) -> st.SearchStrategy[int]:
    """Small ``max_length`` values for ``get_mapping``: a byte, a sector, a unit and around."""
    g = geo.granularity
    return st.one_of(st.sampled_from((1, 2, _SECTOR - 1, _SECTOR, g - 1, g, g + 1)),
                     st.integers(1, 3 * g))


PAST_END_NAMES = (
    "write", "write_zeroes", "discard_to_zero", "discard_to_any", "discard_to_backing"
)


@st.composite
def past_end_ops(
    draw: st.DrawFn, geo: Geometry, names: tuple[str, ...] = PAST_END_NAMES
) -> Op:
    """A modifying request that runs past the disk end (must be rejected, nothing written).

    ``names``: the operations to draw from (a driver may not implement every discard).
    """
    size, g = geo.size, geo.granularity
    offset = draw(st.integers(max(size - g, 0), size + g))
    length = max(size - offset, 0) + draw(st.integers(1, g))
    name = draw(st.sampled_from(names))
    return Op(OpKind.WRITE_PAST_END, offset, length, mode=name)


@st.composite
def grow_ops(
    draw: st.DrawFn, geo: Geometry, modes: tuple[PreallocateMode, ...] = tuple(PreallocateMode)
) -> Op:
    """Grow in whole sectors, with each preallocation mode of ``modes`` (a no-op resize at
    the limit)."""
    size, g = geo.size, geo.granularity
    to_boundary = -size % g or g
    step = draw(
        st.one_of(
            st.integers(1, 16).map(lambda k: k * _SECTOR),
            st.sampled_from(tuple(sorted({g, 2 * g, to_boundary, to_boundary + _SECTOR}))),
        )
    )
    new = max(min(size + step, geo.max_size), size)
    mode = draw(st.sampled_from(modes))
    return Op(OpKind.RESIZE, value=new, mode=mode.value)


@st.composite
def shrink_ops(draw: st.DrawFn, geo: Geometry) -> Op:
    """Shrink in whole sectors: by a little, to a cluster boundary, or into a cluster."""
    size, g = geo.size, geo.granularity
    places: tuple[str, ...] = ("little", "boundary", "mid-cluster")
    if geo.hot:
        places += ("hot", "hot")
    where = draw(st.sampled_from(places))
    if where == "hot":
        # Through data a recent write put down: its tail must not come back.
        new = draw(st.sampled_from(geo.hot)) // _SECTOR * _SECTOR + _SECTOR
    elif where == "little":
        new = size - draw(st.integers(1, 16)) * _SECTOR
    else:
        boundary = draw(st.integers(0, max((size - 1) // g, 0))) * g
        inside = 0
        if where == "mid-cluster" and g > _SECTOR:
            inside = draw(st.integers(1, g // _SECTOR - 1)) * _SECTOR
        new = boundary + inside
    new = min(max(new, _SECTOR), size)
    return Op(OpKind.RESIZE, value=new, mode=PreallocateMode.NONE.value)


@st.composite
def sweep_ops(draw: st.DrawFn, geo: Geometry) -> Op:
    """Small writes one L2 table apart (one cluster apart where tables are huge)."""
    stride = geo.l2_span if geo.l2_span < geo.size else geo.granularity
    stride = max(stride, geo.size // 64, 1)
    offset = draw(st.integers(0, min(stride, geo.size) - 1))
    length = draw(st.integers(1, min(_SECTOR, stride)))
    return Op(OpKind.SWEEP, offset, length, value=stride)


#: ``Op.mode`` of a build write whose whole clusters are then stored compressed (qcow2).
COMPRESSED = "compressed"


@st.composite
def build_ops(
    draw: st.DrawFn,
    size: int,
    granularity: int,
    *,
    kinds: tuple[OpKind, ...] = (
        OpKind.WRITE, OpKind.WRITE_ZEROES, OpKind.WRITE, OpKind.DISCARD_TO_ZERO
    ),
    compress: bool = False,
    cluster: int = 0,
) -> tuple[Op, ...]:
    """What fills a lower layer: writes, plus zeroing (explicit zero clusters in v3).

    With ``compress``, some writes are marked :data:`COMPRESSED`: once the layer is built,
    the whole clusters they cover are rewritten as compressed clusters.  ``cluster``: the
    cluster size when the unit is smaller (extended L2).
    """
    geo = Geometry(size, granularity, size)
    cluster = cluster or granularity
    count = draw(st.integers(1, 5))
    ops = []
    for _ in range(count):
        kind = draw(st.sampled_from(kinds))
        offset, length = draw(modify_ranges(geo))
        mode = None
        if compress and kind is OpKind.WRITE and draw(st.booleans()):
            # Whole clusters, so that something is left to compress.
            offset -= offset % cluster
            length = min(max(length, cluster) + draw(st.integers(0, 3)) * cluster,
                         size - offset)
            mode = COMPRESSED
        ops.append(Op(kind, offset, length, mode=mode))
    return tuple(ops)


#: Refcount widths to draw (qcow2 v3): every width qemu-img allows, 16 (the default) twice.
REFCOUNT_BITS = (16, 1, 2, 4, 8, 16, 32, 64)


def outgrows_refcount_table(layer: LayerSpec) -> bool:
    """Whether writing every cluster of a freshly created ``layer`` needs more host
    clusters than its first refcount table cluster can count (its refcount blocks are
    added and the table moves): the large chains of :func:`chain_specs`."""
    if layer.format != "qcow2" or layer.compat == "0.10":
        return False
    cs = layer.cluster_size
    counted = (cs // 8) * (cs * 8 // layer.refcount_bits)
    return layer.size // cs > counted


@st.composite
def top_compressed_build(draw: st.DrawFn, size: int, granularity: int) -> tuple[Op, ...]:
    """Compressed clusters in the top layer too: reads of them, and copy-on-write from them
    when they are partly overwritten."""
    first = draw(st.integers(0, max(size // granularity - 1, 0)))
    count = draw(st.integers(1, 6))
    offset = first * granularity
    length = min(count * granularity, size - offset)
    ops: tuple[Op, ...] = (Op(OpKind.WRITE, offset, length, mode=COMPRESSED),)
    if length > granularity and draw(st.integers(0, 3)) > 0:
        # Zero clusters right before compressed ones whose data is packed after another's
        # at any byte (every other cluster from the second, else the first): a zero run
        # must stop at a compressed cluster whatever the bits of its descriptor.
        step = 2 * granularity
        first_zero = granularity if length > step else 0
        ops += tuple(Op(OpKind.WRITE_ZEROES, offset + at, granularity)
                     for at in range(first_zero, length - granularity, step))
    return ops


@st.composite
def chain_specs(
    draw: st.DrawFn,
    *,
    storages: tuple[str, ...] = ("memory", "memory", "file"),
    depths: tuple[int, int] = (1, 3),
    base_formats: tuple[str, ...] = ("qcow2", "raw"),
    compats: tuple[str, ...] = ("1.1", "0.10"),
    cluster_sizes: tuple[int, ...] = CLUSTER_SIZES,
    l2_cache_tables: tuple[int | None, ...] = (1, 2, None, 1, 2, 4),
    compress: bool = True,
    refcount_bits: tuple[int, ...] = REFCOUNT_BITS,
    refcount_growth: bool = True,
    features: FeatureSupport | None = None,
    qemu_layers: bool = False,
) -> ChainSpec:
    """Chains of 1 to 3 layers: a raw or qcow2 base under qcow2 overlays.

    Overlays are as long as, shorter or longer than what they sit on; lower layers get a few
    writes and zeroings first; chains live in memory or in files.  qcow2 v3 layers take every
    refcount width; with ``compress``, qcow2 layers get compressed clusters (the lower ones
    among their build writes, the top one now and then).  With ``refcount_growth``, one
    chain in twelve is a single large qcow2 of 512-byte clusters and 32- or 64-bit refcounts,
    which the machine's ``fill_disk`` rule makes outgrow its refcount table.

    ``features``: what the target supports of issue 13's layer options (see
    :func:`pyimago.oracle.features.probe_features`); v3 layers it makes draw those it writes.
    With ``qemu_layers``, layers below the top of file chains are now and then made by QEMU
    (``LayerSpec.maker``), with any option the target reads.
    """
    if (refcount_growth and "1.1" in compats and "qcow2" in base_formats
            and draw(st.integers(0, 11)) == 0):
        # Small clusters and wide refcounts over a disk whose filling outgrows the first
        # refcount table cluster (512 / 8 blocks of 512 * 8 / bits clusters: 2 MiB at 64
        # bits): refcount blocks are added and the refcount table moves, in one write.
        bits = draw(st.sampled_from((32, 64)))
        sectors = draw(st.integers(4200, 5200)) if bits == 64 else draw(st.integers(8300, 8800))
        layer = LayerSpec("qcow2", sectors * _SECTOR, 512, "1.1", refcount_bits=bits)
        return ChainSpec((layer,), "memory", draw(st.sampled_from(l2_cache_tables)))
    depth = draw(st.integers(*depths))
    storage = draw(st.sampled_from(storages))
    layers: list[LayerSpec] = []
    for index in range(depth):
        fmt = draw(st.sampled_from(base_formats)) if index == 0 else "qcow2"
        if fmt == "raw":
            cluster = _SECTOR
            compat = "1.1"
        else:
            cluster = draw(st.sampled_from(cluster_sizes))
            compat = draw(st.sampled_from(compats))
        limit = max_disk_size(cluster)
        same_as_below = draw(st.booleans())
        size = min(layers[-1].size, limit) if layers and same_as_below else draw(_sizes(cluster))
        prealloc = "off"
        # qemu-img (and the reference) refuse preallocation together with a backing file.
        if fmt == "qcow2" and index == 0 and draw(st.integers(0, 5)) == 0:
            prealloc = draw(st.sampled_from(("metadata", "falloc", "full")))
        build: tuple[Op, ...] = ()
        squeeze = compress and fmt == "qcow2"
        bits = 16
        if fmt == "qcow2" and compat == "1.1":
            bits = draw(st.sampled_from(refcount_bits))
        layer = LayerSpec(
            format=fmt,
            size=size,
            cluster_size=cluster if fmt == "qcow2" else 65536,
            compat=compat,
            preallocation=prealloc,
            refcount_bits=bits,
        )
        if features is not None and fmt == "qcow2" and compat == "1.1":
            layer = draw(_layer_features(layer, features, index=index, top=index == depth - 1,
                                         storage=storage, qemu=qemu_layers))
            size = layer.size
            # QEMU writes no compressed cluster into an external data file; the rewriting
            # into compressed clusters (fuzz._compress) knows no extended L2 entries.
            squeeze = squeeze and not layer.data_file and (
                layer.maker == "qemu" or not layer.extended_l2)
        g = layer.granularity
        if index < depth - 1:
            build = draw(build_ops(size, g, compress=squeeze, cluster=layer.cluster_size))
        elif squeeze and draw(st.booleans()):
            build = draw(top_compressed_build(size, layer.cluster_size))
        layers.append(replace(layer, build=build))
    cache = draw(st.sampled_from(l2_cache_tables))
    return ChainSpec(tuple(layers), storage, cache)


#: Cluster sizes for extended L2 (QEMU's minimum is 16 KiB: qcow2.extended-l2.min-cluster).
EXTENDED_L2_CLUSTERS = (16384, 16384, 32768, 65536)


@st.composite
def _layer_features(
    draw: st.DrawFn, layer: LayerSpec, support: FeatureSupport, *, index: int, top: bool,
    storage: str, qemu: bool,
) -> LayerSpec:
    """Issue 13's options for a v3 qcow2 layer: those the target writes, or, for a layer
    QEMU makes (file chains, below the top), those the target reads."""
    maker = "target"
    allowed = support.writable
    if qemu and storage == "file" and not top and draw(st.booleans()):
        maker, allowed = "qemu", support.readable
    if not allowed and maker == "target":
        return layer
    options: dict[str, object] = {"maker": maker}
    if "extended_l2" in allowed and draw(st.integers(0, 2)) == 0:
        cluster = draw(st.sampled_from(EXTENDED_L2_CLUSTERS))
        options.update(extended_l2=True, cluster_size=cluster,
                       size=min(layer.size, max_disk_size(cluster)))
    files = [f for f in ("data_file", "data_file_raw") if f in allowed]
    if index > 0:
        # QEMU: "Backing file and data-file-raw cannot be used at the same time".
        files = [f for f in files if f != "data_file_raw"]
    if storage == "file" and files and draw(st.integers(0, 2)) == 0:
        options["data_file"] = "raw" if draw(st.sampled_from(files)) == "data_file_raw" \
            else "file"
    if "lazy_refcounts" in allowed and draw(st.integers(0, 3)) == 0:
        options["lazy_refcounts"] = True
    if "zstd" in allowed and draw(st.integers(0, 2)) == 0:
        options["compression_type"] = "zstd"
    return replace(layer, **options)  # type: ignore[arg-type]
