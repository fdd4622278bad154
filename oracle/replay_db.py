"""``pyimago replay --database URL``: list the failures a campaign saved, and rerun them.

Every failure found by a run with ``--database`` is stored there as a replay record (see
:mod:`pyimago.oracle.database`); this reruns each one from the record alone, against the
target it names (or ``--target``), as ``pyimago replay FILE`` reruns a file.
"""

from __future__ import annotations

import sys

from pyimago._args import fail

from ._cli_support import target_error
from .database import DatabaseError, open_database, redact, saved_replays
from .replay import run_replay
from .targets import resolve_target

__all__ = ["replay_database"]

_PROG = "pyimago replay"


def replay_database(
    url: str,
    *,
    target: str | None = None,
    qemu_img: str | None = "auto",
    list_only: bool = False,
    quiet: bool = False,
) -> int:
    """List the replay records in the database ``url`` and rerun them (unless
    ``list_only``); the exit status: 1 when one still fails, else 0.  A database that cannot
    be used or a target that cannot be loaded is a one-line error (exit status 2).  The
    caller puts the folders targets are imported from on ``sys.path``."""
    try:
        db = open_database(url)
    except DatabaseError as exc:
        fail(_PROG, str(exc))
    saved = saved_replays(db)
    print(f"{len(saved)} saved failure(s) in {redact(url)}")
    for index, entry in enumerate(saved, 1):
        print(f"  {index}. {entry.describe()}")
    if list_only or not saved:
        return 0
    still_failing = 0
    for index, entry in enumerate(saved, 1):
        name = target or entry.replay.target or "reference"
        try:
            impl = resolve_target(name)
        except Exception as exc:
            fail(_PROG, f"{'--target' if target else f'saved failure {index}: target'} {name}: "
                        f"{target_error(exc)}")
        result = run_replay(entry.replay, impl, qemu_img=qemu_img)
        if not quiet:
            print(result.log)
        if result.failed:
            still_failing += 1
            print(f"{index}. replay FAILED against {impl.name}: {result.error}", file=sys.stderr)
        else:
            print(f"{index}. replay passed against {impl.name} "
                  f"({len(entry.replay.ops)} operations)")
    if still_failing:
        print(f"{_PROG}: {still_failing} of {len(saved)} saved failure(s) still fail",
              file=sys.stderr)
        return 1
    return 0
