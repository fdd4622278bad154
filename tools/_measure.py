"""``measure``: how large a new image must be to hold a disk (``qemu-img measure``).

The arithmetic is QEMU's (block/qcow2.c ``qcow2_measure`` and ``qcow2_calc_prealloc_size``,
block/qcow2-refcount.c ``qcow2_refcount_metadata_size``; raw-format.c ``raw_measure``):
``fully-allocated`` is the file of a disk with every cluster and all metadata allocated;
``required`` removes the data clusters the source does not need.
"""

from __future__ import annotations

import json
from typing import Any

from ._bitmaps import read_bitmaps
from ._common import Impl, ToolError, check_format, open_chain
from ._map import block_status

__all__ = ["measure", "qcow2_prealloc_size", "render_measure"]

_L2E_SIZE = 8
_L1E_SIZE = 8
_REFTABLE_ENTRY_SIZE = 8
_BME_TABLE_ENTRY_SIZE = 8
_DEFAULT_CLUSTER = 65536
_MAX_L1_BYTES = 32 << 20


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """qcow2_refcount_metadata_size: refcount blocks and table clusters that count
    ``clusters`` clusters and themselves (the fixed point)."""
    per_table_cluster = cluster_size // _REFTABLE_ENTRY_SIZE
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n, last = 0, -1
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
    return (blocks + table) * cluster_size


def qcow2_prealloc_size(size: int, cluster_size: int, refcount_order: int,
                        extended_l2: bool = False) -> int:
    """qcow2_calc_prealloc_size: the file size of a fully allocated qcow2 image (extended
    L2 entries are twice as wide: L2E_SIZE_EXTENDED)."""
    l2e = _L2E_SIZE * (2 if extended_l2 else 1)
    aligned = _round_up(size, cluster_size)
    meta = cluster_size  # the header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // _L1E_SIZE)
    meta += nl1e * _L1E_SIZE
    meta += _refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                    refcount_order)
    return meta + aligned


def _bitmaps_size(bitmaps: list[dict[str, Any]], disk_size: int, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size: every bitmap fully allocated (its clusters
    and its bitmap table), plus the bitmap directory, in output clusters."""
    total = directory = 0
    for bitmap in bitmaps:
        bits = -(-disk_size // bitmap["granularity"])
        clusters = -(-_round_up(bits, 8) // 8 // cluster_size)
        # "Assume the entire bitmap is allocated" / "reserve space for the bitmap table".
        total += clusters * cluster_size + _round_up(clusters * _BME_TABLE_ENTRY_SIZE,
                                                     cluster_size)
        # calc_dir_entry_size: the 24-byte entry, the name, padded to 8 bytes.
        directory += _round_up(24 + len(bitmap["name"].encode("utf-8")), 8)
    return total + _round_up(directory, cluster_size)


def _data_bytes(image: Any, filename: str, cluster_size: int) -> int:
    """qcow2_measure's ``required``: whole clusters holding data that does not read zero."""
    required = 0
    counted_to = 0
    for entry in block_status(image, filename):
        if entry.zero or not entry.data:
            continue
        start = max(entry.start, counted_to)
        end = _round_up(entry.start + entry.length, cluster_size)
        if start < end:
            required += end - (start - start % cluster_size)
            counted_to = end
    return required


def measure(
    path: str | None = None,
    *,
    size: int | None = None,
    out_fmt: str = "raw",
    options: dict[str, object] | None = None,
    impl: Impl = "fast",
    fmt: str | None = None,
    force_share: bool = False,
) -> dict[str, int]:
    """``qemu-img measure --output=json`` for ``path`` (or an empty disk of ``size``)
    converted to ``out_fmt`` with create ``options``."""
    check_format(out_fmt, "output format")
    if (path is None) == (size is None):
        raise ToolError("give either an image or --size, not both and not neither")
    opts = dict(options or {})
    cluster_size = int(opts.pop("cluster_size", _DEFAULT_CLUSTER))  # type: ignore[call-overload]
    if cluster_size < 512 or cluster_size & (cluster_size - 1) or cluster_size > 2 << 20:
        raise ToolError(f"cluster_size must be a power of two in [512, 2M], not {cluster_size}")
    compat = str(opts.pop("compat", "1.1"))
    if compat not in ("0.10", "1.1", "v2", "v3"):
        raise ToolError(f"compat must be '0.10' or '1.1', not {compat!r}")
    refcount_bits = int(opts.pop("refcount_bits", 16))  # type: ignore[call-overload]
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise ToolError(f"refcount_bits must be a power of two in [1, 64], not {refcount_bits}")
    prealloc = str(opts.pop("preallocation", "off"))
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise ToolError(f"unknown preallocation {prealloc!r}")
    has_backing = opts.pop("backing_file", None) is not None
    opts.pop("backing_fmt", None)
    opts.pop("compression_type", None)
    # qcow2_measure reads extended_l2; data_file, data_file_raw and lazy_refcounts change
    # nothing it counts (the data clusters are counted in the qcow2 file all the same).
    extended_l2 = bool(opts.pop("extended_l2", False))
    for ignored in ("data_file", "data_file_raw", "lazy_refcounts"):
        opts.pop(ignored, None)
    opt_size = opts.pop("size", None)
    if size is None and opt_size is not None and path is None:
        size = int(opt_size)  # type: ignore[call-overload]

    if out_fmt == "raw":
        if path is not None:
            with open_chain(path, impl=impl, fmt=fmt, force_share=force_share) as image:
                raw: int = image.size
        else:
            assert size is not None
            raw = _round_up(size, 512)
        return {"required": raw, "fully-allocated": raw}

    bitmaps: int | None = None
    if path is not None:
        with open_chain(path, impl=impl, fmt=fmt, force_share=force_share) as image:
            virtual = _round_up(image.size, cluster_size)
            required = virtual if has_backing else _data_bytes(image, path, cluster_size)
            # Only a qcow2 v3 source can hold persistent bitmaps.
            source = image.info()
            if source.qcow2 is not None and source.qcow2.compat == "1.1":
                bitmaps = _bitmaps_size(read_bitmaps(path), image.size, cluster_size)
    else:
        assert size is not None
        virtual = _round_up(size, cluster_size)
        required = 0
    # qcow2_measure: "Check that virtual disk size is valid" (QCOW_MAX_L1_SIZE, 32 MiB of L1).
    l2_tables = -(-(virtual // cluster_size) // (cluster_size // (_L2E_SIZE << extended_l2)))
    if l2_tables * _L1E_SIZE > _MAX_L1_BYTES:
        raise ToolError("The image size is too large (try using a larger cluster size)")
    if prealloc in ("full", "falloc"):
        required = virtual
    full = qcow2_prealloc_size(virtual, cluster_size, refcount_bits.bit_length() - 1,
                               extended_l2)
    out: dict[str, int] = {}
    if bitmaps is not None and compat in ("1.1", "v3"):
        out["bitmaps"] = bitmaps
    out["required"] = full - virtual + required
    out["fully-allocated"] = full
    return out


def render_measure(result: dict[str, int], *, output: str = "human") -> str:
    """What ``qemu-img measure`` prints."""
    if output == "json":
        return json.dumps(result, indent=4) + "\n"
    text = (f"required size: {result['required']}\n"
            f"fully allocated size: {result['fully-allocated']}\n")
    if "bitmaps" in result:
        text += f"bitmaps size: {result['bitmaps']}\n"
    return text
