"""Progress bars for long tools (convert, commit, rebase, check): rich on a terminal,
nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["Progress", "progress"]


class Progress(Protocol):
    def advance(self, done: int) -> None:
        """``done`` more units are done."""

    def update(self, done: int, total: int) -> None:
        """``done`` units of ``total`` are done (for work that reports where it is, as
        check() does)."""


class _Silent:
    def advance(self, done: int) -> None:
        pass

    def update(self, done: int, total: int) -> None:
        pass


class _Rich:
    def __init__(self, bar: Any, task: Any) -> None:
        self._bar = bar
        self._task = task

    def advance(self, done: int) -> None:
        self._bar.update(self._task, advance=done)

    def update(self, done: int, total: int) -> None:
        self._bar.update(self._task, completed=done, total=max(total, 1))


@contextmanager
def progress(enabled: bool, total: int, what: str) -> Iterator[Progress]:
    """A progress bar over ``total`` units (bytes, or what ``update`` reports) on stderr,
    shown only when ``enabled`` and stderr is a terminal (and rich is installed): logs and
    pipes get no control characters."""
    rich = _rich(enabled)
    if rich is None:
        yield _Silent()
        return
    console, rich_progress = rich
    with rich_progress.Progress(console=console, transient=True) as bar:
        yield _Rich(bar, bar.add_task(what, total=max(total, 1)))


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
