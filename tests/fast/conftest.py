"""Fixtures for the pyimago.fast tests: QEMU tools and the QEMU-made image corpus.

Tests needing qemu-img skip with a loud reason where it is missing, except under
``CI=true``, where its absence fails them (CI must not go green without interop).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from typing import Any

import pyimago_tests_qemu as _qemu  # tests/fixtures/qemu.py, registered by tests/conftest.py
import pytest

# The qemu-img helpers the fast tests import from here (one copy, in tests/fixtures/qemu.py).
assert_qemu_check_clean = _qemu.assert_qemu_check_clean
qemu_img = _qemu.qemu_img
qemu_raw_bytes = _qemu.qemu_raw_bytes


def require_qemu() -> None:
    """Skip (or fail under CI=true) when qemu-img / qemu-io are missing."""
    _qemu.require_qemu("pyimago.fast")


@pytest.fixture
def needs_qemu() -> None:
    """For ``pytest.mark.usefixtures``: the test skips (fails under CI=true) without QEMU."""
    require_qemu()


@functools.cache
def damaged_fixtures() -> dict[str, Any]:
    """The names of tests/fixtures/damaged.py (QEMU's damaged-image cases)."""
    return vars(sys.modules["pyimago_tests_damaged"])  # registered by tests/conftest.py


@pytest.fixture(scope="session")
def qemu_corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    """Every image of the QEMU-made corpus (built once per worker)."""
    require_qemu()
    folder = tmp_path_factory.mktemp("fast-corpus")
    yield list(_qemu.corpus_builder()(folder))
