"""``convert``: copy an image's guest contents into a new (or existing) image.

As ``qemu-img convert``: the source's block status decides what is copied; zero and
unallocated ranges stay holes in a fresh output without a backing file (and so do runs of
zeroes inside data, ``sparse_size`` bytes or longer); with ``-B`` only the source's top layer
is copied, the rest is left to the new backing file; with ``-n`` the output exists already
and zero ranges are written as zeroes; with ``snapshot`` (``-l``) the source's internal
snapshot is copied instead of its current state; with ``compress`` (``-c``) every output
cluster that holds data is written whole through ``FormatAccess.write_compressed``.  Reads
run on a thread pool, ahead of the writes, which stay in order on the calling thread
(allocation in the output is serial anyway).
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pyimago.reference import IndirectMapping, ZeroMapping

from ._common import Impl, ToolError, check_format, implementation, open_chain, require_file
from ._map import block_status
from ._progress import progress
from ._snapshot import find_snapshot, parse_snapshot_key

__all__ = ["ConvertOptions", "convert"]

#: Bytes one read job copies.
_CHUNK = 2 << 20
_SECTOR = 512
#: Zero runs that can hold a whole sector, or end the buffer (the disk's partial last one).
_ZERO_RUN = re.compile(b"\\x00{512,}|\\x00+\\Z")
_DATA, _ZERO, _BACKING = "data", "zero", "backing"


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    """What ``qemu-img convert`` options ask for (validated by :func:`convert`)."""

    out_fmt: str = "raw"
    options: tuple[tuple[str, object], ...] = ()
    compress: bool = False
    backing: str | None = None
    backing_fmt: str | None = None
    no_create: bool = False
    sparse_size: int = 4096
    workers: int = 4
    show_progress: bool = False
    #: An internal snapshot of the source to copy (``-l``: ID or name, or
    #: ``snapshot.id=ID,snapshot.name=NAME``).
    snapshot: str | None = None


def _runs(source: Any, path: str, top_only: bool) -> Iterator[tuple[int, int, str]]:
    """(offset, length, kind) over the source: data to copy, zeroes, or left to a backing."""
    if not top_only:
        for e in block_status(source, path):
            yield e.start, e.length, _ZERO if e.zero else _DATA
        return
    pos = 0
    while pos < source.size:
        mapping, n = source.get_shallow_mapping(pos, source.size - pos)
        if isinstance(mapping, IndirectMapping):
            kind = _BACKING
        elif isinstance(mapping, ZeroMapping):
            kind = _ZERO
        else:
            kind = _DATA
        yield pos, n, kind
        pos += n


def _chunks(runs: Iterator[tuple[int, int, str]]) -> Iterator[tuple[int, int, str]]:
    """Runs merged by kind and cut into jobs: data in reads of at most ``_CHUNK`` bytes
    aligned to ``_CHUNK`` (small data runs are merged, so zero detection sees whole runs)."""
    pending: tuple[int, int, str] | None = None
    for offset, length, kind in runs:
        if pending is not None and pending[2] == kind and pending[0] + pending[1] == offset:
            pending = (pending[0], pending[1] + length, kind)
        else:
            if pending is not None:
                yield from _cut(*pending)
            pending = (offset, length, kind)
        # Hand finished whole chunks on early: the reads then start before the scan ends.
        if pending[2] == _DATA and pending[1] >= 2 * _CHUNK:
            start, n, _ = pending
            keep_from = (start + n) // _CHUNK * _CHUNK
            yield from _cut(start, keep_from - start, _DATA)
            pending = (keep_from, start + n - keep_from, _DATA)
    if pending is not None:
        yield from _cut(*pending)


def _cut(offset: int, length: int, kind: str) -> Iterator[tuple[int, int, str]]:
    end = offset + length
    while offset < end:
        stop = min(end, (offset // _CHUNK + 1) * _CHUNK) if kind == _DATA else end
        yield offset, stop - offset, kind
        offset = stop


def _zero_pieces(data: bytes, offset: int, sparse: int) -> Iterator[tuple[int, int, bool]]:
    """Split ``data`` (at guest ``offset``) into (offset, length, is_zero) pieces.

    qemu-img.c ``is_allocated_sectors_min``: a run of whole zero 512-byte sectors at least
    ``sparse`` bytes long is a hole; everything else is data (``sparse`` 0: all data).
    """
    if sparse <= 0:
        yield offset, len(data), False
        return
    holes: list[tuple[int, int]] = []
    for match in _ZERO_RUN.finditer(data):
        # Shrink the run inward to whole sectors of the guest's 512-byte grid (a partial
        # sector at the buffer's end counts whole: it is the disk's last one).
        lo = match.start() + (-(offset + match.start()) % _SECTOR)
        hi = match.end()
        if hi < len(data):
            hi -= (offset + hi) % _SECTOR
        # Leading and trailing zero sectors are always holes; inner runs from ``sparse``.
        edge = lo == 0 or hi == len(data)
        if hi > lo and (edge or hi - lo >= sparse):
            holes.append((lo, hi))
    pos = 0
    for lo, hi in holes:
        if lo > pos:
            yield offset + pos, lo - pos, False
        yield offset + lo, hi - lo, True
        pos = hi
    if pos < len(data):
        yield offset + pos, len(data) - pos, False


def _validate(src: str, dst: str, opts: ConvertOptions, module: Any
              ) -> tuple[dict[str, object], bool]:
    """The output's creation options, and whether only the source's top layer is copied
    (the output has a backing file that supplies the rest)."""
    require_file(src, "source image")
    check_format(opts.out_fmt, "output format")
    if opts.compress:
        # qemu-img: "Compression not supported for this file format" (raw); a qcow2 image
        # with an external data file refuses compressed writes (qcow2_co_pwritev_compressed_part
        # returns -ENOTSUP) -- qemu-img finds out only after creating the output.
        if opts.out_fmt != "qcow2":
            raise ToolError(f"compressed output (-c) needs -O qcow2, not {opts.out_fmt}")
        if dict(opts.options).get("data_file") is not None:
            raise ToolError("compressed output (-c) cannot go to an image with an external "
                            "data file (data_file)")
        if not hasattr(module.FormatAccess, "write_compressed"):
            raise ToolError(f"compressed output (-c): {module.__name__} cannot write "
                            "compressed clusters yet (no FormatAccess.write_compressed)")
    if opts.snapshot is not None:
        parse_snapshot_key(opts.snapshot)
    if opts.workers < 1 or opts.workers > 64:
        raise ToolError(f"-m must be between 1 and 64, not {opts.workers}")
    if opts.sparse_size < 0 or opts.sparse_size % 512:
        raise ToolError(f"-S must be a multiple of 512, not {opts.sparse_size}")
    create = dict(opts.options)
    # qemu-img.c img_convert: a backing_file creation option is taken as -B ("out_baseimg =
    # out_baseimg_param"): the output gets that backing file and only the top layer is copied.
    backing, backing_fmt = opts.backing, opts.backing_fmt
    if backing is not None and create.get("backing_file") is not None:
        raise ToolError("give the output's backing file once: -B or -o backing_file")
    if backing is None and create.get("backing_file") is not None:
        backing = str(create["backing_file"])
        backing_fmt = backing_fmt or create.get("backing_fmt")  # type: ignore[assignment]
    if backing is not None:
        if opts.out_fmt != "qcow2":
            raise ToolError(f"a backing file (-B) needs -O qcow2, not {opts.out_fmt}")
        if backing_fmt is None:
            # qemu-img 7.2: "Use of backing file requires explicit backing format".
            raise ToolError(f"backing file (-B) {backing!r} needs its format (-F)")
        if not opts.no_create:  # with -n the output keeps the backing file it has
            create["backing_file"] = backing
            create["backing_fmt"] = check_format(str(backing_fmt), "backing format")
    if opts.no_create:
        require_file(dst, "output image")
    elif os.path.isdir(dst):
        raise ToolError(f"output {dst!r} is a directory")
    return create, backing is not None


def convert(src: str, dst: str, opts: ConvertOptions | None = None, *, impl: Impl = "fast",
            fmt: str | None = None) -> None:
    """Copy the guest contents of ``src`` into ``dst`` as ``qemu-img convert`` does."""
    opts = opts or ConvertOptions()
    module = implementation(impl)
    create, top_only = _validate(src, dst, opts, module)
    snapshot_id = None
    if opts.snapshot is not None:
        with open_chain(src, impl=module, fmt=fmt, force_share=True) as source:
            if source.info().format != "qcow2":
                raise ToolError(f"{src}: only qcow2 images have internal snapshots (-l)")
            snapshot_id = find_snapshot(source.info().snapshots,
                                        parse_snapshot_key(opts.snapshot), src).id
    with open_chain(src, impl=module, fmt=fmt, snapshot=snapshot_id) as source:
        size = source.size
        fresh = not opts.no_create
        if fresh:
            target_size = -(-size // 512) * 512 if opts.out_fmt == "qcow2" else size
            module.create_image(dst, target_size, format=opts.out_fmt, **create)
        target = module.open_image(dst, format=opts.out_fmt, writable=True)
        try:
            if target.size < size:
                raise ToolError(f"output {dst!r} ({target.size} bytes) is smaller than the "
                                f"source ({size} bytes)")
            _copy(source, src, target, opts, top_only, zero_init=fresh and not top_only)
            target.flush()
            target.sync()
        finally:
            target.close()
    if opts.compress:
        _align_end(dst)


def _align_end(path: str) -> None:
    """Grow the compressed output's file to a whole 512-byte sector, as qemu-img does.

    qemu-img.c convert_do_copy ends -c with ``blk_pwrite_compressed(s->target, 0, NULL, 0)``:
    qcow2_co_pwritev_compressed_part, "align end of file to a sector boundary to ease
    reading with sector based I/Os".  The bytes added lie past every cluster in use.
    """
    size = os.path.getsize(path)
    if size % 512:
        os.truncate(path, size + 512 - size % 512)


def _on_clusters(runs: Iterator[tuple[int, int, str]], cluster: int, size: int
                 ) -> Iterator[tuple[int, int, str]]:
    """The runs with every data run widened to whole output clusters (up to ``size``, the
    source's end): compressed clusters are written whole (qcow2_co_pwritev_compressed_part
    takes cluster-aligned requests only).  Zero and backing runs keep what is left."""
    listed = list(runs)
    widened: list[tuple[int, int]] = []
    for offset, length, kind in listed:
        if kind != _DATA:
            continue
        lo = offset // cluster * cluster
        hi = min(-(-(offset + length) // cluster) * cluster, size)
        if widened and lo <= widened[-1][1]:
            widened[-1] = (widened[-1][0], max(widened[-1][1], hi))
        else:
            widened.append((lo, hi))
    index = 0
    for offset, length, kind in listed:
        if kind == _DATA:
            while index < len(widened) and widened[index][0] <= offset:
                lo, hi = widened[index]
                yield lo, hi - lo, _DATA
                index += 1
            continue
        pos, end = offset, offset + length
        for lo, hi in widened[max(index - 1, 0):]:
            if lo >= end:
                break
            if hi <= pos:
                continue
            if lo > pos:
                yield pos, lo - pos, kind
            pos = max(pos, hi)
        if pos < end:
            yield pos, end - pos, kind
    for lo, hi in widened[index:]:
        yield lo, hi - lo, _DATA


def _copy(source: Any, src: str, target: Any, opts: ConvertOptions, top_only: bool,
          zero_init: bool) -> None:
    pending: deque[tuple[int, int, str, Future[bytes] | None]] = deque()
    window = 2 * opts.workers
    runs = _runs(source, src, top_only)
    if opts.compress:
        runs = _on_clusters(runs, target.info().cluster_size, source.size)
        # Compression is the cost of -c: let the implementation spread it over -m threads
        # (zlib and zstd release the GIL), as qemu-img compresses in a thread pool.
        target.set_write_parallelization(opts.workers)
    write = _write_compressed if opts.compress else _write
    with (ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="convert") as pool,
          progress(opts.show_progress, source.size, "convert") as bar):
        for offset, length, kind in _chunks(runs):
            job = pool.submit(source.read, offset, length) if kind == _DATA else None
            pending.append((offset, length, kind, job))
            if len(pending) >= window:
                done = pending.popleft()
                write(target, *done, opts, zero_init)
                bar.advance(done[1])
        while pending:
            done = pending.popleft()
            write(target, *done, opts, zero_init)
            bar.advance(done[1])


def _write(target: Any, offset: int, length: int, kind: str, job: Future[bytes] | None,
           opts: ConvertOptions, zero_init: bool) -> None:
    if kind == _BACKING:
        return
    if kind == _ZERO:
        if not zero_init:
            target.write_zeroes(offset, length)
        return
    assert job is not None
    data = job.result()
    for piece, n, is_zero in _zero_pieces(data, offset, opts.sparse_size):
        if not is_zero:
            at = piece - offset
            target.write(data[at : at + n], piece)
        elif not zero_init:
            target.write_zeroes(piece, n)


def _write_compressed(target: Any, offset: int, length: int, kind: str,
                      job: Future[bytes] | None, opts: ConvertOptions, zero_init: bool) -> None:
    """A cluster-aligned job of the compressed output: each cluster that is not all zeroes
    is compressed whole (the disk's last one padded to the disk's end).

    qemu-img.c convert_co_write: "Compressed clusters need to be written as a whole, so in
    that case we can only save the write if the buffer is completely zeroed."
    """
    if kind != _DATA:
        _write(target, offset, length, kind, job, opts, zero_init)
        return
    assert job is not None
    data = job.result()
    cluster = target.info().cluster_size
    run: list[bytes] = []  # consecutive clusters to compress, from ``run_at``
    run_at = offset
    for at in range(0, len(data), cluster):
        piece = data[at : at + cluster]
        if piece.count(0) == len(piece):
            _compress(target, run, run_at)
            run = []
            if not zero_init:
                target.write_zeroes(offset + at, len(piece))
            continue
        if not run:
            run_at = offset + at
        run.append(piece.ljust(min(cluster, target.size - (offset + at)), b"\0"))
    _compress(target, run, run_at)


def _compress(target: Any, clusters: list[bytes], offset: int) -> None:
    """Write consecutive whole clusters compressed: in one call where the implementation
    compresses several at once (pyimago.fast's ``write_compressed_many``), else each."""
    if not clusters:
        return
    many = getattr(target, "write_compressed_many", None)
    if many is not None:
        many(b"".join(clusters), offset)
        return
    for piece in clusters:
        target.write_compressed(piece, offset)
        offset += len(piece)
