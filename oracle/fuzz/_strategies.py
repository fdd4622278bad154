"""Chains for a driver target: only what its capabilities claim.

The top layer is always the driver's format, in one of its layouts; below it (when the
driver takes backing files) up to two more layers: raw or qcow2 images made with the
reference, or the driver's own.  Lower layers are filled with the operations the layer's
maker supports; qcow2 layers of targets that want them get compressed clusters.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ..ops import ChainSpec, LayerSpec, Op, OpKind
from ..strategies import (
    CLUSTER_SIZES,
    build_ops,
    disk_sizes,
    max_disk_size,
    top_compressed_build,
)
from ._target import DriverCapabilities, Layout

__all__ = ["driver_chain_specs"]

_SECTOR = 512
_REFERENCE_QCOW2 = tuple(
    Layout(cs, zero_clusters=compat != "0.10", cluster_size=cs, compat=compat)
    for cs in CLUSTER_SIZES
    for compat in ("1.1", "0.10")
)


def _build_kinds(caps: DriverCapabilities | None) -> tuple[OpKind, ...]:
    kinds = [OpKind.WRITE, OpKind.WRITE_ZEROES, OpKind.WRITE]
    if caps is None or "zero" in caps.discards:
        kinds.append(OpKind.DISCARD_TO_ZERO)
    return tuple(kinds)


@st.composite
def driver_chain_specs(
    draw: st.DrawFn,
    caps: DriverCapabilities,
    *,
    l2_cache_tables: tuple[int | None, ...] = (1, 2, None, 1, 2, 4),
) -> ChainSpec:
    """A chain whose top layer is the driver's (see the module docstring)."""
    own = caps.format
    depth = draw(st.integers(1, 3)) if caps.backing else 1
    layers: list[LayerSpec] = []
    for index in range(depth):
        fmt = own
        if index == 0 and depth > 1:
            fmt = draw(st.sampled_from(caps.backing_formats))
        if fmt == "raw":
            granularity, compat = _SECTOR, "1.1"
        else:
            layout = draw(st.sampled_from(caps.layouts if fmt == own else _REFERENCE_QCOW2))
            granularity, compat = layout.granularity, layout.compat
        limit = max_disk_size(granularity)
        same_as_below = draw(st.booleans())
        if layers and same_as_below:
            size = min(layers[-1].size, limit)
        else:
            size = draw(disk_sizes(granularity))
        prealloc = "off"
        # Preallocation hides a backing file, so only a base layer is created preallocated.
        if index == 0 and fmt != "raw" and draw(st.integers(0, 5)) == 0:
            offered: tuple[str, ...] = ("metadata", "falloc", "full")
            if fmt == own:
                offered = tuple(p for p in offered if p in caps.create_preallocation)
            if offered:
                prealloc = draw(st.sampled_from(offered))
        compress = caps.compressed and fmt == "qcow2"
        build: tuple[Op, ...] = ()
        if index < depth - 1:
            build = draw(
                build_ops(
                    size,
                    granularity,
                    kinds=_build_kinds(caps if fmt == own else None),
                    compress=compress,
                )
            )
            if fmt != "raw" and draw(st.booleans()):
                # Whole zeroed clusters below: explicit zeroes of a lower layer, which the top
                # must report as plain (not explicit) zeroes.  Near the start, which every
                # overlay covers whatever its size.
                first = draw(st.integers(0, max(min(size // granularity - 1, 7), 0)))
                count = draw(st.integers(1, 4))
                offset = first * granularity
                build += (Op(OpKind.WRITE_ZEROES, offset,
                             min(count * granularity, size - offset)),)
        elif compress and draw(st.booleans()):
            build = draw(top_compressed_build(size, granularity))
        layers.append(
            LayerSpec(
                format=fmt,
                size=size,
                cluster_size=granularity if fmt != "raw" else 65536,
                compat=compat,
                preallocation=prealloc,
                build=build,
            )
        )
    storage = draw(st.sampled_from(caps.storages))
    cache = draw(st.sampled_from(l2_cache_tables))
    return ChainSpec(tuple(layers), storage, cache)
