"""What a third-party driver is, for the oracle: how to create and open its images, and what
it claims to support.

A :class:`DriverTarget` is the one object a driver's author writes.  The oracle generates only
what the target claims (backing chains, discard kinds, resizes, preallocation modes, storages,
the layouts it lists) and expects ``UnsupportedError`` from the rest; layers of other formats
below the driver's (raw and qcow2 backing images) are made with ``pyimago.reference``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from pyimago.reference import PreallocateMode
from pyimago.reference import create_image as reference_create
from pyimago.reference import open_image as reference_open

from ..strategies import CLUSTER_SIZES
from ..targets import ImplementationTarget

__all__ = [
    "DISCARD_KINDS",
    "STORAGES",
    "DriverCapabilities",
    "DriverTarget",
    "Layout",
    "load_target",
    "qcow2_layouts",
]

#: The discard operations a target may support: ``discard_to_zero`` / ``_any`` / ``_backing``.
DISCARD_KINDS: Final = frozenset({"zero", "any", "backing"})
#: Where chains may live: ``MemoryStorage`` objects, or files in a temporary folder.
STORAGES: Final = ("memory", "file")
#: ``create_image(preallocation=...)`` values besides ``"off"``.
CREATE_PREALLOCATION: Final = frozenset({"metadata", "falloc", "full"})

_SECTOR = 512


@dataclass(frozen=True, slots=True, init=False)
class Layout:
    """One kind of image the driver creates: its allocation unit and ``create_image`` options.

    ``granularity`` is what the model checks mappings at (the cluster or chunk size: every
    unit maps wholly as data, explicit zero or unallocated); ``zero_clusters`` says whether
    the layout records explicit zeroes (qcow2 v3 does, v2 does not).  The keyword options
    are passed to the target's ``create_image``::

        Layout(4096, chunk_size=4096)
        Layout(65536, zero_clusters=False, cluster_size=65536, compat="0.10")

    A layout is identified by ``(granularity, zero_clusters)``: replay files record those two.
    """

    granularity: int
    zero_clusters: bool
    options: tuple[tuple[str, Any], ...]

    def __init__(self, granularity: int, *, zero_clusters: bool = True, **options: Any) -> None:
        if (
            not isinstance(granularity, int)
            or granularity < _SECTOR
            or granularity % _SECTOR
            or granularity & (granularity - 1)
        ):
            raise ValueError(
                f"layout granularity must be a power of two of at least 512 bytes, "
                f"not {granularity!r}"
            )
        object.__setattr__(self, "granularity", granularity)
        object.__setattr__(self, "zero_clusters", bool(zero_clusters))
        object.__setattr__(self, "options", tuple(sorted(options.items())))

    @property
    def compat(self) -> str:
        """How a chain description records ``zero_clusters`` (qcow2's ``compat``)."""
        return "1.1" if self.zero_clusters else "0.10"

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options)
        zero = "zero clusters" if self.zero_clusters else "no zero clusters"
        return f"{self.granularity} B units, {zero}" + (f" ({opts})" if opts else "")


def qcow2_layouts(
    cluster_sizes: Iterable[int] = CLUSTER_SIZES, compats: Iterable[str] = ("1.1", "0.10")
) -> tuple[Layout, ...]:
    """qcow2 layouts (``cluster_size`` × ``compat``), biased to small clusters as the
    reference's machines are: small clusters put L2-table boundaries inside small disks."""
    return tuple(
        Layout(cs, zero_clusters=compat != "0.10", cluster_size=cs, compat=compat)
        for cs in cluster_sizes
        for compat in compats
    )


@dataclass(frozen=True, slots=True)
class DriverCapabilities:
    """What a target claims to support, as the oracle consults it (see :class:`DriverTarget`).

    ``resize``, ``discard`` and ``formats`` are also what the conformance report
    (``pyimago conformance``) reads from a target.
    """

    formats: tuple[str, ...]
    layouts: tuple[Layout, ...]
    backing: bool = True
    backing_formats: tuple[str, ...] = ("raw", "qcow2")
    discards: frozenset[str] = DISCARD_KINDS
    resize_grow: bool = True
    resize_shrink: bool = True
    preallocation: frozenset[PreallocateMode] = frozenset(PreallocateMode)
    create_preallocation: frozenset[str] = CREATE_PREALLOCATION
    storages: tuple[str, ...] = STORAGES
    compressed: bool = False

    @property
    def format(self) -> str:
        """The driver's own format (the top layer of every chain)."""
        return self.formats[0]

    @property
    def resize(self) -> bool:
        return self.resize_grow or self.resize_shrink

    @property
    def discard(self) -> bool:
        return bool(self.discards)

    @property
    def zero_clusters(self) -> bool:
        return any(layout.zero_clusters for layout in self.layouts)

    def layout_for(self, granularity: int, zero_clusters: bool) -> Layout:
        """The layout a chain description names (by granularity and zero clusters)."""
        for layout in self.layouts:
            if layout.granularity == granularity and layout.zero_clusters == zero_clusters:
                return layout
        raise ValueError(
            f"no layout of {self.format} has {granularity} B units with"
            f"{'' if zero_clusters else 'out'} zero clusters"
        )

    def supports_discard(self, op_name: str) -> bool:
        """Whether ``discard_to_zero`` / ``discard_to_any`` / ``discard_to_backing`` is claimed."""
        return op_name.removeprefix("discard_to_") in self.discards

    def supports_grow(self, prealloc: PreallocateMode) -> bool:
        return self.resize_grow and prealloc in self.preallocation

    def unsupported(self) -> list[str]:
        """What the target does not claim, in words (for reports)."""
        out = [f"discard_to_{kind}" for kind in sorted(DISCARD_KINDS - self.discards)]
        if not self.resize_grow:
            out.append("resize grow")
        else:
            out += [f"grow {m.value}" for m in PreallocateMode if m not in self.preallocation]
        if not self.resize_shrink:
            out.append("resize shrink")
        if not self.backing:
            out.append("backing files")
        out += [f"create preallocation={p}" for p in sorted(CREATE_PREALLOCATION -
                                                            self.create_preallocation)]
        out += [f"{s} storage" for s in STORAGES if s not in self.storages]
        return out


def _takes(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _frozen(values: Iterable[Any], what: str, allowed: Iterable[Any]) -> frozenset[Any]:
    out = frozenset(values)
    unknown = out - frozenset(allowed)
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(map(str, unknown))}")
    return out


@dataclass(frozen=True, slots=True)
class DriverTarget:
    """A format driver under test: how to create and open its images, what it supports.

    ``create_image(location, size, *, format, **options)`` creates an image of ``size`` bytes
    at ``location`` (a path, or a ``MemoryStorage`` for in-memory chains); ``options`` are a
    :class:`Layout`'s options plus, over a backing image the oracle made, ``backing_file``
    (the backing's file name, relative to the image's folder) and ``backing_fmt``, and
    ``preallocation`` (``"metadata"``, ``"falloc"`` or ``"full"``) when the layout is created
    preallocated.

    ``open_image(location, *, writable, format, backing)`` returns a FormatAccess-like object
    (``pyimago.reference.FormatAccess(driver)`` for a ``FormatDriver``).  ``backing`` is
    passed for in-memory chains only (the opened backing image, or None); for files the
    driver opens the backing file the image names itself, as ``qemu-img`` would.  ``format``
    is passed only if ``open_image`` takes it.

    Everything is claimed by default; switch off what the driver does not do.  The oracle
    then never relies on it and instead checks that asking for it raises
    ``pyimago.reference.UnsupportedError`` (any ``io.UnsupportedOperation``).

    ``module``: the ``module:attribute`` that re-creates this target, recorded in replay files
    so that ``pyimago replay FILE`` finds it (set for you when the target is named that way).
    """

    name: str
    format: str
    create_image: Callable[..., None]
    open_image: Callable[..., Any]
    layouts: tuple[Layout, ...] = ()
    """The images to create (default for qcow2: :func:`qcow2_layouts`; required otherwise)."""
    backing: bool = True
    """Images can sit over a backing image (a chain of up to 3 layers)."""
    backing_formats: tuple[str, ...] | None = None
    """Formats the oracle may put below: ``raw``, ``qcow2`` (made with the reference) and the
    driver's own (default: all three)."""
    discards: frozenset[str] = DISCARD_KINDS
    """Of ``{"zero", "any", "backing"}``: the ``discard_to_*`` operations it implements."""
    resize_grow: bool = True
    resize_shrink: bool = True
    preallocation: frozenset[PreallocateMode] = frozenset(PreallocateMode)
    """The ``PreallocateMode`` values a grow accepts."""
    create_preallocation: frozenset[str] = CREATE_PREALLOCATION
    """``create_image(preallocation=...)`` values it accepts besides ``"off"``."""
    storages: tuple[str, ...] = STORAGES
    """``"memory"`` (MemoryStorage objects) and / or ``"file"`` (real files)."""
    compressed: bool | None = None
    """Build chains whose qcow2 layers hold compressed clusters (default: qcow2 targets)."""
    differential: bool | None = None
    """Also run each sequence on the reference and let the reference read the driver's
    images (default: qcow2 targets)."""
    crash_safe: bool = False
    """The driver promises ``crash.power-cut``: a cut after any storage write leaves an
    image that opens, keeps what ``flush()`` + ``sync()`` made durable and shows every
    other sector old or new.  Opting in makes every session check cut states."""
    module: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.format:
            raise ValueError("a DriverTarget needs a name and a format")
        layouts = tuple(self.layouts) or (qcow2_layouts() if self.format == "qcow2" else ())
        if not layouts:
            raise ValueError(f"{self.name}: list the layouts of {self.format} images to create")
        object.__setattr__(self, "layouts", layouts)
        object.__setattr__(self, "discards", _frozen(self.discards, "discard kinds",
                                                      DISCARD_KINDS))
        object.__setattr__(self, "preallocation", _frozen(self.preallocation,
                                                           "preallocation modes",
                                                           PreallocateMode))
        object.__setattr__(self, "create_preallocation",
                           _frozen(self.create_preallocation, "create preallocation",
                                   CREATE_PREALLOCATION))
        storages = tuple(dict.fromkeys(self.storages))
        _frozen(storages, "storages", STORAGES)
        if not storages:
            raise ValueError(f"{self.name}: no storage to run on")
        object.__setattr__(self, "storages", storages)
        below = self.backing_formats
        if below is None:
            below = ("raw", "qcow2", self.format)
        below = tuple(dict.fromkeys(below))
        _frozen(below, "backing formats", {"raw", "qcow2", self.format})
        object.__setattr__(self, "backing_formats", below)

    # -- what the oracle consults -------------------------------------------------------------

    @property
    def capabilities(self) -> DriverCapabilities:
        """What this target claims, as one value (the oracle's and the report's view)."""
        assert self.backing_formats is not None
        is_qcow2 = self.format == "qcow2"
        return DriverCapabilities(
            formats=(self.format,),
            layouts=self.layouts,
            backing=self.backing,
            backing_formats=self.backing_formats,
            discards=self.discards,
            resize_grow=self.resize_grow and bool(self.preallocation),
            resize_shrink=self.resize_shrink,
            preallocation=self.preallocation,
            create_preallocation=self.create_preallocation,
            storages=self.storages,
            compressed=is_qcow2 if self.compressed is None else self.compressed,
        )

    @property
    def is_differential(self) -> bool:
        """Whether runs compare with the reference (qcow2 targets by default)."""
        if self.differential is None:
            return self.format == "qcow2"
        return self.differential and self.format == "qcow2"

    def implementation(self) -> ImplementationTarget:
        """The target as the oracle's sessions drive it: layers of the driver's format go to
        the driver, the others (raw and qcow2 backing images) to ``pyimago.reference``."""
        caps = self.capabilities
        own = self.format
        create = self.create_image
        open_ = self.open_image
        open_takes_format = _takes(open_, "format")
        open_takes_cache = _takes(open_, "l2_cache_tables")

        def create_image(location: Any, size: int, *, format: str, **options: Any) -> None:
            if format != own:
                reference_create(location, size, format=format, **options)
                return
            granularity = options.pop("cluster_size", caps.layouts[0].granularity)
            compat = options.pop("compat", caps.layouts[0].compat)
            layout = caps.layout_for(int(granularity), compat != "0.10")
            create(location, size, format=own, **dict(layout.options), **options)

        def open_image(location: Any, *, writable: bool, format: str, **kwargs: Any) -> Any:
            if format != own:
                return reference_open(location, writable=writable, format=format, **kwargs)
            cache = kwargs.pop("l2_cache_tables", None)
            if cache is not None and open_takes_cache:
                kwargs["l2_cache_tables"] = cache
            if open_takes_format:
                kwargs["format"] = own
            return open_(location, writable=writable, **kwargs)

        return ImplementationTarget(
            name=self.name,
            open_image=open_image,
            create_image=create_image,
            module=self.module,
            l2_cache_option=True,
            capabilities=caps,
            differential=self.is_differential,
            crash_safe=self.crash_safe,
        )


def load_target(spec: str) -> DriverTarget | ImplementationTarget:
    """The target ``module:attribute`` names (an attribute, or a function returning one).

    A :class:`DriverTarget` loaded this way records ``spec`` as its ``module``.
    """
    if ":" not in spec:
        raise ValueError(f"name the target as module:attribute, not {spec!r}")
    mod_name, attr = spec.split(":", 1)
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, (DriverTarget, ImplementationTarget)):
        obj = obj()
    if isinstance(obj, DriverTarget):
        return obj if obj.module is not None else dataclasses.replace(obj, module=spec)
    if isinstance(obj, ImplementationTarget):
        return obj
    raise TypeError(f"{spec} is {type(obj).__name__}, not a DriverTarget")

