"""``FormatAccess`` of pyimago.fast: guest I/O over a fast layer and its backing chain.

Same contract as ``pyimago.reference.FormatAccess`` (the clause IDs of specs/access.toml
apply), different machinery: this class checks requests and schedules them; the layer does
the work through run-based calls (reads and writes by coalesced runs, zeroing and discards
natively in its metadata), and parallel requests are split over a persistent thread pool.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias

from pyimago.reference._errors import (
    DriverError,
    InvalidRequestError,
    ReadOnlyError,
    UnsupportedError,
)
from pyimago.reference._info import ImageInfo
from pyimago.reference._mapping import (
    EofMapping,
    IndirectMapping,
    Mapping,
    RawMapping,
    ShallowMapping,
    SpecialMapping,
    ZeroMapping,
)
from pyimago.reference._prealloc import PreallocateMode
from pyimago.reference._snapshot import SnapshotInfo
from pyimago.reference._storage import Buffer, Storage, WritableBuffer
from pyimago.reference._stream import ImageStream

# access.request.bounded (QEMU's BDRV_REQUEST_MAX_BYTES): the contract's very constant.
from pyimago.reference.access import MAX_REQUEST_BYTES

from ._compress_write import compress_cluster, refuse_compressed
from ._hot import hot_reader, hot_writer
from ._layer import Clear
from ._qcow2 import Qcow2Layer
from ._raw import RawLayer
from ._runs import K_DATA_RO, K_EOF
from ._snapshot_write import apply_snapshot, create_snapshot, delete_snapshot

__all__ = ["MAX_OFFSET", "MAX_REQUEST_BYTES", "FormatAccess"]

Layer: TypeAlias = Qcow2Layer | RawLayer

MAX_OFFSET = (1 << 64) - 1
#: Requests smaller than this are not worth a thread hand-off.
_PARALLEL_MIN = 128 << 10
_CHUNK_MIN = 64 << 10
#: Writers of one file serialise on its inode lock in the kernel: measured on 2 cores,
#: splitting 1 MiB writes over two threads ran at a third of the speed.  Only very large
#: writes are split (each piece still large).
_PARALLEL_WRITE_MIN = 16 << 20


def _not_a_count(value: object, what: str) -> InvalidRequestError:
    if type(value) is not int:
        return InvalidRequestError(f"{what} must be an int, not {type(value).__name__} {value!r}")
    return InvalidRequestError(f"{what} must be 0 or more, not {value}")


def _request(offset: object, length: object, op: str) -> tuple[int, int]:
    """A guest range, checked: ints (bools refused), not negative, inside 64 bits."""
    if type(offset) is not int or offset < 0:
        raise _not_a_count(offset, f"{op}: offset")
    if type(length) is not int or length < 0:
        raise _not_a_count(length, f"{op}: length")
    if offset + length > MAX_OFFSET:
        raise InvalidRequestError(f"{op}: {offset} + {length} bytes runs past 2^64")
    return offset, length


def _too_long(op: str, n: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"{op}: {n} bytes in one request; at most {MAX_REQUEST_BYTES} (as QEMU) - split it"
    )


def _flat(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _pieces(size: int, parts: int) -> int:
    """Piece size for splitting ``size`` bytes ``parts`` ways (page multiples, 64 KiB+)."""
    return max(_CHUNK_MIN, (-(-size // parts) + 4095) & ~4095)


def _split(host: int, size: int, step: int) -> Iterator[tuple[int, int]]:
    """``[a, b)`` pieces of about ``step`` bytes for a write of ``size`` bytes at ``host``.

    crash.power-cut: "every sector changed since reads either its durable value or a value
    a later operation gave it" -- a cut between two pieces must not leave a 512-byte sector
    half old, half new, so every boundary between pieces lies on a 4 KiB host boundary.
    """
    a = 0
    b = step + (-(host + step)) % 4096
    while a < size:
        yield a, min(b, size)
        a, b = b, b + step


class FormatAccess:
    """Access to a disk image through a pyimago.fast layer (and its backing chain)."""

    def __init__(self, driver: Any) -> None:
        if not getattr(driver, "pyimago_fast_layer", False):
            raise InvalidRequestError(
                f"pyimago.fast.FormatAccess needs a pyimago.fast layer, not {driver!r}"
            )
        self._layer: Layer = driver
        self._read_threads = 1
        self._write_threads = 1
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._closed = False
        self._lock = threading.RLock()
        if isinstance(driver, Qcow2Layer):
            # Small reads inside one cached cluster of plain data skip the full path (see
            # _hot); everything else still goes through FormatAccess.readinto below.
            hot = hot_reader(driver, self.readinto)
            if hot is not None:
                self.readinto = hot  # type: ignore[method-assign,assignment]
            hot_write = hot_writer(driver, self.write)
            if hot_write is not None:
                self.write = hot_write  # type: ignore[method-assign,assignment]

    # -- what it is -----------------------------------------------------------------------

    @property
    def driver(self) -> Layer:
        """This image's own layer (qcow2 or raw); its backing chain hangs below it."""
        return self._layer

    @property
    def size(self) -> int:
        """The disk size the guest sees, in bytes."""
        return self._layer.size

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._layer.writable

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    @property
    def req_align(self) -> int:
        """Request alignment: the largest any storage of the chain asks for."""
        return max(s.req_align for s in self._layer.storage_dependencies())

    @property
    def mem_align(self) -> int:
        """Buffer alignment: the largest any storage of the chain asks for."""
        return max(s.mem_align for s in self._layer.storage_dependencies())

    @property
    def read_parallelization(self) -> int:
        return self._read_threads

    @property
    def write_parallelization(self) -> int:
        return self._write_threads

    @staticmethod
    def _thread_count(which: str, n: object) -> int:
        if type(n) is not int or not 1 <= n <= 1024:
            raise InvalidRequestError(f"{which} parallelization must be an int in [1, 1024]: {n!r}")
        return n

    def set_read_parallelization(self, n: int) -> None:
        """Split each read over up to ``n`` threads (pread and zlib release the GIL)."""
        self._read_threads = self._thread_count("read", n)

    def set_write_parallelization(self, n: int) -> None:
        """Split each large write's data transfers over up to ``n`` threads (allocation
        stays serial)."""
        self._write_threads = self._thread_count("write", n)

    def __str__(self) -> str:
        return str(self._layer)

    def __repr__(self) -> str:
        return f"<pyimago.fast.FormatAccess {self._layer} size={self.size}>"

    # -- mappings -------------------------------------------------------------------------

    def get_shallow_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """What ``offset`` maps to in this layer alone, and for how many bytes (<= max)."""
        offset, max_length = _request(offset, max_length, "get_shallow_mapping")
        kind, host, n = self._layer.map_run(offset, max_length)
        if kind == K_EOF:
            return EofMapping(), 0
        found = self._layer.to_mapping(kind, host, offset, n)
        if isinstance(found, SpecialMapping):
            # Compressed data is read through this object (its layer's readv_special).
            found = SpecialMapping(self, offset)
        return found, n

    def get_mapping(self, offset: int, max_length: int) -> tuple[Mapping, int]:
        """What ``offset`` maps to with the backing chain resolved, and for how long."""
        offset, max_length = _request(offset, max_length, "get_mapping")
        top, n = self.get_shallow_mapping(offset, max_length)
        if not isinstance(top, IndirectMapping):
            return top, n
        below, m = top.layer.get_mapping(top.offset, n)
        if isinstance(below, EofMapping):
            # access.mapping.eof-top-only: past a lower layer's end reads as plain zeroes.
            return ZeroMapping(False), n
        if isinstance(below, ZeroMapping):
            # access.mapping.explicit-top-only
            return ZeroMapping(False), m
        if isinstance(below, RawMapping) and not top.writable:
            # access.mapping.writable-gate: what the chain reaches is only as writable as
            # the indirection that reached it.
            return RawMapping(below.storage, below.offset, False), m
        return below, m

    def iter_mapping(
        self, start: int = 0, length: int | None = None
    ) -> Iterator[tuple[int, int, Mapping]]:
        """Yield ``(offset, length, mapping)`` for the consecutive ranges of
        ``[start, start + length)`` (``length=None``: up to the disk end), cut at the disk end,
        each resolved through the backing chain as ``get_mapping`` resolves it."""
        start, length = _request(start, self.size if length is None else length,
                                 "iter_mapping")
        stop = min(start + length, self._layer.size)
        while start < stop:
            found, n = self.get_mapping(start, stop - start)
            if isinstance(found, EofMapping):
                return
            yield start, n, found
            start += n

    def stream(self) -> ImageStream:
        """The guest disk as a seekable file object (``io.RawIOBase``), writable when the
        image is; closing it leaves the image open."""
        return ImageStream(self)

    def info(self) -> ImageInfo:
        """This image's own format facts (its backing chain's are not included)."""
        return self._layer.info()

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        """Make ``offset`` directly writable data; return ``(storage, host_offset, length)``."""
        offset, length = self._modifying("ensure_data_mapping", offset, length)
        if not length:
            raise InvalidRequestError("ensure_data_mapping: length must be positive")
        with self._lock:
            storage, host, n = self._layer.ensure_data_mapping(offset, length, overwrite)
        if n <= 0:
            raise DriverError(f"{self._layer}: ensure_data_mapping({offset}, {length}) mapped 0")
        return storage, host, min(n, length)

    # -- threads --------------------------------------------------------------------------

    def _workers(self, n: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size < n:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="pyimago-fast")
            self._pool_size = n
        return self._pool

    def _spread(self, jobs: list[Callable[[], None]], n: int) -> None:
        """Run ``jobs`` on ``n`` threads: this one and ``n - 1`` pool workers.

        The jobs are dealt into ``n`` interleaved hands, one hand-off per worker rather than
        per job (per-job hand-offs cost a visible share of a 64 KiB decompression).
        """
        n = min(n, len(jobs))
        if n <= 1:
            _run_all(jobs)
            return
        pool = self._workers(n - 1)
        futures = [pool.submit(_run_all, jobs[i::n]) for i in range(1, n)]
        failure: BaseException | None = None
        try:
            _run_all(jobs[::n])
        except BaseException as exc:
            failure = exc
        for fut in futures:
            raised = fut.exception()
            if failure is None and raised is not None:
                failure = raised
        if failure is not None:
            raise failure

    # -- reads ----------------------------------------------------------------------------

    def readinto(self, buf: WritableBuffer, offset: int) -> None:
        """Fill ``buf`` from guest ``offset``; never short, zeroes past the end of the disk."""
        view = buf if type(buf) is memoryview and buf.format == "B" else _flat(buf)
        n = len(view)
        if type(offset) is not int or offset < 0 or offset + n > MAX_OFFSET:
            _request(offset, n, "read")
        if n > MAX_REQUEST_BYTES:
            raise _too_long("read", n)
        threads = self._read_threads
        if threads == 1 or n < _PARALLEL_MIN:
            self._layer.readinto(view, offset)
            return
        jobs: list[Callable[[], None]] = []
        self._layer.plan_read(view, offset, jobs, _pieces(n, threads))
        self._spread(jobs, threads)

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes from guest ``offset`` (zeroes past the end of the disk)."""
        offset, length = _request(offset, length, "read")
        if length > MAX_REQUEST_BYTES:
            raise _too_long("read", length)
        if self._read_threads == 1 and length:
            kind, host, n = self._layer.map_run(offset, length)
            if n == length and kind <= K_DATA_RO:
                # One stored run: a single copy straight out of the storage.
                return self._layer.data.read(host, length)
        out = bytearray(length)
        self.readinto(out, offset)
        return bytes(out)

    def readv(self, buffers: Iterable[WritableBuffer], offset: int) -> None:
        """Fill the buffers in turn from consecutive guest offsets starting at ``offset``."""
        views = [_flat(b) for b in buffers]
        total = sum(map(len, views))
        _request(offset, total, "readv")
        if total > MAX_REQUEST_BYTES:
            raise _too_long("readv", total)
        for view in views:
            self.readinto(view, offset)
            offset += len(view)

    # -- writes ---------------------------------------------------------------------------

    def _modifying(self, op: str, offset: object, length: object) -> tuple[int, int]:
        """Check a modifying request before anything is touched: a valid range, a writable
        image (access.write.read-only), inside the disk (access.write.past-end)."""
        start, n = _request(offset, length, op)
        self._refuse_read_only(op)
        size = self._layer.size
        if start + n > size:
            raise InvalidRequestError(
                f"{op}: {n} bytes at {start} run past the disk end ({size}); nothing written"
            )
        return start, n

    def write(self, data: Buffer, offset: int) -> None:
        """Write all of ``data`` at guest ``offset`` (never short; past the end is an error)."""
        view = data if type(data) is memoryview and data.format == "B" else _flat(data)
        if len(view) > MAX_REQUEST_BYTES:
            raise _too_long("write", len(view))
        offset, n = self._modifying("write", offset, len(view))
        if not n:
            return
        threads = self._write_threads
        if threads == 1 or n < _PARALLEL_WRITE_MIN:
            self._layer.write(view, offset, None)
            return
        transfers: list[tuple[int, memoryview]] = []
        with self._lock:
            self._layer.write(view, offset, transfers)
        # The guest data's storage: an external data file where the image has one.
        storage = self._layer.data
        step = _pieces(n, threads)
        jobs = [
            _writer(storage, part[a:b], host + a)
            for host, part in transfers
            for a, b in _split(host, len(part), step)
        ]
        self._spread(jobs, threads)

    def write_compressed(self, data: Buffer, offset: int) -> None:
        """Write one cluster at ``offset`` (cluster-aligned; ``data`` a whole cluster, or the
        rest of the disk's partial last cluster) as a compressed cluster, by the image's
        compression type; where compression does not pay it is written plainly, as QEMU
        does.  The cluster must not be allocated (QEMU refuses that too)."""
        self.write_compressed_many(data, offset)

    def write_compressed_many(self, data: Buffer, offset: int) -> None:
        """:meth:`write_compressed` for consecutive clusters from ``offset``, compressed on
        up to ``write_parallelization`` threads (zlib and zstd release the GIL), placed in
        order."""
        view = _flat(data)
        offset, n = self._modifying("write_compressed", offset, len(view))
        layer = self._layer
        if not isinstance(layer, Qcow2Layer):
            raise UnsupportedError(f"write_compressed: {layer} is not a qcow2 image")
        cs = layer.cluster_size
        pieces = [(a, min(a + cs, n)) for a in range(0, max(n, 1), cs)]
        for a, b in pieces:
            refuse_compressed(layer, offset + a, b - a)
        ctype = layer.hdr.compression_type
        blobs: list[bytes | None] = [None] * len(pieces)

        def job(k: int) -> Callable[[], None]:
            def run() -> None:
                a, b = pieces[k]
                blobs[k] = compress_cluster(view[a:b], cs, ctype)
            return run

        self._spread([job(k) for k in range(len(pieces))], self._write_threads)
        with self._lock:
            for (a, b), blob in zip(pieces, blobs, strict=True):
                layer.write_compressed(view[a:b], offset + a, blob)

    # -- internal snapshots ---------------------------------------------------------------

    def _qcow2(self, op: str) -> Qcow2Layer:
        layer = self._layer
        if not isinstance(layer, Qcow2Layer):
            raise UnsupportedError(f"{op}: {layer} is not a qcow2 image: no internal snapshots")
        return layer

    def snapshots(self) -> tuple[SnapshotInfo, ...]:
        """This image's internal snapshots, in table order (``qemu-img snapshot -l``)."""
        return self._qcow2("snapshots").snapshots

    def create_snapshot(self, name: str) -> SnapshotInfo:
        """Take an internal snapshot of this image (its top layer) named ``name`` (unique,
        non-empty); its ID is the next free integer, as QEMU assigns them."""
        layer = self._qcow2("create_snapshot")
        with self._lock, layer._lock:
            return create_snapshot(layer, name)

    def apply_snapshot(self, name_or_id: str) -> None:
        """Revert this image to the snapshot with that ID (else the first with that name),
        its disk size included, as ``qemu-img snapshot -a``."""
        layer = self._qcow2("apply_snapshot")
        with self._lock, layer._lock:
            apply_snapshot(layer, name_or_id)

    def delete_snapshot(self, name_or_id: str) -> None:
        """Delete the snapshot with that ID (else the first with that name)."""
        layer = self._qcow2("delete_snapshot")
        with self._lock, layer._lock:
            delete_snapshot(layer, name_or_id)

    def writev(self, buffers: Iterable[Buffer], offset: int) -> None:
        """Write the buffers back to back from guest ``offset``."""
        views = [_flat(b) for b in buffers]
        total = sum(map(len, views))
        if total > MAX_REQUEST_BYTES:
            raise _too_long("writev", total)
        self.write(b"".join(views), offset)

    # -- zeroing and discarding -----------------------------------------------------------

    def _clear(self, offset: int, length: int, how: Clear) -> None:
        offset, length = self._modifying(how.value, offset, length)
        with self._lock:
            self._layer.clear(offset, length, how)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zero without freeing allocations (access.write-zeroes)."""
        self._clear(offset, length, Clear.ZERO_KEEP)

    def discard_to_zero(self, offset: int, length: int) -> None:
        """Make the range read as zero, freeing what can be freed (access.discard-to-zero)."""
        self._clear(offset, length, Clear.ZERO_FREE)

    def discard_to_any(self, offset: int, length: int) -> None:
        """Discard what can be discarded; the range's contents become unspecified."""
        self._clear(offset, length, Clear.ANY)

    def discard_to_backing(self, offset: int, length: int) -> None:
        """Discard whole clusters so that the backing image shows through."""
        self._clear(offset, length, Clear.BACKING)

    # -- size -----------------------------------------------------------------------------

    @staticmethod
    def _size_value(op: str, value: object) -> int:
        if type(value) is not int or value < 0:
            raise _not_a_count(value, f"{op}: new size")
        return value

    def _refuse_read_only(self, op: str) -> None:
        if not self._layer.writable:
            # access.write.read-only
            raise ReadOnlyError(f"{op}: image {self._layer} is read-only")

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Set the disk size; a grow prepares the new area as ``prealloc`` says."""
        new_size = self._size_value("resize", new_size)
        if new_size > self.size:
            self.resize_grow(new_size, prealloc)
        elif new_size < self.size:
            self.resize_shrink(new_size)

    def resize_grow(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Grow to ``new_size``; nothing happens if the disk is already that large."""
        new_size = self._size_value("resize_grow", new_size)
        if not isinstance(prealloc, PreallocateMode):
            raise InvalidRequestError(f"resize_grow: {prealloc!r} is not a PreallocateMode")
        self._refuse_read_only("resize_grow")
        if new_size > MAX_OFFSET:
            raise InvalidRequestError(f"resize_grow: new size {new_size} is past 2^64")
        if new_size > self.size:
            with self._lock:
                self._layer.resize_grow(new_size, prealloc)

    def resize_shrink(self, new_size: int) -> None:
        """Shrink to ``new_size``, discarding what lies past it; no-op if already smaller."""
        new_size = self._size_value("resize_shrink", new_size)
        self._refuse_read_only("resize_shrink")
        if new_size < self.size:
            with self._lock:
                self._layer.resize_shrink(new_size)

    # -- caches and lifetime --------------------------------------------------------------

    def flush(self) -> None:
        """Write the layer's cached metadata to its storage; no fsync (that is ``sync``)."""
        with self._lock:
            self._layer.flush()

    def sync(self) -> None:
        """fsync the storage; metadata still cached stays cached (that is ``flush``)."""
        self._layer.sync()

    def invalidate_cache(self) -> None:
        """Forget cached metadata, unwritten changes included; it is read again on use."""
        with self._lock:
            self._layer.invalidate_cache()

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def close(self) -> None:
        """Flush a writable image, then close its layer (storage and owned backing chain)
        and the worker threads; closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        with contextlib.ExitStack() as cleanup:
            # Run even when the flush fails, in this order: layer, then threads.
            cleanup.callback(self._stop_pool)
            cleanup.callback(self._layer.close)
            if self._layer.writable:
                self._layer.flush()

    def __enter__(self) -> FormatAccess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _run_all(jobs: list[Callable[[], None]]) -> None:
    for job in jobs:
        job()


def _writer(storage: Storage, view: memoryview, host: int) -> Callable[[], None]:
    return lambda: storage.write(view, host)
