"""A deterministic scheduler for replays of sequences that ran with parallelization > 1.

Both implementations split a request into jobs and hand them to a
``concurrent.futures.ThreadPoolExecutor``; the order the threads run them in is up to the
operating system, so a failure found with parallelization > 1 may not come back on a plain
re-run.  Inside :func:`serial_jobs` every executor runs each job at once, in the thread
that submits it, in submission order: the job splitting and the executor calls are the
implementation's own, only the interleaving is fixed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["serial_jobs"]

_lock = threading.Lock()


def _submit_now(self: ThreadPoolExecutor, fn: Callable[..., Any], /, *args: Any,
                **kwargs: Any) -> Future[Any]:
    future: Future[Any] = Future()
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as exc:  # the job's error is the future's, as with a thread
        future.set_exception(exc)
    return future


@contextlib.contextmanager
def serial_jobs() -> Iterator[None]:
    """Run every ``ThreadPoolExecutor`` job synchronously, in submission order."""
    with _lock:
        original = ThreadPoolExecutor.submit
        ThreadPoolExecutor.submit = _submit_now  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            ThreadPoolExecutor.submit = original  # type: ignore[method-assign]
