"""Set-up of the tests of ``pyimago.reference``: the shared helpers module.

``tests/`` is not a package (pytest runs with ``--import-mode=importlib``), so ``_helpers.py``
is loaded by path and registered as ``pyimago_tests_reference_helpers`` before any test
module of this folder is imported.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "pyimago_tests_reference_helpers"

if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("_helpers.py"))
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
