"""Implementation targets: which ``open_image`` / ``create_image`` the machines drive.

The oracle never imports an implementation directly; a :class:`ImplementationTarget` names
the two entry points (and whether ``open_image`` takes the reference's ``l2_cache_tables``
knob), so the same machine runs against ``pyimago.reference``, ``pyimago.fast``, a mutant,
or a third party's module.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fuzz import DriverCapabilities

__all__ = [
    "ImplementationTarget",
    "module_target",
    "reference_target",
    "resolve_target",
]


@dataclass(frozen=True, slots=True)
class ImplementationTarget:
    """How to create and open images with one implementation.

    ``open_image(path_or_storage, *, writable, format, backing)`` must return a
    FormatAccess-like object; ``create_image(path_or_storage, size, *, format, **options)``
    takes ``qemu-img create -o`` style options.  ``module`` is the importable name recorded in
    replay files (None when the target cannot be re-created by name, e.g. a test's mutant).
    """

    name: str
    open_image: Callable[..., Any]
    create_image: Callable[..., None]
    module: str | None = None
    l2_cache_option: bool = False
    """Whether ``open_image`` accepts ``l2_cache_tables=N`` (the reference's cache size)."""
    capabilities: DriverCapabilities | None = None
    """What the implementation claims to support (None: everything).  Sessions expect
    ``UnsupportedError`` from operations outside it (see ``pyimago.oracle.DriverTarget``)."""
    differential: bool = False
    """Also check each chain against ``pyimago.reference``: the same sequence on a shadow
    chain, and the implementation's images read back by the reference (qcow2 targets)."""
    crash_safe: bool = True
    """The implementation promises ``crash.power-cut`` (pyimago's own do): sessions record
    the top layer's storage and check the states a power cut can leave."""
    file_storage: Callable[..., Any] | None = None
    """``file_storage(path, writable=...)``: the implementation's own file Storage, used when
    a session opens a file chain's top layer through a recording storage (default: the
    reference's ``FileStorage``)."""

    def open(
        self,
        location: Any,
        *,
        writable: bool,
        format: str,
        backing: Any = None,
        explicit_backing: bool = False,
        l2_cache_tables: int | None = None,
        data_file: Any = None,
    ) -> Any:
        """Open an image; the backing is passed only when ``explicit_backing`` says so, the
        external data file (a Storage) only when given."""
        kwargs: dict[str, Any] = {"writable": writable, "format": format}
        if explicit_backing:
            kwargs["backing"] = backing
        if data_file is not None:
            kwargs["data_file"] = data_file
        if l2_cache_tables is not None and self.l2_cache_option:
            kwargs["l2_cache_tables"] = l2_cache_tables
        return self.open_image(location, **kwargs)


def _takes(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def module_target(module: ModuleType | str, *, name: str | None = None) -> ImplementationTarget:
    """A target for any module exposing ``open_image`` and ``create_image``."""
    mod = importlib.import_module(module) if isinstance(module, str) else module
    open_image = getattr(mod, "open_image", None)
    create_image = getattr(mod, "create_image", None)
    if not callable(open_image) or not callable(create_image):
        raise TypeError(f"module {mod.__name__} lacks open_image/create_image")
    return ImplementationTarget(
        name=name or mod.__name__,
        open_image=open_image,
        create_image=create_image,
        module=mod.__name__,
        l2_cache_option=_takes(open_image, "l2_cache_tables"),
        file_storage=getattr(mod, "FastFileStorage", None) or getattr(mod, "FileStorage", None),
    )


def reference_target() -> ImplementationTarget:
    """The reference implementation, ``pyimago.reference``."""
    return module_target("pyimago.reference", name="reference")


def resolve_target(spec: str) -> ImplementationTarget:
    """A target from a command-line name.

    ``reference`` (the default), a module name (``pyimago.fast``), or ``module:attribute``
    where the attribute is an :class:`ImplementationTarget` or a
    :class:`~pyimago.oracle.DriverTarget`, or a function returning one.
    """
    if spec in ("", "reference", "pyimago.reference"):
        return reference_target()
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        obj = getattr(importlib.import_module(mod_name), attr)
        if callable(obj) and not isinstance(obj, ImplementationTarget):
            obj = obj()
        as_implementation = getattr(obj, "implementation", None)
        if callable(as_implementation) and not isinstance(obj, ImplementationTarget):
            # A DriverTarget: remember how it was named, so replay files can name it too.
            if dataclasses.is_dataclass(obj) and getattr(obj, "module", "") is None:
                obj = dataclasses.replace(obj, module=spec)  # type: ignore[type-var]
            obj = obj.implementation()
        if not isinstance(obj, ImplementationTarget):
            raise TypeError(
                f"{spec} is {type(obj).__name__}, not an ImplementationTarget or DriverTarget"
            )
        return obj
    return module_target(spec)
