"""pyimago.fast offers pyimago.reference's names, with the same parameter names: code written
against one runs against the other by changing the import."""

from __future__ import annotations

import inspect
from pathlib import Path

import pyimago.fast as fast
import pyimago.reference as reference
import pytest

#: The reference's own drivers (fast has its own layers instead) and its image checker
#: (``qemu-img check``'s counterpart; fast has none of its own yet).
REFERENCE_ONLY = {"Qcow2Driver", "RawDriver", "check"}
#: Names both export, each its own implementation.
OWN = {"FormatAccess", "FileStorage", "open_image", "create_image", "probe_format", "check"}


def test_fast_exports_every_reference_name() -> None:
    missing = set(reference.__all__) - REFERENCE_ONLY - set(fast.__all__)
    assert not missing, f"pyimago.fast lacks {sorted(missing)}"
    for name in fast.__all__:
        assert hasattr(fast, name), name


@pytest.mark.parametrize("name", sorted(set(reference.__all__) - REFERENCE_ONLY - OWN))
def test_contract_names_are_the_reference_s_objects(name: str) -> None:
    assert getattr(fast, name) is getattr(reference, name)


@pytest.mark.parametrize("name", ["open_image", "create_image", "probe_format", "FileStorage",
                                  "check"])
def test_same_parameter_names(name: str) -> None:
    ours = inspect.signature(getattr(fast, name)).parameters
    theirs = inspect.signature(getattr(reference, name)).parameters
    for param in theirs.values():
        assert param.name in ours, f"fast.{name} lacks parameter {param.name}"
        assert ours[param.name].kind == param.kind, f"fast.{name}({param.name}) kind differs"
    # The positional parameters come in the same order.
    positional = [p.name for p in theirs.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in ours.values() if p.kind is p.POSITIONAL_OR_KEYWORD][
        : len(positional)] == positional


def test_reference_auto_opens_the_backing_in_fast(tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    reference.create_image(str(base), 65536, format="raw")
    with reference.open_image(str(base), writable=True) as img:
        img.write(b"from the base", 4096)
    reference.create_image(str(top), 65536, backing_file="base.raw", backing_fmt="raw")
    with fast.open_image(top, backing=reference.AUTO,
                         gate=fast.PermissiveImplicitOpenGate()) as img:
        assert img.read(4096, 13) == b"from the base"
    storage = fast.FileStorage(str(top))
    try:
        assert fast.probe_format(storage) == "qcow2" == reference.probe_format(storage)
    finally:
        storage.close()
