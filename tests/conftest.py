"""Project-wide pytest set-up: the spec-clause plugin and the Hypothesis profiles."""

from __future__ import annotations

import importlib.util

# Clause citations (@pytest.mark.clause) are checked against specs/ by this plugin, which
# also writes the per-clause report (--clause-report=FILE).
pytest_plugins = ["pyimago.specs._pytest"]

if importlib.util.find_spec("pyimago.oracle.profiles"):
    from pyimago.oracle.profiles import load_profile_from_env, register_profiles

    register_profiles()
    load_profile_from_env()
