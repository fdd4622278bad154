"""``convert``: copy an image's guest contents (or several images', end to end) into a new
(or existing) image.

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
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from ._common import (
    Impl,
    ToolError,
    check_format,
    implementation,
    open_chain,
    open_file_for_writing,
    require_file,
    require_room,
    same_file,
)
from ._progress import progress
from ._snapshot import find_snapshot, parse_snapshot_key
from ._sources import BACKING as _BACKING
from ._sources import DATA as _DATA
from ._sources import ZERO as _ZERO
from ._sources import Sources, sector_span

__all__ = ["ConvertOptions", "convert"]

#: Bytes one read job copies.
_CHUNK = 2 << 20
_SECTOR = 512
_ZERO_SECTOR = bytes(_SECTOR)
_ZERO_BLOCK = bytes(64 << 10)
_NONZERO = re.compile(b"[^\\x00]")


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
    #: Open the sources without the shared-permission lock checks (qemu-img ``-U``).
    force_share: bool = False
    #: The existing output (``-n``) reads as zeroes already: zero ranges are not written
    #: (qemu-img ``--target-is-zero``).
    target_is_zero: bool = False


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
    for start, hi in _zero_runs(data):
        # Shrink the run inward to whole sectors of the guest's 512-byte grid (a partial
        # sector at the buffer's end counts whole: it is the disk's last one).
        lo = start + (-(offset + start) % _SECTOR)
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


def _zero_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of the maximal runs of zero bytes at least a sector long, and of a
    shorter run that ends ``data``.  Searched with C-speed bytes.find/startswith: a regular
    expression stepping byte by byte over the data took most of a convert's time."""
    pos, n = 0, len(data)
    while pos < n:
        start = data.find(_ZERO_SECTOR, pos)
        if start < 0:
            break
        end = start + _SECTOR
        while data.startswith(_ZERO_BLOCK, end):
            end += len(_ZERO_BLOCK)
        found = _NONZERO.search(data, end)
        end = found.start() if found is not None else n
        yield start, end
        pos = end
    if pos < n and data[-1] == 0:
        yield len(data.rstrip(b"\0")), n


def _validate(sources: Sequence[str], dst: str, opts: ConvertOptions, module: Any
              ) -> tuple[dict[str, object], bool]:
    """The output's creation options, and whether only the source's top layer is copied
    (the output has a backing file that supplies the rest)."""
    if not sources:
        raise ToolError("convert needs at least one source image")
    for src in sources:
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
        if len(sources) > 1:
            # qemu-img.c img_convert: "No support for concatenating multiple snapshot".
            raise ToolError(f"-l {opts.snapshot!r}: a snapshot cannot be copied from "
                            f"{len(sources)} concatenated source images (give one source)")
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
        if len(sources) > 1:
            # qemu-img.c img_convert: "Having a backing file for the target makes no sense
            # when concatenating multiple input images".
            raise ToolError(f"backing file (-B) {backing!r}: the output cannot have a backing "
                            f"file when {len(sources)} source images are concatenated")
        if opts.out_fmt != "qcow2":
            raise ToolError(f"a backing file (-B) needs -O qcow2, not {opts.out_fmt}")
        if backing_fmt is None:
            # qemu-img 7.2: "Use of backing file requires explicit backing format".
            raise ToolError(f"backing file (-B) {backing!r} needs its format (-F)")
        if not opts.no_create:  # with -n the output keeps the backing file it has
            create["backing_file"] = backing
            create["backing_fmt"] = check_format(str(backing_fmt), "backing format")
    if opts.target_is_zero and not opts.no_create:
        # qemu-img.c img_convert: "--target-is-zero requires use of -n flag".
        raise ToolError("--target-is-zero needs -n (an existing output that reads as zeroes)")
    if opts.target_is_zero and backing is not None:
        raise ToolError("--target-is-zero cannot be used when the output has a backing file "
                        f"({backing!r})")
    if opts.no_create:
        require_file(dst, "output image")
    elif os.path.isdir(dst):
        raise ToolError(f"output {dst!r} is a directory")
    for src in sources:
        # qemu-img fails on the image lock ("Failed to get "write" lock"); a fresh output
        # would be created over the very source it is to be read from.
        if same_file(src, dst):
            raise ToolError(f"output {dst!r} is also a source image ({src!r})")
    return create, backing is not None


def convert(src: str | Sequence[str], dst: str, opts: ConvertOptions | None = None, *,
            impl: Impl = "fast", fmt: str | None = None) -> None:
    """Copy the guest contents of ``src`` into ``dst`` as ``qemu-img convert`` does.

    ``src`` may be several images (qemu-img convert's several FILENAMEs): they are copied
    one after the other, each taking its size rounded up to whole 512-byte sectors, so the
    output's disk is the sum of their sizes.  ``fmt`` is the format of every source.
    """
    opts = opts or ConvertOptions()
    sources = [src] if isinstance(src, str) else list(src)
    module = implementation(impl)
    create, top_only = _validate(sources, dst, opts, module)
    snapshot_id = None
    if opts.snapshot is not None:
        with open_chain(sources[0], impl=module, fmt=fmt, force_share=True) as source:
            if source.info().format != "qcow2":
                raise ToolError(f"{sources[0]}: only qcow2 images have internal snapshots (-l)")
            snapshot_id = find_snapshot(source.info().snapshots,
                                        parse_snapshot_key(opts.snapshot), sources[0]).id
    with ExitStack() as stack:
        whole = Sources([(stack.enter_context(open_chain(
            path, impl=module, fmt=fmt, snapshot=snapshot_id, force_share=opts.force_share)),
            path) for path in sources])
        size = whole.size
        fresh = not opts.no_create
        if fresh:
            require_room(dst, size, create.get("preallocation"))
            module.create_image(dst, size, format=opts.out_fmt, **create)
        target = module.open_image(dst, format=opts.out_fmt, writable=True)
        try:
            # qemu-img.c: "output file is smaller than input file" (counted in sectors).
            if sector_span(target.size) < size:
                raise ToolError(f"output {dst!r} ({target.size} bytes) is smaller than the "
                                f"source ({size} bytes)")
            if opts.target_is_zero and target.info().backing_file is not None:
                # qemu-img: "Cannot use --target-is-zero when the destination image has a
                # backing file" (7.2 then exits 0 without copying; pyimago exits 2).
                raise ToolError(f"--target-is-zero: output {dst!r} has a backing file, so "
                                "its unallocated ranges need not read as zeroes")
            zero_init = (fresh and not top_only) or opts.target_is_zero
            _copy(whole, target, opts, top_only, zero_init=zero_init)
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

    The file grows through a Storage, then is synced: a power cut before the growth is on
    the medium leaves the image as ``close`` synced it (crash.power-cut).
    """
    storage = open_file_for_writing(path)
    try:
        size = storage.size()
        if size % 512:
            storage.resize(size + 512 - size % 512)
            storage.sync()
    finally:
        storage.close()


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


def _copy(source: Sources, target: Any, opts: ConvertOptions, top_only: bool,
          zero_init: bool) -> None:
    pending: deque[tuple[int, int, str, Future[bytes] | None]] = deque()
    window = 2 * opts.workers
    runs = source.runs(top_only)
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
