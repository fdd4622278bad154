"""``FormatAccess``: guest I/O resolved through a format driver and its backing chain.

This module follows imago's ``access.rs``; the clause IDs in comments name the rules in
``specs/access.toml``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from ._driver import FormatDriver
from ._errors import DriverError, InvalidRequestError, ReadOnlyError, UnsupportedError
from ._info import ImageInfo
from ._mapping import (
    EofMapping,
    IndirectMapping,
    Mapping,
    RawMapping,
    ShallowMapping,
    SpecialMapping,
    ZeroMapping,
)
from ._prealloc import PreallocateMode
from ._snapshot import SnapshotInfo
from ._storage import Buffer, Storage, WritableBuffer
from ._stream import ImageStream

__all__ = ["MAX_OFFSET", "MAX_REQUEST_BYTES", "FormatAccess", "check_range"]

#: Offsets and lengths are unsigned 64-bit quantities, as in imago.
MAX_OFFSET = (1 << 64) - 1

#: The most bytes one read or write request may move: QEMU's BDRV_REQUEST_MAX_BYTES
#: (INT_MAX rounded down to whole sectors, 2 GiB - 512).
MAX_REQUEST_BYTES = ((1 << 31) - 1) & ~511


def _check_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{what} must be an int, not {type(value).__name__}: {value!r}")
    if value < 0:
        raise InvalidRequestError(f"{what} must not be negative: {value}")
    return value


def check_range(offset: object, length: object, op: str) -> tuple[int, int]:
    """Validate a guest range up front (clause ``access.range.overflow``)."""
    off = _check_int(offset, f"{op}: offset")
    ln = _check_int(length, f"{op}: length")
    if off + ln > MAX_OFFSET:
        raise InvalidRequestError(
            f"{op}: range offset={off} length={ln} overflows 64 bits"
        )
    return off, ln


def check_request_length(length: int, op: str) -> None:
    """access.request.bounded: one data request moves at most MAX_REQUEST_BYTES."""
    if length > MAX_REQUEST_BYTES:
        raise InvalidRequestError(
            f"{op}: length {length} is larger than one request may be "
            f"({MAX_REQUEST_BYTES} bytes, QEMU's limit): split it"
        )


class FormatAccess:
    """Access to a disk image through its format driver (and the driver's backing chain)."""

    def __init__(self, driver: FormatDriver) -> None:
        self._driver = driver
        self._read_parallelization = 1
        self._write_parallelization = 1
        self._closed = False
        # Serialises metadata-changing driver calls when requests run from several threads.
        self._lock = threading.RLock()

    # -- properties ---------------------------------------------------------------------------

    @property
    def driver(self) -> FormatDriver:
        """The format driver this object wraps."""
        return self._driver

    @property
    def size(self) -> int:
        """Guest-visible disk size in bytes."""
        return self._driver.size

    @property
    def writable(self) -> bool:
        return self._driver.writable

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def req_align(self) -> int:
        """Request alignment: the largest of every storage's, the backing chain included."""
        return max((s.req_align for s in self._driver.storage_dependencies()), default=1)

    @property
    def mem_align(self) -> int:
        """Buffer alignment: the largest of every storage's, the backing chain included."""
        return max((s.mem_align for s in self._driver.storage_dependencies()), default=1)

    @property
    def read_parallelization(self) -> int:
        return self._read_parallelization

    @property
    def write_parallelization(self) -> int:
        return self._write_parallelization

    def set_read_parallelization(self, n: int) -> None:
        """Split each read into up to ``n`` storage requests run concurrently."""
        self._read_parallelization = self._check_parallelization(n)

    def set_write_parallelization(self, n: int) -> None:
        """Split each write into up to ``n`` storage requests run concurrently."""
        self._write_parallelization = self._check_parallelization(n)

    @staticmethod
    def _check_parallelization(n: object) -> int:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1024:
            raise InvalidRequestError(f"parallelization must be an int in [1, 1024], not {n!r}")
        return n

    def __str__(self) -> str:
        return str(self._driver)

    def __repr__(self) -> str:
        return f"<FormatAccess {self._driver} size={self.size}>"

    # -- mappings -----------------------------------------------------------------------------

    def get_shallow_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """What ``offset`` maps to in this layer alone, and for how many bytes (<= max)."""
        offset, max_length = check_range(offset, max_length, "get_shallow_mapping")
        mapping, length = self._driver.get_mapping(offset, max_length)
        if isinstance(mapping, SpecialMapping) and mapping.layer is None:
            mapping = SpecialMapping(self, mapping.offset)
        if isinstance(mapping, EofMapping):
            return mapping, 0
        length = min(length, max_length)
        if length <= 0 and max_length > 0:
            raise DriverError(
                f"{self._driver}: get_mapping({offset}, {max_length}) returned {mapping} "
                f"with length {length}"
            )
        return mapping, length

    def get_mapping(self, offset: int, max_length: int) -> tuple[Mapping, int]:
        """What ``offset`` maps to with every backing layer resolved, and for how long."""
        offset, max_length = check_range(offset, max_length, "get_mapping")
        layer: FormatAccess = self
        writable_gate = True
        while True:
            mapping, length = layer.get_shallow_mapping(offset, max_length)
            if isinstance(mapping, RawMapping):
                # access.mapping.writable-gate: the indirection that led here gates writability.
                return (
                    RawMapping(mapping.storage, mapping.offset, mapping.writable and writable_gate),
                    length,
                )
            if isinstance(mapping, IndirectMapping):
                if not isinstance(mapping.layer, FormatAccess):
                    raise DriverError(f"{self._driver}: indirect mapping into {mapping.layer!r}")
                layer = mapping.layer
                offset = mapping.offset
                writable_gate = mapping.writable
                max_length = length
                continue
            if isinstance(mapping, ZeroMapping):
                # access.mapping.explicit-top-only: only the top layer's zeroes are explicit.
                return ZeroMapping(mapping.explicit and layer is self), length
            if isinstance(mapping, EofMapping):
                # access.mapping.eof-top-only: a lower layer's EOF reads as unallocated zero.
                if layer is self:
                    return EofMapping(), 0
                return ZeroMapping(False), max_length
            if isinstance(mapping, SpecialMapping):
                return mapping, length
            raise DriverError(f"{self._driver}: unknown mapping {mapping!r}")

    def iter_mapping(
        self, start: int = 0, length: int | None = None
    ) -> Iterator[tuple[int, int, Mapping]]:
        """Yield ``(offset, length, mapping)`` for consecutive ranges from ``start``.

        Covers ``[start, start + length)`` cut at the disk end (``length=None``: to the disk
        end), each range as ``get_mapping`` resolves it through the backing chain.
        """
        start, length = check_range(start, self.size if length is None else length,
                                    "iter_mapping")
        end = min(start + length, self.size)
        offset = start
        while offset < end:
            mapping, n = self.get_mapping(offset, end - offset)
            if isinstance(mapping, EofMapping):
                return
            yield offset, n, mapping
            offset += n

    def stream(self) -> ImageStream:
        """The guest disk as a seekable file object (``io.RawIOBase``), writable when the
        image is; closing it leaves the image open."""
        return ImageStream(self)

    def info(self) -> ImageInfo:
        """This image's own format facts (not its backing chain's), as qemu-img info says."""
        # Not part of the FormatDriver protocol: drivers outside pyimago may lack it.
        info: Callable[[], ImageInfo] | None = getattr(self._driver, "info", None)
        if info is None:
            raise UnsupportedError(f"{self._driver}: the driver reports no image info")
        return info()

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        """Make ``offset`` directly writable data; return ``(storage, host_offset, length)``.

        With ``overwrite`` the caller promises to overwrite the whole range, so its old
        contents need not be kept.
        """
        offset, length = check_range(offset, length, "ensure_data_mapping")
        self._check_writable("ensure_data_mapping")
        self._check_within_disk(offset, length, "ensure_data_mapping")
        if length == 0:
            raise InvalidRequestError("ensure_data_mapping: length must be positive")
        with self._lock:
            storage, host_offset, mapped = self._driver.ensure_data_mapping(
                offset, length, overwrite
            )
        mapped = min(mapped, length)
        if mapped <= 0:
            raise DriverError(
                f"{self._driver}: ensure_data_mapping({offset}, {length}) mapped nothing"
            )
        return storage, host_offset, mapped

    # -- reads --------------------------------------------------------------------------------

    def readinto(self, buf: WritableBuffer, offset: int) -> None:
        """Fill ``buf`` from guest ``offset``; never short, zeroes past the end of the disk."""
        view = memoryview(buf).cast("B")
        offset, length = check_range(offset, len(view), "read")
        check_request_length(length, "read")
        jobs: list[Callable[[], None]] = []
        pos = 0
        while pos < length:
            mapping, chunk = self.get_mapping(offset + pos, length - pos)
            if isinstance(mapping, EofMapping):
                # access.read.past-end-zero
                view[pos:] = bytes(length - pos)
                break
            jobs.append(self._read_job(view[pos : pos + chunk], mapping))
            pos += chunk
        self._run(jobs, self._read_parallelization)

    @staticmethod
    def _read_job(view: memoryview, mapping: Mapping) -> Callable[[], None]:
        def job() -> None:
            if isinstance(mapping, RawMapping):
                mapping.storage.readinto(view, mapping.offset)
            elif isinstance(mapping, SpecialMapping):
                mapping.layer.driver.readv_special([view], mapping.offset)
            else:
                view[:] = bytes(len(view))

        return job

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes from guest ``offset`` (zeroes past the end of the disk)."""
        _, length = check_range(offset, length, "read")
        check_request_length(length, "read")
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def readv(self, buffers: Iterable[WritableBuffer], offset: int) -> None:
        """Fill each buffer in turn from consecutive guest offsets starting at ``offset``."""
        views = [memoryview(buf).cast("B") for buf in buffers]
        check_range(offset, sum(len(v) for v in views), "readv")
        check_request_length(sum(len(v) for v in views), "readv")
        for view in views:
            self.readinto(view, offset)
            offset += len(view)

    # -- writes -------------------------------------------------------------------------------

    def _check_writable(self, op: str) -> None:
        if not self._driver.writable:
            # access.write.read-only
            raise ReadOnlyError(f"{op}: image {self._driver} is read-only")

    def _check_within_disk(self, offset: int, length: int, op: str) -> None:
        size = self.size
        if offset + length > size:
            # access.write.past-end: rejected before any byte is written (imago's code truncates,
            # its documentation promises an error; we follow the documentation).
            raise InvalidRequestError(
                f"{op}: range offset={offset} length={length} runs past the disk end ({size})"
            )

    def write(self, data: Buffer, offset: int) -> None:
        """Write all of ``data`` at guest ``offset`` (never short; past the end is an error)."""
        view = memoryview(data).cast("B")
        offset, length = check_range(offset, len(view), "write")
        check_request_length(length, "write")
        self._check_writable("write")
        self._check_within_disk(offset, length, "write")
        jobs: list[Callable[[], None]] = []
        pos = 0
        while pos < length:
            storage, host_offset, chunk = self.ensure_data_mapping(
                offset + pos, length - pos, True
            )
            jobs.append(self._write_job(storage, view[pos : pos + chunk], host_offset))
            pos += chunk
            if self._write_parallelization == 1:
                self._run(jobs, 1)
                jobs = []
        self._run(jobs, self._write_parallelization)

    @staticmethod
    def _write_job(storage: Storage, view: memoryview, host_offset: int) -> Callable[[], None]:
        return lambda: storage.write(view, host_offset)

    def writev(self, buffers: Iterable[Buffer], offset: int) -> None:
        """Write the buffers back to back from guest ``offset``."""
        views = [memoryview(b).cast("B") for b in buffers]
        check_request_length(sum(len(v) for v in views), "writev")
        self.write(b"".join(views), offset)

    @staticmethod
    def _run(jobs: Sequence[Callable[[], None]], parallelization: int) -> None:
        if parallelization <= 1 or len(jobs) <= 1:
            for job in jobs:
                job()
            return
        with ThreadPoolExecutor(max_workers=parallelization) as pool:
            futures: list[Future[None]] = [pool.submit(job) for job in jobs]
        for future in futures:
            future.result()

    # -- zeroing and discarding ---------------------------------------------------------------

    def _is_range_zero(self, offset: int, length: int) -> bool:
        while length > 0:
            mapping, mlen = self.get_mapping(offset, length)
            if not isinstance(mapping, ZeroMapping):
                return False
            offset += mlen
            length -= mlen
        return True

    def _soft_ensure_zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zero, writing zeroes where needed.

        access.write-zeroes.soft: the fast path zeroes whole granules it can; the slow path
        allocates what is not zero in this layer and writes zeroes into it.
        """
        if length == 0:
            return
        gran = self._driver.zero_granularity
        if gran:
            end = offset + length
            aligned_start = offset - offset % gran
            aligned_end = min(-(-end // gran) * gran, self.size)
            fully_zeroed = True
            if offset > aligned_start and not self._is_range_zero(
                aligned_start, offset - aligned_start
            ):
                fully_zeroed = False
                aligned_start += gran
            if end < aligned_end and not self._is_range_zero(end, aligned_end - end):
                fully_zeroed = False
                aligned_end -= gran
            while aligned_start < aligned_end:
                zofs, zlen = self._driver.ensure_zero_mapping(
                    aligned_start, aligned_end - aligned_start
                )
                if zofs != aligned_start or zlen == 0:
                    fully_zeroed = False
                    if zlen == 0:
                        break
                aligned_start = zofs + zlen
            if fully_zeroed:
                return
        while length > 0:
            mapping, mlen = self._driver.get_mapping(offset, length)
            mlen = min(mlen, length)
            if isinstance(mapping, ZeroMapping) and mapping.explicit:
                offset += mlen
                length -= mlen
                continue
            if isinstance(mapping, EofMapping) or mlen <= 0:
                raise DriverError(
                    f"{self._driver}: unexpected {mapping} at {offset} while zeroing"
                )
            # Even a writable raw mapping goes through ensure_data_mapping: the driver then
            # checks the host range once more before anything is written to it.
            storage, host_offset, mlen = self._driver.ensure_data_mapping(offset, mlen, True)
            mlen = min(mlen, length)
            if mlen <= 0:
                raise DriverError(f"{self._driver}: ensure_data_mapping mapped nothing")
            storage.write_zeroes(host_offset, mlen)
            offset += mlen
            length -= mlen

    def _zero_loop(
        self, offset: int, length: int, op: str, step: Callable[[int, int], tuple[int, int]]
    ) -> None:
        offset, length = check_range(offset, length, op)
        self._check_writable(op)
        self._check_within_disk(offset, length, op)
        end = offset + length
        with self._lock:
            offset, end = self._zero_edges_first(offset, end)
            while offset < end:
                zofs, zlen = step(offset, end - offset)
                if zlen == 0:
                    break
                if not offset <= zofs <= end or zofs + zlen > end:
                    raise DriverError(
                        f"{self._driver}: {op} step returned ({zofs}, {zlen}) "
                        f"outside [{offset}, {end})"
                    )
                self._soft_ensure_zero(offset, zofs - offset)
                offset = zofs + zlen
            self._soft_ensure_zero(offset, end - offset)

    def _zero_edges_first(self, offset: int, end: int) -> tuple[int, int]:
        """Write zeroes into the partial units at either end of ``[offset, end)`` that need
        it (the rest of their unit does not read zero), and return what is left for the
        loop: the aligned middle and any edge not done here.

        access.write-zeroes.soft: imago's soft_ensure_zero loop lets the driver zero the
        aligned part first and writes zeroes into the head after it; QEMU's
        bdrv_co_do_pwrite_zeroes does the head, then the aligned middle, then the tail.  A
        written edge may copy its cluster on write (shared with a snapshot), and the copy
        spans from the cluster's first allocated subcluster to its last (QEMU's
        calculate_l2_meta): subclusters the middle step had marked zero would map as data
        again.  So both written edges come before the middle (QEMU's order leaves that
        remapping for the tail: see the divergence note on the clause).  An edge whose unit
        otherwise reads zero is zeroed without a write, where order does not matter: the
        loop keeps it as imago does.
        """
        gran = self._driver.zero_granularity
        if not gran:
            return offset, end
        head_end = min(end, -(-offset // gran) * gran)
        # A unit the disk end cuts short is whole when the range reaches the disk end.
        tail_start = end if end >= self.size else max(head_end, end - end % gran)
        if head_end >= tail_start:
            # No whole unit in the range: the loop zeroes it as one piece.
            return offset, end
        if offset < head_end and not self._is_range_zero(offset - offset % gran, offset % gran):
            self._soft_ensure_zero(offset, head_end - offset)
            offset = head_end
        unit_end = min(tail_start + gran, self.size)
        if tail_start < end and not self._is_range_zero(end, unit_end - end):
            self._soft_ensure_zero(tail_start, end - tail_start)
            end = tail_start
        return offset, end

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zero without freeing allocations (access.write-zeroes)."""
        self._zero_loop(offset, length, "write_zeroes", self._driver.ensure_zero_mapping)

    def discard_to_zero(self, offset: int, length: int) -> None:
        """Make the range read as zero, freeing what can be freed (access.discard-to-zero)."""
        self._zero_loop(offset, length, "discard_to_zero", self._driver.discard_to_zero)

    def _discard_loop(
        self, offset: int, length: int, op: str, step: Callable[[int, int], tuple[int, int]]
    ) -> None:
        offset, length = check_range(offset, length, op)
        self._check_writable(op)
        self._check_within_disk(offset, length, op)
        end = offset + length
        with self._lock:
            while offset < end:
                dofs, dlen = step(offset, end - offset)
                if dlen == 0:
                    break
                offset = dofs + dlen

    def discard_to_any(self, offset: int, length: int) -> None:
        """Discard what can be discarded; the range's contents become unspecified."""
        self._discard_loop(offset, length, "discard_to_any", self._driver.discard_to_any)

    def discard_to_backing(self, offset: int, length: int) -> None:
        """Discard what can be discarded so that the backing image shows through."""
        self._discard_loop(offset, length, "discard_to_backing", self._driver.discard_to_backing)

    # -- size ---------------------------------------------------------------------------------

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Set the disk size; a grow prepares the new area as ``prealloc`` says."""
        new_size = _check_int(new_size, "resize: new size")
        if new_size < self.size:
            self.resize_shrink(new_size)
        elif new_size > self.size:
            self.resize_grow(new_size, prealloc)

    def resize_grow(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Grow to ``new_size``; nothing happens if the disk is already that large."""
        new_size = _check_int(new_size, "resize_grow: new size")
        if not isinstance(prealloc, PreallocateMode):
            raise InvalidRequestError(f"resize_grow: not a PreallocateMode: {prealloc!r}")
        self._check_writable("resize_grow")
        if new_size > MAX_OFFSET:
            raise InvalidRequestError(f"resize_grow: new size {new_size} overflows 64 bits")
        if new_size <= self.size:
            return
        with self._lock:
            self._driver.resize_grow(new_size, prealloc)

    def resize_shrink(self, new_size: int) -> None:
        """Shrink to ``new_size``, discarding what lies past it; no-op if already smaller."""
        new_size = _check_int(new_size, "resize_shrink: new size")
        self._check_writable("resize_shrink")
        if new_size >= self.size:
            return
        with self._lock:
            self._driver.resize_shrink(new_size)

    # -- format features beyond imago (issue 13): optional driver methods -----------------

    def _optional(self, name: str) -> Callable[..., Any]:
        method: Callable[..., Any] | None = getattr(self._driver, name, None)
        if method is None:
            raise UnsupportedError(f"{name}: {self._driver} does not support it")
        return method

    def write_compressed(self, data: Buffer, offset: int) -> None:
        """Write one whole guest cluster (or the disk's partial last cluster) compressed by
        the image's compression type, as ``qemu-img convert -c`` does; where it does not
        compress, a normal write.  Only into clusters with no host cluster mapped."""
        view = memoryview(data).cast("B")
        offset, length = check_range(offset, len(view), "write_compressed")
        self._check_writable("write_compressed")
        self._check_within_disk(offset, length, "write_compressed")
        method = self._optional("write_compressed")
        with self._lock:
            method(bytes(view), offset)

    def snapshots(self) -> tuple[SnapshotInfo, ...]:
        """This image's internal snapshots (the top image's, not its backing chain's)."""
        listed: Any = getattr(self._driver, "snapshots", None)
        if listed is None:
            raise UnsupportedError(f"snapshots: {self._driver} does not support them")
        return tuple(listed)

    def create_snapshot(self, name: str) -> SnapshotInfo:
        """Take an internal snapshot of the disk as it is now (``qemu-img snapshot -c``)."""
        self._check_snapshot_key(name, "create_snapshot: name")
        self._check_writable("create_snapshot")
        method = self._optional("create_snapshot")
        with self._lock:
            info: SnapshotInfo = method(name)
        return info

    def apply_snapshot(self, name_or_id: str) -> None:
        """Revert the disk to a snapshot, looked up by ID first, then by name
        (``qemu-img snapshot -a``); the disk takes the snapshot's size."""
        self._check_snapshot_key(name_or_id, "apply_snapshot: snapshot")
        self._check_writable("apply_snapshot")
        method = self._optional("apply_snapshot")
        with self._lock:
            method(name_or_id)

    def delete_snapshot(self, name_or_id: str) -> None:
        """Delete a snapshot, looked up by ID first, then by name (``qemu-img snapshot
        -d``)."""
        self._check_snapshot_key(name_or_id, "delete_snapshot: snapshot")
        self._check_writable("delete_snapshot")
        method = self._optional("delete_snapshot")
        with self._lock:
            method(name_or_id)

    @staticmethod
    def _check_snapshot_key(value: object, what: str) -> None:
        if not isinstance(value, str) or not value:
            raise InvalidRequestError(f"{what} must be a non-empty str, not {value!r}")

    # -- caches and lifetime ------------------------------------------------------------------

    def flush(self) -> None:
        """Write internal caches back to storage (does not fsync: see ``sync``)."""
        with self._lock:
            self._driver.flush()

    def sync(self) -> None:
        """fsync what was already written to storage (does not flush caches)."""
        self._driver.sync()

    def invalidate_cache(self) -> None:
        """Drop internal caches without writing them back; later reads reload from storage."""
        with self._lock:
            self._driver.invalidate_cache()

    def close(self) -> None:
        """Flush (when writable) and close the driver and its storages; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._driver.writable:
                self._driver.flush()
        finally:
            self._driver.close()

    def __enter__(self) -> FormatAccess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
