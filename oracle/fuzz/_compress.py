"""Compressed clusters for the oracle's chains, made with the reference's qcow2 driver.

No implementation is asked to *write* compressed clusters (FormatAccess has no such
operation); to make drivers *read* them, and copy-on-write from them, a built qcow2 layer has
some of its data clusters rewritten compressed, as ``qemu-img convert -c`` would store them
(deflated at zlib's fastest level: see :mod:`pyimago.oracle._deflate`).
The guest content does not change, so the model does not either.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from pyimago.oracle._deflate import qemu_compress
from pyimago.reference import FileStorage, Qcow2Driver, Storage
from pyimago.reference.qcow2.compressed_write import compressed_entry
from pyimago.reference.qcow2.constants import COMPRESSION_TYPE_ZSTD
from pyimago.reference.qcow2.tables import ClusterType

__all__ = ["compress_clusters"]


def compress_clusters(location: Any, ranges: Iterable[tuple[int, int]]) -> int:
    """Store the data clusters wholly inside ``ranges`` of a closed qcow2 image compressed.

    ``location`` is a path or a Storage.  Clusters that are not plain data, or that do not
    compress, are left alone.  Returns how many clusters were compressed.
    """
    owned = isinstance(location, (str, os.PathLike))
    storage: Storage = FileStorage(location, writable=True) if owned else location
    driver = Qcow2Driver(storage, writable=True)
    # Only clusters this layer holds are rewritten: the backing is never read.
    driver.set_backing(None)
    done = 0
    try:
        cs = driver.cluster_size
        zstd = driver.header.compression_type == COMPRESSION_TYPE_ZSTD
        size = driver.size
        for offset, length in ranges:
            end = min(offset + length, size)
            first = -(-offset // cs) * cs
            last = end if end == size else end - end % cs
            for guest in range(first, last, cs):
                entry = driver._get_l2_entry(guest)
                if entry.type is not ClusterType.NORMAL:
                    continue
                data = storage.read(entry.host_offset, cs)
                packed = qemu_compress(data, zstd, fast=True)
                if len(packed) >= cs:
                    continue
                # Packed byte after byte as QEMU packs them (qcow2_alloc_bytes): consecutive
                # compressed clusters share host clusters, and their descriptors hold any
                # byte offset -- what readers must get right, as much as the data itself.
                host = driver._allocator.allocate_bytes(len(packed))
                storage.write(packed, host)
                driver._replace_entry(guest, compressed_entry(host, len(packed)))
                done += 1
        driver.flush()
    finally:
        if owned:
            driver.close()
    return done
