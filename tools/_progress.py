"""Progress bars for long tools (convert): rich on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["Progress", "progress"]


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
    if not enabled or not sys.stderr.isatty():
        yield _Silent()
        return
    try:
        from rich.console import Console
        from rich.progress import Progress as RichProgress
    except ImportError:  # rich is an optional dependency
        yield _Silent()
        return
    with RichProgress(console=Console(stderr=True), transient=True) as bar:
        yield _Rich(bar, bar.add_task(what, total=max(total, 1)))
