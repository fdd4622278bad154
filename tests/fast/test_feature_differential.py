"""pyimago.fast against pyimago.reference on images with extended L2 entries or an external
data file: the same random requests give the same bytes, sizes, errors and mapping kinds at
every sector, and a raw data file holds the same disk in both."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyimago import fast, reference
from pyimago_tests_differential import assert_same_results, requests

_CS = 16384  # the smallest extended L2 cluster: 512-byte subclusters
_SIZE = 6 * _CS + 1024

_op = requests(_SIZE, 2 * _CS)

_LAYOUTS: dict[str, dict[str, Any]] = {
    "extl2": {"extended_l2": True},
    "data-file": {"data_file": "d.raw"},
    "data-file-raw": {"data_file": "d.raw", "data_file_raw": True},
    "data-file-extl2": {"data_file": "d.raw", "extended_l2": True},
}


def _reference_writes_them() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            reference.create_image(os.path.join(tmp, "a.qcow2"), _CS, extended_l2=True,
                                   cluster_size=_CS)
        except reference.PyimagoError:
            return False
        return True


pytestmark = pytest.mark.skipif(
    not _reference_writes_them(),
    reason="pyimago.reference does not write extended L2 / data file images on this branch",
)


@pytest.mark.clause("qcow2.extended-l2.write", "qcow2.extended-l2.clear",
                    "qcow2.data-file.write", "qcow2.data-file.raw", "qcow2.data-file.resize")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(_op, max_size=20),
    layout=st.sampled_from(sorted(_LAYOUTS)),
    backing=st.booleans(),
)
def test_fast_matches_reference_on_feature_images(
    ops: list[tuple[str, int, int, int]], layout: str, backing: bool
) -> None:
    options = dict(_LAYOUTS[layout], cluster_size=_CS)
    backing = backing and not options.get("data_file_raw")  # qemu-img refuses the pair
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for mod in (reference, fast):
            folder = os.path.join(tmp, mod.__name__)
            os.mkdir(folder)
            if backing:
                base = os.path.join(folder, "base.raw")
                mod.create_image(base, _SIZE - 1024, format="raw")
                with mod.open_image(base, writable=True, format="raw") as b:
                    b.write(b"\xbb" * (_SIZE - 1024), 0)
                options.update(backing_file="base.raw", backing_fmt="raw")
            path = os.path.join(folder, "a.qcow2")
            mod.create_image(path, _SIZE, **options)
            images.append(mod.open_image(path, writable=True))
        ref, fst = images
        try:
            assert_same_results(ref, fst, ops)
        finally:
            ref.close()
            fst.close()
        if options.get("data_file_raw"):
            with open(os.path.join(tmp, "pyimago.reference", "d.raw"), "rb") as a, \
                    open(os.path.join(tmp, "pyimago.fast", "d.raw"), "rb") as b:
                assert a.read() == b.read()
