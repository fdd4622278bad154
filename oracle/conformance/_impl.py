"""Which implementation the conformance suite checks, and what it claims to support.

The suite is run against one implementation, named by ``$PYIMAGO_CONFORMANCE_IMPL``:

``reference`` / ``fast``
    ``pyimago.reference`` / ``pyimago.fast``: full qcow2 and raw implementations.
``some.module``
    any importable module exposing ``open_image`` and ``create_image``.
``some.module:attr``
    ``attr`` is a module-like object with ``open_image`` and ``create_image`` (an oracle
    ``ImplementationTarget`` qualifies), or a callable returning one.

The contract types (errors, mappings, ``MemoryStorage``, ``PreallocateMode``) always come from
:mod:`pyimago.reference`, where they are defined for every implementation.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

from pyimago.reference import MemoryStorage, UnsupportedError

__all__ = [
    "CAPABILITIES",
    "IMPL_ENV",
    "LOAD_ERROR_ENV",
    "PROGRESS_ENV",
    "Capabilities",
    "Impl",
    "ImplError",
    "impl_from_env",
    "load_impl",
]

#: The environment variable naming the implementation under test.
IMPL_ENV: Final = "PYIMAGO_CONFORMANCE_IMPL"

#: Where the suite writes why it could not load the implementation (set by the runner).
LOAD_ERROR_ENV: Final = "PYIMAGO_CONFORMANCE_LOAD_ERROR"

#: A file the results plugin keeps "<tests done> <tests collected>" in (set by the runner).
PROGRESS_ENV: Final = "PYIMAGO_CONFORMANCE_PROGRESS"

#: Short names of the implementations that ship with pyimago.
_BUILTIN: Final = {"reference": "pyimago.reference", "fast": "pyimago.fast"}

#: Every capability a test may require (see :class:`Capabilities`).
CAPABILITIES: Final = ("qcow2", "raw", "backing", "resize", "discard", "format_access")


class ImplError(ValueError):
    """The implementation named for the conformance run cannot be loaded."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the implementation under test claims to support.

    Tests that need a capability the implementation lacks are *not applicable* to it.
    ``format_access``: its ``FormatAccess`` class is exposed and wraps foreign drivers.
    """

    qcow2: bool = True
    raw: bool = True
    backing: bool = True
    resize: bool = True
    discard: bool = True
    format_access: bool = True

    def missing(self, needed: Iterable[str]) -> list[str]:
        """The capabilities of ``needed`` this implementation lacks."""
        out = []
        for name in needed:
            if name not in CAPABILITIES:
                raise ValueError(f"unknown capability {name!r} (known: {', '.join(CAPABILITIES)})")
            if not getattr(self, name):
                out.append(name)
        return out


@dataclass(frozen=True, slots=True)
class Impl:
    """The implementation under test: its entry points and capabilities."""

    spec: str
    """How it was named (the value of ``$PYIMAGO_CONFORMANCE_IMPL``)."""
    name: str
    open_image: Callable[..., Any]
    create_image: Callable[..., None]
    capabilities: Capabilities
    format_access: type | None = None
    """The implementation's ``FormatAccess`` class, if it exposes one."""
    obj: object = None
    """The loaded module or target object."""


def _load_object(spec: str) -> tuple[str, object]:
    if spec in _BUILTIN:
        return spec, importlib.import_module(_BUILTIN[spec])
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        obj: object = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if callable(obj) and not isinstance(obj, (ModuleType, type)) and not hasattr(
            obj, "open_image"
        ):
            obj = obj()
        return spec, obj
    return spec, importlib.import_module(spec)


def _declared(obj: object) -> Capabilities | None:
    # A target of the oracle's driver-fuzzing API may say what it supports; honour the fields
    # we know under the names that API may use, and assume support for the rest.
    caps = getattr(obj, "capabilities", None)
    if caps is None:
        return None
    if isinstance(caps, Capabilities):
        return caps

    def flag(*names: str) -> bool:
        for name in names:
            value = getattr(caps, name, None)
            if value is not None:
                return bool(value)
        return True

    formats = getattr(caps, "formats", None)
    fmt = {str(f) for f in formats} if formats is not None else None
    return Capabilities(
        qcow2="qcow2" in fmt if fmt is not None else flag("qcow2"),
        raw="raw" in fmt if fmt is not None else flag("raw"),
        backing=flag("backing", "backing_files"),
        resize=flag("resize"),
        discard=flag("discard"),
        format_access=getattr(obj, "FormatAccess", None) is not None,
    )


def _supports_format(create: Callable[..., None], fmt: str) -> bool:
    # Only an explicit UnsupportedError counts as "not supported"; any other failure is left
    # for the tests to report, so a broken implementation cannot hide behind this probe.
    try:
        create(MemoryStorage(name=f"probe.{fmt}"), 65536, format=fmt)
    except UnsupportedError:
        return False
    except Exception:
        return True
    return True


def load_impl(spec: str) -> Impl:
    """Load the implementation ``spec`` names (see the module docstring)."""
    spec = spec.strip() or "reference"
    try:
        name, obj = _load_object(spec)
    except Exception as exc:
        # Whatever importing a third party's module raises (a SyntaxError, a failing
        # factory): the implementation cannot be loaded, and that is one error.
        why = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, ImportError | AttributeError):
            why = f"{type(exc).__name__}: {why}"
        raise ImplError(f"cannot load implementation {spec!r}: {why}") from exc
    open_image = getattr(obj, "open_image", None)
    create_image = getattr(obj, "create_image", None)
    if not callable(open_image) or not callable(create_image):
        raise ImplError(f"implementation {spec!r} lacks callable open_image / create_image")
    format_access = getattr(obj, "FormatAccess", None)
    if not isinstance(format_access, type):
        format_access = None
    caps = _declared(obj)
    if caps is None:
        if spec in _BUILTIN:
            caps = Capabilities()
        else:
            caps = Capabilities(
                qcow2=_supports_format(create_image, "qcow2"),
                raw=_supports_format(create_image, "raw"),
                format_access=format_access is not None,
            )
    display = getattr(obj, "name", None)
    return Impl(
        spec=spec,
        name=display if isinstance(display, str) and display else name,
        open_image=open_image,
        create_image=create_image,
        capabilities=caps,
        format_access=format_access,
        obj=obj,
    )


def impl_from_env() -> Impl:
    """The implementation ``$PYIMAGO_CONFORMANCE_IMPL`` names (``reference`` if unset)."""
    return load_impl(os.environ.get(IMPL_ENV, "reference"))
