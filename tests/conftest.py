"""Project-wide pytest set-up: the spec-clause plugin and the Hypothesis profiles."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Clause citations (@pytest.mark.clause) are checked against specs/ by this plugin, which
# also writes the per-clause report (--clause-report=FILE).
pytest_plugins = ["pyimago.specs._pytest"]

if importlib.util.find_spec("pyimago.oracle.profiles"):
    from pyimago.oracle.profiles import load_profile_from_env, register_profiles

    register_profiles()
    load_profile_from_env()


@pytest.fixture
def known_crash_bugs() -> Callable[[], Any]:
    """A context manager: a failure of the power-cut rule (``crash.*`` clauses) inside it is
    an xfail (issue 10: the write-ordering fixes in reference and fast have not all landed);
    any other failure fails.  The lead removes its uses once those fixes are merged."""
    from pyimago.oracle.crash import crash_clauses

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if crash_clauses(exc):
                pytest.xfail(f"issue 10: known write-ordering bug: {str(exc)[:300]}")
            raise

    return guard
