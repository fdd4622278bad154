"""Progress for long tools: a bar (convert, commit, rebase) or, where the work is one call
that reports no progress (check), a spinner with the elapsed time; rich on a terminal,
nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["Progress", "busy", "progress"]


class Progress(Protocol):
    def advance(self, done: int) -> None: ...


class _Silent:
    def advance(self, done: int) -> None:
        pass


class _Rich:
    def __init__(self, bar: object, task: object) -> None:
        self._bar = bar
        self._task = task

    def advance(self, done: int) -> None:
        self._bar.update(self._task, advance=done)  # type: ignore[attr-defined]


@contextmanager
def progress(enabled: bool, total: int, what: str) -> Iterator[Progress]:
    """A progress bar over ``total`` bytes on stderr, shown only when ``enabled`` and stderr
    is a terminal (and rich is installed): logs and pipes get no control characters."""
    rich = _rich(enabled)
    if rich is None:
        yield _Silent()
        return
    console, rich_progress = rich
    with rich_progress.Progress(console=console, transient=True) as bar:
        yield _Rich(bar, bar.add_task(what, total=max(total, 1)))


@contextmanager
def busy(enabled: bool, what: str) -> Iterator[None]:
    """A spinner and the elapsed time on stderr while the block runs (on a terminal only)."""
    rich = _rich(enabled)
    if rich is None:
        yield
        return
    console, rich_progress = rich
    columns = (rich_progress.SpinnerColumn(), rich_progress.TextColumn("{task.description}"),
               rich_progress.TimeElapsedColumn())
    with rich_progress.Progress(*columns, console=console, transient=True) as bar:
        bar.add_task(what, total=None)
        yield


def _rich(enabled: bool) -> tuple[Any, Any] | None:
    """A stderr console and the rich.progress module, when progress is to be shown."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        import rich.progress
        from rich.console import Console
    except ImportError:  # rich is an optional dependency
        return None
    return Console(stderr=True), rich.progress
