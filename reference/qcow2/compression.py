"""Compressed clusters (qcow2.txt, "Compressed Clusters Descriptor" and compression_type).

"Compressed clusters ... the compressed data is stored ... raw deflate (zlib, no header)" for
compression type 0, a zstd frame for type 1.  Output is capped at one cluster, so a hostile
"compressed" cluster cannot make us allocate more than that.
"""

from __future__ import annotations

import zlib

from .._errors import CorruptImageError
from .constants import COMPRESSION_TYPE_ZLIB, COMPRESSION_TYPE_ZSTD

__all__ = ["decompress_cluster"]


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decompress one cluster; the result is exactly ``cluster_size`` bytes."""
    if compression_type == COMPRESSION_TYPE_ZLIB:
        try:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        except zlib.error as exc:
            raise CorruptImageError(f"qcow2 compressed cluster (zlib) is corrupt: {exc}") from exc
    elif compression_type == COMPRESSION_TYPE_ZSTD:
        import zstandard  # imported lazily: only zstd images need it

        try:
            # A bounded stream read: a hostile frame cannot decompress to more than a cluster.
            reader = zstandard.ZstdDecompressor().stream_reader(data)
            chunks = []
            remaining = cluster_size
            while remaining:
                chunk = reader.read(remaining)
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            out = b"".join(chunks)
        except zstandard.ZstdError as exc:
            raise CorruptImageError(f"qcow2 compressed cluster (zstd) is corrupt: {exc}") from exc
    else:
        raise CorruptImageError(f"qcow2 compression type {compression_type} is unknown")
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"qcow2 compressed cluster decompresses to {len(out)} bytes, not {cluster_size}"
        )
    return out

