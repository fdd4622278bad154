"""Argument parsing for the ``pyimago`` subcommands: one-line errors, values checked up front.

The rule (GUIDE, CLI): every error is one line naming the offending value, exit status 2,
checked before any work starts, never a traceback.  :class:`CliParser` makes argparse keep
that rule (argparse prints the usage block above its error); the ``type=`` functions below
check values while the arguments are parsed, so a run never starts on an argument that
would make it fail later (an output file that cannot be written, say, found out only after
the whole run).  Standard library only: the dispatcher imports this without any extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

__all__ = [
    "CliParser",
    "existing_dir",
    "existing_file",
    "fail",
    "non_negative_int",
    "output_dir",
    "output_file",
    "positive_float",
    "positive_int",
]

#: The exit status of every usage error.
USAGE_ERROR = 2


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: message`` as one line on stderr and exit with status 2."""
    line = " ".join(message.split())  # one line, whatever the message held
    print(f"{prog}: {line}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_ERROR)


class CliParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see '{self.prog} --help')")


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A number greater than 0 (seconds, say)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def existing_file(text: str) -> str:
    """A path naming an existing regular file (readable)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return text


def existing_dir(text: str) -> str:
    """A path naming an existing folder."""
    path = Path(text)
    if not path.is_dir():
        what = "not a folder" if path.exists() else "no such folder"
        raise argparse.ArgumentTypeError(f"{text}: {what}")
    return text


def output_file(text: str) -> str:
    """A file that can be written (``-`` is standard output).

    Checked by doing it: the file is opened for appending (and removed again if this
    created it), so a read-only file system or a missing folder is found now, not after
    the run that was to fill it.
    """
    if text == "-":
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder, not a file")
    existed = path.exists()
    if not existed and not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text}: {str(path.parent)!r} {what}")
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: cannot write: {exc.strerror}") from None
    if not existed:
        path.unlink(missing_ok=True)
    return text


def output_dir(text: str) -> str:
    """A folder that exists and can be written into, or can be created (it is not yet)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {str(existing)!r} is not writable")
    return text
