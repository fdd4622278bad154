"""Compressed clusters, remembered by content.

The oracle compresses clusters for two reasons: to decide whether a compressed write must
fit (qcow2.compressed.write-fallback: by QEMU's own settings, ``qemu_compress``) and to
store built layers' clusters compressed (:mod:`~pyimago.oracle.fuzz._compress`:
``fast=True``, deflate's fastest level: any raw deflate stream with QEMU's 4 KiB window is
one a reader must inflate, and the default level costs zlib about 0.1 s for a 2 MiB
cluster of the oracle's patterns, the fastest a fifth of that).  The examples of a run
build the same layers again and again (Hypothesis grows new examples from old ones): each
distinct cluster is compressed once, its form looked up by a digest (about 1 ms for
2 MiB) afterwards.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import OrderedDict

__all__ = ["qemu_compress"]

#: qcow2.compressed.write-fallback: "zlib: raw deflate, window 2^12, default level,
#: memLevel 9; zstd: one frame at the default level".
_ZLIB_ARGS = (zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
_ZSTD_LEVEL = 3
#: The compressed forms kept (bytes, oldest dropped first).
_BUDGET = 64 << 20

_cache: OrderedDict[tuple[bool, bool, bytes], bytes] = OrderedDict()
_held = 0


def qemu_compress(data: bytes, zstd: bool = False, *, fast: bool = False) -> bytes:
    """``data`` compressed as QEMU compresses a cluster (zlib, or zstd with ``zstd``);
    ``fast``: zlib at its fastest level (the same window; zstd is fast as it is)."""
    global _held
    fast = fast and not zstd
    key = (zstd, fast, hashlib.blake2b(data, digest_size=20).digest())
    packed = _cache.get(key)
    if packed is not None:
        _cache.move_to_end(key)
        return packed
    if zstd:
        import zstandard

        packed = bytes(zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data))
    else:
        packer = zlib.compressobj(*((1, *_ZLIB_ARGS[1:]) if fast else _ZLIB_ARGS))
        packed = packer.compress(data) + packer.flush()
    _cache[key] = packed
    _held += len(packed)
    while _held > _BUDGET:
        _held -= len(_cache.popitem(last=False)[1])
    return packed
