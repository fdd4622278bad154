"""Compressed clusters (qcow2.txt, "Compressed Clusters Descriptor" and compression_type).

"Compressed clusters ... the compressed data is stored ... raw deflate (zlib, no header)" for
compression type 0, a zstd frame for type 1.  Output is capped at one cluster, so a hostile
"compressed" cluster cannot make us allocate more than that.
"""

from __future__ import annotations

import zlib

from .._errors import CorruptImageError
from .constants import COMPRESSION_TYPE_ZLIB, COMPRESSION_TYPE_ZSTD

__all__ = ["compress_cluster", "decompress_cluster"]

#: zstd's ZSTD_CLEVEL_DEFAULT, the level QEMU compresses with.
_ZSTD_CLEVEL_DEFAULT = 3


def compress_cluster(cluster: bytes, compression_type: int) -> bytes | None:
    """Compress one whole cluster as QEMU does; None where the result would not fit in
    ``len(cluster) - 1`` bytes (qcow2.compressed.write-fallback: QEMU's
    qcow2_co_pwritev_compressed_task then writes a normal cluster instead).

    zlib as QEMU's qcow2_compress: "deflateInit2(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED,
    -12, 9, Z_DEFAULT_STRATEGY)", a raw deflate stream with a 4 KiB window; zstd as
    qcow2_zstd_compress, one frame at the default level.
    """
    limit = len(cluster) - 1
    if compression_type == COMPRESSION_TYPE_ZLIB:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9,
                                      zlib.Z_DEFAULT_STRATEGY)
        out = compressor.compress(cluster) + compressor.flush()
    elif compression_type == COMPRESSION_TYPE_ZSTD:
        import zstandard  # imported lazily: only zstd images need it

        out = zstandard.ZstdCompressor(level=_ZSTD_CLEVEL_DEFAULT).compress(cluster)
    else:
        raise CorruptImageError(f"qcow2 compression type {compression_type} is unknown")
    return out if len(out) <= limit else None


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

