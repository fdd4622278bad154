"""Project-wide pytest set-up: the spec-clause plugin and the Hypothesis profiles."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# Clause citations (@pytest.mark.clause) are checked against specs/ by this plugin, which
# also writes the per-clause report (--clause-report=FILE).
pytest_plugins = ["pyimago.specs._pytest"]

# Shared fixture modules: QEMU's damaged-image cases (tests/fixtures/damaged.py, for the
# reference, fast and interop tests) and the qemu-img helpers (tests/fixtures/qemu.py, for
# the fast and tools tests).  ``tests/`` is not a package (``--import-mode=importlib``), so
# each script is registered under a private name once, here, and imported by that name.
for _name, _file in (("pyimago_tests_damaged", "damaged.py"),
                     ("pyimago_tests_qemu", "qemu.py")):
    if _name not in sys.modules:
        _spec = importlib.util.spec_from_file_location(
            _name, Path(__file__).parent / "fixtures" / _file
        )
        assert _spec is not None and _spec.loader is not None
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[_name] = _module
        _spec.loader.exec_module(_module)

if importlib.util.find_spec("pyimago.oracle.profiles"):
    from pyimago.oracle.profiles import load_profile_from_env, register_profiles

    register_profiles()
    load_profile_from_env()
