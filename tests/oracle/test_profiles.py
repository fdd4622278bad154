"""The Hypothesis profiles: the example database lives under .pyimago-failures/."""

from __future__ import annotations

from pathlib import Path

from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase
from pyimago.oracle.profiles import EXAMPLE_DATABASE_DIR, PROFILES, register_profiles


def test_example_database_is_under_pyimago_failures() -> None:
    register_profiles()
    assert Path(EXAMPLE_DATABASE_DIR).parts[0] == ".pyimago-failures"
    for name in PROFILES:
        database = settings.get_profile(name).database
        if name == "ci":
            assert database is None  # derandomised: nothing to remember
            continue
        assert isinstance(database, DirectoryBasedExampleDatabase)
        assert Path(database.path) == Path(EXAMPLE_DATABASE_DIR)
