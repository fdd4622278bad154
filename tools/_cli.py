"""The image tools as ``pyimago`` subcommands: ``<name>_main(argv) -> exit status``.

Arguments are parsed and checked before any work starts; every error is one line on stderr
and exit status 2 (never a traceback).  Exit statuses otherwise follow qemu-img's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from pyimago.reference import ImageInUseError, PyimagoError

from ._chain import commit
from ._check import render_check, timed_check, write_junit
from ._common import (
    IMPLEMENTATIONS,
    ToolError,
    parse_options,
    parse_size,
    require_file,
)
from ._compare import compare
from ._convert import ConvertOptions, convert
from ._create import create, resize
from ._info import image_info, render_info, render_snapshots
from ._map import map_image, render_map
from ._measure import measure, render_measure
from ._progress import progress
from ._rebase import rebase
from ._snapshot import apply_snapshot, create_snapshot, delete_snapshot

__all__ = [
    "COMMANDS",
    "check_main",
    "commit_main",
    "compare_main",
    "convert_main",
    "create_main",
    "info_main",
    "map_main",
    "measure_main",
    "rebase_main",
    "resize_main",
    "snapshot_main",
]

_ERROR_EXIT = 2


class _Usage(Exception):
    """A command-line error (argparse's), reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _parser(prog: str, description: str) -> _Parser:
    parser = _Parser(prog=f"pyimago {prog}", description=description)
    parser.add_argument("--impl", choices=sorted(IMPLEMENTATIONS), default="fast",
                        help="implementation used as the engine (default: fast)")
    return parser


def _size(text: str) -> int:
    """argparse type: a byte count with qemu-img's optional suffix."""
    try:
        return parse_size(text)
    except ToolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The subcommands whose -U opens an image another process holds (read-only).
_SHARING = frozenset({"info", "map", "measure", "compare", "convert", "check", "snapshot"})
_LOCK = re.compile(r'failed to get (?:shared )?"[a-z ]+" lock')


def _in_use(prog: str, exc: BaseException) -> str | None:
    """The one line for an image another process holds, in the command line's terms (the
    implementations' message names the Python API's force_share= and locking=)."""
    cause = exc if isinstance(exc, ImageInUseError) else exc.__cause__
    if not isinstance(cause, ImageInUseError):
        return None
    lock = _LOCK.search(str(cause))
    what = f" ({lock.group(0)})" if lock else ""
    # A reader fails on the lock that refuses sharing writes: -U lifts that (not a write).
    reader = lock is not None and "shared" in lock.group(0)
    hint = "; -U reads it anyway" if prog in _SHARING and reader else ""
    return f"{cause.filename} is in use by another process{what}{hint}"


def _run(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except (PyimagoError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = _in_use(prog, exc) or message
        print(f"pyimago {prog}: error: {message}", file=sys.stderr)
        return _ERROR_EXIT
    except KeyboardInterrupt:
        print(f"pyimago {prog}: interrupted", file=sys.stderr)
        return 130


def _parse(parser: _Parser, argv: Sequence[str], *positionals: str, quiet: bool = False
           ) -> argparse.Namespace | int:
    """Add ``-q`` (with ``quiet``) and the positional arguments, then parse: the arguments,
    or the exit status when parsing ended the command."""
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    for name in positionals:
        parser.add_argument(name)
    try:
        return parser.parse_args(list(argv))
    except _Usage as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return _ERROR_EXIT
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


def _progress_arg(parser: _Parser) -> None:
    parser.add_argument("-p", dest="progress", action="store_true",
                        help="show a progress bar (on a terminal only)")


def _reader_args(parser: _Parser, output: str | None) -> None:
    """Options every reading tool takes: -f, --output (default ``output``), -U."""
    parser.add_argument("-f", dest="fmt", choices=("qcow2", "raw"), help="image format")
    if output is not None:
        parser.add_argument("--output", choices=("human", "json"), default=output,
                            help=f"output format (default: {output})")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open read-only even if another process holds the image (qemu-img -U)")


def _creation_args(parser: _Parser, flag: str) -> None:
    """The format of a new image (``flag``: -O or -f; stored as ``out_fmt``) and its -o."""
    parser.add_argument(flag, dest="out_fmt", choices=("qcow2", "raw"), default="raw",
                        help="format of the new image (default: raw)")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        help="creation options of the new image (name=value,...)")


# -- info ----------------------------------------------------------------------------------------


def info_main(argv: Sequence[str]) -> int:
    """``pyimago info [-f FMT] [--output human|json] [--backing-chain] [-U] IMAGE``."""
    parser = _parser("info", "Show what qemu-img info shows about an image.")
    _reader_args(parser, "human")
    parser.add_argument("--backing-chain", action="store_true",
                        help="also show every image of the backing chain")
    args = _parse(parser, argv, "image")
    if isinstance(args, int):
        return args

    def body() -> int:
        records = image_info(args.image, impl=args.impl, fmt=args.fmt,
                             backing_chain=args.backing_chain, force_share=args.force_share)
        sys.stdout.write(render_info(records, output=args.output,
                                     backing_chain=args.backing_chain))
        return 0

    return _run("info", body)


# -- map -----------------------------------------------------------------------------------------


def map_main(argv: Sequence[str]) -> int:
    """``pyimago map [-f FMT] [--output human|json] [--start-offset N] [--max-length N] IMAGE``."""
    parser = _parser("map", "Show where each guest range of an image is stored (qemu-img map).")
    _reader_args(parser, "human")
    parser.add_argument("-s", "--start-offset", type=_size, default=0,
                        help="first guest offset to map")
    parser.add_argument("-l", "--max-length", type=_size, default=None,
                        help="map at most this many bytes")
    args = _parse(parser, argv, "image")
    if isinstance(args, int):
        return args

    def body() -> int:
        entries = map_image(args.image, impl=args.impl, fmt=args.fmt,
                            start_offset=args.start_offset, max_length=args.max_length,
                            force_share=args.force_share)
        try:
            text = render_map(entries, output=args.output)
        except ToolError as exc:
            # qemu-img map's human output cannot show compressed data: exit 1, as it does.
            print(f"pyimago map: error: {exc}", file=sys.stderr)
            return 1
        sys.stdout.write(text)
        return 0

    return _run("map", body)


# -- measure -------------------------------------------------------------------------------------


def measure_main(argv: Sequence[str]) -> int:
    """``pyimago measure [--output human|json] [-O FMT] [-o OPTS] (--size N | [-f FMT] IMAGE)``."""
    parser = _parser("measure", "Compute the size a new image needs (qemu-img measure).")
    _reader_args(parser, "human")
    parser.add_argument("-O", dest="out_fmt", choices=("qcow2", "raw"), default="raw",
                        help="format of the image to measure for (default: raw)")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        help="creation options of that image (name=value,...)")
    parser.add_argument("--size", type=_size, help="measure an empty disk of this size")
    parser.add_argument("image", nargs="?")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args

    def body() -> int:
        options = parse_options(args.options, args.out_fmt)
        if args.image is not None:
            require_file(args.image)
        result = measure(args.image, size=args.size, out_fmt=args.out_fmt, options=options,
                         impl=args.impl, fmt=args.fmt, force_share=args.force_share)
        sys.stdout.write(render_measure(result, output=args.output))
        return 0

    return _run("measure", body)


# -- compare -------------------------------------------------------------------------------------


def compare_main(argv: Sequence[str]) -> int:
    """``pyimago compare [-f FMT] [-F FMT] [-s] [-q] IMAGE1 IMAGE2``: exit 0 identical,
    1 different, 2 error."""
    parser = _parser("compare", "Compare the guest contents of two images (qemu-img compare).")
    parser.add_argument("-f", dest="fmt1", choices=("qcow2", "raw"), help="first image format")
    parser.add_argument("-F", dest="fmt2", choices=("qcow2", "raw"), help="second image format")
    parser.add_argument("-s", "--strict", action="store_true",
                        help="a size or allocation difference is a difference")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open read-only even if another process holds the image (qemu-img -U)")
    args = _parse(parser, argv, "image1", "image2")
    if isinstance(args, int):
        return args

    def body() -> int:
        require_file(args.image1)
        require_file(args.image2)
        result = compare(args.image1, args.image2, fmt1=args.fmt1, fmt2=args.fmt2,
                         strict=args.strict, impl=args.impl, force_share=args.force_share)
        if not args.quiet:
            sys.stdout.write("".join(f"{line}\n" for line in result.messages))
        return result.exit_code

    return _run("compare", body)


# -- convert -------------------------------------------------------------------------------------


def convert_main(argv: Sequence[str]) -> int:
    """``pyimago convert [-f FMT] [-O FMT] [-o OPTS] [-B BACKING [-F FMT]] [-n
    [--target-is-zero]] [-c] [-p] [-S SIZE] [-m N] SOURCE [SOURCE...] OUTPUT`` (several
    sources are concatenated)."""
    parser = _parser("convert", "Copy an image's guest contents into another image "
                                "(qemu-img convert).")
    parser.add_argument("-f", dest="fmt", choices=("qcow2", "raw"), help="source format")
    _creation_args(parser, "-O")
    parser.add_argument("-B", dest="backing", help="backing file of the output")
    parser.add_argument("-F", dest="backing_fmt", choices=("qcow2", "raw"),
                        help="format of the backing file")
    parser.add_argument("-n", dest="no_create", action="store_true",
                        help="the output exists: do not create it")
    parser.add_argument("-c", dest="compress", action="store_true",
                        help="compress the output's data clusters (qcow2)")
    parser.add_argument("--target-is-zero", action="store_true",
                        help="with -n: the output reads as zeroes, zero ranges are skipped")
    _progress_arg(parser)
    parser.add_argument("-S", dest="sparse_size", type=_size, default=4096,
                        help="zero runs this long become holes (default 4k; 0: never)")
    parser.add_argument("-m", dest="workers", type=int, default=4,
                        help="parallel read jobs (default 4)")
    parser.add_argument("-l", dest="snapshot",
                        help="convert this internal snapshot of the source (ID or name, or "
                             "snapshot.id=ID,snapshot.name=NAME)")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open read-only even if another process holds the image (qemu-img -U)")
    parser.add_argument("sources", metavar="source", nargs="+",
                        help="source image (several: copied one after the other)")
    args = _parse(parser, argv, "output", quiet=True)
    if isinstance(args, int):
        return args

    def body() -> int:
        opts = ConvertOptions(
            out_fmt=args.out_fmt,
            options=tuple(parse_options(args.options, args.out_fmt).items()),
            compress=args.compress,
            backing=args.backing,
            backing_fmt=args.backing_fmt,
            no_create=args.no_create,
            sparse_size=args.sparse_size,
            workers=args.workers,
            show_progress=args.progress and not args.quiet,
            snapshot=args.snapshot,
            force_share=args.force_share,
            target_is_zero=args.target_is_zero,
        )
        convert(args.sources, args.output, opts, impl=args.impl, fmt=args.fmt)
        return 0

    return _run("convert", body)


# -- create and resize ---------------------------------------------------------------------------


def create_main(argv: Sequence[str]) -> int:
    """``pyimago create [-f FMT] [-o OPTS] [-b BACKING -F FMT] [-u] [-q] IMAGE [SIZE]``."""
    parser = _parser("create", "Create a new image (qemu-img create).")
    _creation_args(parser, "-f")
    parser.add_argument("-b", dest="backing", help="backing file (qcow2)")
    parser.add_argument("-F", dest="backing_fmt", choices=("qcow2", "raw"),
                        help="format of the backing file")
    parser.add_argument("-u", dest="unsafe", action="store_true",
                        help="do not open the backing file (it may not exist yet)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    parser.add_argument("image")
    parser.add_argument("size", nargs="?", type=_size)
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args

    def body() -> int:
        line = create(args.image, args.size, fmt=args.out_fmt,
                      options=parse_options(args.options, args.out_fmt), backing=args.backing,
                      backing_fmt=args.backing_fmt, unsafe=args.unsafe, impl=args.impl)
        if not args.quiet:
            print(line)
        return 0

    return _run("create", body)


def resize_main(argv: Sequence[str]) -> int:
    """``pyimago resize [-f FMT] [--shrink] [--preallocation MODE] [-q] IMAGE [+|-]SIZE``."""
    parser = _parser("resize", "Change an image's disk size (qemu-img resize).")
    parser.add_argument("-f", dest="fmt", choices=("qcow2", "raw"), help="image format")
    parser.add_argument("--shrink", action="store_true", help="allow making the disk smaller")
    parser.add_argument("--preallocation", choices=("off", "metadata", "falloc", "full"),
                        help="how to prepare a grown area")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    parser.add_argument("image")
    parser.add_argument("size", help="new size, or +SIZE / -SIZE relative to the current one")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args

    def body() -> int:
        resize(args.image, args.size, fmt=args.fmt, shrink=args.shrink,
               preallocation=args.preallocation, impl=args.impl)
        if not args.quiet:
            print("Image resized.")
        return 0

    return _run("resize", body)


# -- check ---------------------------------------------------------------------------------------


def check_main(argv: Sequence[str]) -> int:
    """``pyimago check [-f FMT] [-r leaks|all] [--output human|json] [--junit FILE] [-q]
    IMAGE``: exit 0 clean, 1 the check failed, 2 corruptions, 3 leaks only."""
    parser = _parser("check", "Check (and repair) an image as qemu-img check does.")
    _reader_args(parser, "human")
    parser.add_argument("-r", dest="repair", choices=("leaks", "all"),
                        help="repair leaks only, or everything that can be")
    parser.add_argument("--junit", help="also write the verdict as a JUnit XML file")
    _progress_arg(parser)
    args = _parse(parser, argv, "image", quiet=True)
    if isinstance(args, int):
        return args

    def body() -> int:
        if args.junit is not None:
            folder = os.path.dirname(os.path.abspath(args.junit))
            if not os.path.isdir(folder) or os.path.isdir(args.junit):
                raise ToolError(f"--junit {args.junit!r}: not a file in an existing folder")
        # The bar counts the L1 entries check() has walked (of all L1 tables); a repair
        # walks again from 0.  qemu-img check has no -p.
        with progress(args.progress and not args.quiet, 0, f"check {args.image}") as bar:
            result, seconds = timed_check(args.image, repair=args.repair, impl=args.impl,
                                          fmt=args.fmt, progress=bar.update,
                                          force_share=args.force_share)
        if not args.quiet:
            for problem in result.problems:
                print(problem, file=sys.stderr)
            sys.stdout.write(render_check(result, output=args.output))
        if args.junit is not None:
            write_junit(args.junit, result, seconds)
        return result.exit_code

    return _run("check", body)


# -- commit, rebase, snapshot --------------------------------------------------------------------


def commit_main(argv: Sequence[str]) -> int:
    """``pyimago commit [-f FMT] [-d] [-b BASE] [-p] [-q] IMAGE``: the overlay's data into
    its backing file (or into BASE, further down its chain)."""
    parser = _parser("commit", "Write an overlay's data into its backing file "
                               "(qemu-img commit).")
    parser.add_argument("-f", dest="fmt", choices=("qcow2", "raw"), help="image format")
    parser.add_argument("-d", dest="keep", action="store_true",
                        help="keep the overlay's data (do not empty it)")
    parser.add_argument("-b", dest="base",
                        help="commit into this image of the backing chain (implies -d)")
    _progress_arg(parser)
    args = _parse(parser, argv, "image", quiet=True)
    if isinstance(args, int):
        return args

    def body() -> int:
        commit(args.image, fmt=args.fmt, keep=args.keep, impl=args.impl, base=args.base,
               show_progress=args.progress and not args.quiet)
        if not args.quiet:
            print("Image committed.")
        return 0

    return _run("commit", body)


def rebase_main(argv: Sequence[str]) -> int:
    """``pyimago rebase [-f FMT] [-u] -b BACKING [-F FMT] [-q] IMAGE`` (``-b ''``: none)."""
    parser = _parser("rebase", "Give an overlay a new backing file (qemu-img rebase).")
    parser.add_argument("-f", dest="fmt", choices=("qcow2", "raw"), help="image format")
    parser.add_argument("-b", dest="backing", required=True,
                        help="the new backing file ('' for none)")
    parser.add_argument("-F", dest="backing_fmt", choices=("qcow2", "raw"),
                        help="format of the new backing file")
    parser.add_argument("-u", dest="unsafe", action="store_true",
                        help="only change the name: the contents are not compared")
    _progress_arg(parser)
    args = _parse(parser, argv, "image", quiet=True)
    if isinstance(args, int):
        return args

    def body() -> int:
        rebase(args.image, args.backing, new_fmt=args.backing_fmt, unsafe=args.unsafe,
               fmt=args.fmt, impl=args.impl, show_progress=args.progress and not args.quiet)
        return 0

    return _run("rebase", body)


def snapshot_main(argv: Sequence[str]) -> int:
    """``pyimago snapshot [-f FMT] (-l | -c NAME | -a SNAPSHOT | -d NAME) [-q] IMAGE``."""
    parser = _parser("snapshot", "List, create, apply or delete an image's internal snapshots "
                                 "(qemu-img snapshot).")
    parser.add_argument("-f", dest="fmt", choices=("qcow2", "raw"), help="image format")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    action.add_argument("-c", dest="create", metavar="NAME",
                        help="create a snapshot of the current state")
    action.add_argument("-a", dest="apply", metavar="SNAPSHOT",
                        help="revert the disk to a snapshot (ID or name)")
    action.add_argument("-d", dest="delete", metavar="NAME", help="delete the snapshot NAME")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open read-only even if another process holds the image (qemu-img -U)")
    args = _parse(parser, argv, "image", quiet=True)
    if isinstance(args, int):
        return args
    for flag, value in (("-c", args.create), ("-a", args.apply), ("-d", args.delete)):
        if value == "":
            print(f"pyimago snapshot: error: {flag}: the snapshot name must not be empty",
                  file=sys.stderr)
            return _ERROR_EXIT

    def body() -> int:
        if args.force_share and args.list is not True:
            # qemu-img: "force-share=on can only be used with read-only images".
            raise ToolError("-U (force share) can only be used with -l: -c, -a and -d write")
        if args.create is not None:
            create_snapshot(args.image, args.create, impl=args.impl, fmt=args.fmt)
        elif args.apply is not None:
            apply_snapshot(args.image, args.apply, impl=args.impl, fmt=args.fmt)
        elif args.delete is not None:
            delete_snapshot(args.image, args.delete, impl=args.impl, fmt=args.fmt)
        else:
            records = image_info(args.image, impl=args.impl, fmt=args.fmt,
                                 force_share=args.force_share)
            if not args.quiet:
                sys.stdout.write(render_snapshots(records[0]))
        return 0

    return _run("snapshot", body)


#: Subcommand name -> "module:function" for the ``pyimago`` dispatcher.
COMMANDS = {
    "info": "pyimago.tools._cli:info_main",
    "map": "pyimago.tools._cli:map_main",
    "measure": "pyimago.tools._cli:measure_main",
    "compare": "pyimago.tools._cli:compare_main",
    "convert": "pyimago.tools._cli:convert_main",
    "check": "pyimago.tools._cli:check_main",
    "commit": "pyimago.tools._cli:commit_main",
    "rebase": "pyimago.tools._cli:rebase_main",
    "snapshot": "pyimago.tools._cli:snapshot_main",
    "create": "pyimago.tools._cli:create_main",
    "resize": "pyimago.tools._cli:resize_main",
}
