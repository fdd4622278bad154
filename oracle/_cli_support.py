"""What the oracle's commands share: import paths, one-line target errors, failure text.

Standard library only (the commands import this before anything heavy).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterable

__all__ = ["add_import_paths", "budget_note", "format_failure", "target_error"]


def add_import_paths(folders: Iterable[str]) -> list[str]:
    """Put ``folders`` and the current folder first on ``sys.path``, as absolute paths.

    As ``python -m`` would: a driver next to the user is importable by name.  Absolute,
    so that a subprocess started elsewhere (the conformance suite's) resolves the same
    modules; returns the folders added, in order.
    """
    added = [os.path.abspath(f) for f in [*folders, os.getcwd()]]
    for folder in reversed(added):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    return added


def target_error(exc: BaseException) -> str:
    """Why a target (or implementation) named on the command line did not load, in a line."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"no module named {exc.name!r}"
    if isinstance(exc, AttributeError) and getattr(exc, "name", None):
        return f"no attribute {exc.name!r}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def format_failure(error: BaseException) -> str:
    """A failure found by the oracle, for a person: the exception and its notes (Hypothesis's
    shrunk program, the oracle's log, the replay file), without the oracle's own frames."""
    return "".join(traceback.format_exception_only(error)).rstrip()


def budget_note(runs: int, budget: int, *, failed: bool) -> str:
    """How many examples ran, saying why when that is more than the budget asked for.

    Hypothesis counts only valid examples against ``max_examples`` and, after a failure,
    runs many more while shrinking it; a bare "243 examples" under ``--examples 100``
    would read as a bug.
    """
    if runs <= budget:
        return f"{runs:,}"
    extra = runs - budget
    why = "shrink steps" if failed else "runs Hypothesis did not count (invalid or overrun)"
    return f"{runs:,} ({budget:,} examples + {extra:,} {why})"
