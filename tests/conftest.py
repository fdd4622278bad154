"""Project-wide pytest set-up: the spec-clause plugin and the Hypothesis profiles."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# Clause citations (@pytest.mark.clause) are checked against specs/ by this plugin, which
# also writes the per-clause report (--clause-report=FILE).
pytest_plugins = ["pyimago.specs._pytest"]

# QEMU's damaged-image cases (tests/fixtures/damaged.py), shared by the reference, fast and
# interop tests: ``tests/`` is not a package (``--import-mode=importlib``), so the script is
# registered under a private name once, here, and imported by that name.
if "pyimago_tests_damaged" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "pyimago_tests_damaged", Path(__file__).parent / "fixtures" / "damaged.py"
    )
    assert _spec is not None and _spec.loader is not None
    _damaged = importlib.util.module_from_spec(_spec)
    sys.modules["pyimago_tests_damaged"] = _damaged
    _spec.loader.exec_module(_damaged)

if importlib.util.find_spec("pyimago.oracle.profiles"):
    from pyimago.oracle.profiles import load_profile_from_env, register_profiles

    register_profiles()
    load_profile_from_env()
