"""``python -m pyimago.tools COMMAND ARGS...``: the image tools without the main dispatcher."""

from __future__ import annotations

import importlib
import sys

from ._cli import COMMANDS


def main(argv: list[str] | None = None) -> int:
    """Run one image tool; exit 2 with a one-line error for an unknown command."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        print(f"pyimago.tools: error: expected a command ({names})", file=sys.stderr)
        return 2
    module, _, func = COMMANDS[args[0]].partition(":")
    status: int = getattr(importlib.import_module(module), func)(args[1:])
    return status


if __name__ == "__main__":
    sys.exit(main())
