"""The ``pyimago`` command: a dispatcher over a table of subcommands.

Each subcommand is a row of :data:`COMMANDS` (data, not code): its name, the function that
runs it as ``"module:function"`` (taking the argument list, returning the exit status), a
one-line help, and the extra it needs (``None``: the runtime dependencies suffice).  The
dispatcher imports a subcommand's module only when that subcommand runs, so ``pyimago
--help`` and ``pyimago --version`` work with nothing but the runtime dependencies, and a
command whose extra is missing says so in one line (exit status 2) instead of failing on an
import.

Adding a command is one row.  The image tools (``pyimago.tools``) expose ``<name>_main`` in
``pyimago.tools._cli``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, cast

from . import __version__
from ._args import USAGE_ERROR, fail

__all__ = ["COMMANDS", "DEBUG_ENV", "EXTRAS", "Command", "main", "missing_extra"]


@dataclass(frozen=True, slots=True)
class Command:
    """One ``pyimago`` subcommand."""

    name: str
    entry: str
    """``"module:function"``; the function takes the arguments after the command name and
    returns the exit status."""
    help: str
    extra: str | None = None
    """The extra (``pip install 'pyimago[extra]'``) the command needs, if any."""


#: Every subcommand, in the order ``pyimago --help`` lists them.
COMMANDS: Final[tuple[Command, ...]] = (
    Command("run", "pyimago.oracle.cli:run_main",
            "run the oracle's state machines against an implementation", "oracle"),
    Command("replay", "pyimago.oracle.cli:replay_main",
            "run a recorded failure (a replay file) again", "oracle"),
    Command("fuzz", "pyimago.oracle.fuzz._cli:fuzz_main",
            "fuzz a format driver (module:target) against the oracle", "oracle"),
    Command("conformance", "pyimago.oracle.report:conformance_main",
            "per-clause conformance report of an implementation (md/html/json/junit)",
            "oracle"),
    # The image tools (pyimago.tools, runtime dependencies only).
    Command("info", "pyimago.tools._cli:info_main", "show an image's format and chain"),
    Command("map", "pyimago.tools._cli:map_main", "print an image's mappings"),
    Command("compare", "pyimago.tools._cli:compare_main", "compare two images' contents"),
    Command("check", "pyimago.tools._cli:check_main",
            "check (and repair) an image; exit 0/1/2/3 as qemu-img; --junit for CI"),
    Command("convert", "pyimago.tools._cli:convert_main", "copy an image to a new format"),
    Command("create", "pyimago.tools._cli:create_main", "create an image"),
    Command("resize", "pyimago.tools._cli:resize_main", "grow or shrink an image"),
    Command("measure", "pyimago.tools._cli:measure_main", "the size a conversion needs"),
    Command("commit", "pyimago.tools._cli:commit_main", "write an overlay into its backing"),
    Command("rebase", "pyimago.tools._cli:rebase_main", "give an overlay a new backing file"),
    Command("snapshot", "pyimago.tools._cli:snapshot_main", "list internal snapshots (-l)"),
)

#: The modules each extra brings (the import names of its requirements in pyproject.toml;
#: tests/test_cli.py checks the two agree).
EXTRAS: Final[dict[str, tuple[str, ...]]] = {
    "oracle": ("hypothesis", "pytest", "rich"),
}

#: Set (to anything) to let an internal error's traceback through.
DEBUG_ENV: Final = "PYIMAGO_DEBUG"

_BY_NAME: Final = {command.name: command for command in COMMANDS}


def missing_extra(command: Command) -> list[str]:
    """The modules of ``command``'s extra that cannot be imported here."""
    if command.extra is None:
        return []
    return [m for m in EXTRAS[command.extra] if importlib.util.find_spec(m) is None]


def _help() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [
        "usage: pyimago COMMAND [ARGS...]    (pyimago COMMAND --help for its options)",
        "",
        "pyimago: qcow2 and raw disk images; the oracle's state machines, driver fuzzing and",
        "conformance reports.",
        "",
        "commands:",
    ]
    for c in COMMANDS:
        note = ""
        if c.extra is not None:
            note = f"  [{c.extra}]" if not missing_extra(c) else (
                f"  [needs: pip install 'pyimago[{c.extra}]']")
        lines.append(f"  {c.name:<{width}}  {c.help}{note}")
    lines += [
        "",
        "options:",
        "  -h, --help     show this help and exit",
        "  --version      print pyimago's version and exit",
        "",
        "exit status: 0 success; 1 a failure was found (or a must clause failed);",
        "2 bad arguments (one line on stderr naming the value).",
    ]
    return "\n".join(lines)


def _entry(command: Command) -> Callable[[list[str]], int]:
    module, _, function = command.entry.partition(":")
    return cast(Callable[[list[str]], int], getattr(importlib.import_module(module), function))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyimago`` command; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    first, rest = (words[0], words[1:]) if words else ("", [])
    try:
        if not words:
            fail("pyimago", f"missing command (commands: {', '.join(_BY_NAME)}; "
                            "see 'pyimago --help')")
        if first in ("-h", "--help", "help"):
            print(_help())
            return 0
        if first == "--version":
            print(f"pyimago {__version__}")
            return 0
        command = _BY_NAME.get(first)
        if command is None:
            what = "option" if first.startswith("-") else "command"
            fail("pyimago", f"unknown {what} {first!r} (commands: "
                            f"{', '.join(_BY_NAME)}; see 'pyimago --help')")
        prog = f"pyimago {command.name}"
        missing = missing_extra(command)
        if missing:
            fail(prog, f"needs the {command.extra!r} extra: pip install "
                       f"'pyimago[{command.extra}]' (missing: {', '.join(missing)})")
        return _entry(command)(rest)
    except SystemExit as exc:
        # argparse's --help and the one-line usage errors (pyimago._args.fail) end this way.
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else USAGE_ERROR)
    except KeyboardInterrupt:
        print("pyimago: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A bug of pyimago's own (the commands report what they test themselves): still one
        # line, unless PYIMAGO_DEBUG asks for the traceback.
        if os.environ.get(DEBUG_ENV):
            raise
        text = " ".join(str(exc).split())
        print(f"pyimago {first}: internal error: {type(exc).__name__}: {text} "
              f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return USAGE_ERROR
