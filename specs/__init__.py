"""The behaviour contract of pyimago as data: spec clauses loaded from ``specs/*.toml``.

Each TOML file is one *area* (its file stem, e.g. ``qcow2-header``) with a ``title``, an optional
``description`` and a list of ``[[clause]]`` tables. A clause has a stable ``id`` naming what it
is about (``access.write.past-end``), a ``strength`` (must / should / may), a ``title``, our
normative ``requirement``, the ``quote`` it comes from with its ``source`` and ``url``, and
optionally a ``divergence`` (where we deliberately differ from the source, and why) and
``errata`` (a known error in the source). ``specs/README.md`` describes the format.

Tests cite clauses with ``@pytest.mark.clause("id", ...)``; the pytest plugin in
:mod:`pyimago.specs._pytest` rejects unknown IDs and reports outcomes per clause.
"""

from __future__ import annotations

import difflib
import functools
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Final, Literal, TypeAlias, cast, get_args

__all__ = [
    "STRENGTHS",
    "Area",
    "Clause",
    "ClauseRegistryError",
    "Strength",
    "get_clause",
    "load_areas",
    "load_clauses",
    "parse_registry",
]

Strength: TypeAlias = Literal["must", "should", "may"]

#: The normative strengths, strongest first.
STRENGTHS: Final[tuple[Strength, ...]] = get_args(Strength)

#: Dotted lowercase words, at least two: ``area.topic[.detail...]``.
_ID_RE: Final = re.compile(r"^[a-z0-9]+(\.[a-z0-9-]+)+$")

#: A real link, or a pyimago tracker issue for our own decisions (the project has no public
#: address yet), written ``issue:N``.
_URL_RE: Final = re.compile(r"^(https://\S+|issue:[0-9]+)$")

_REQUIRED: Final = ("id", "strength", "title", "requirement", "quote", "source", "url")
_OPTIONAL: Final = ("divergence", "errata")
_AREA_KEYS: Final = frozenset({"title", "description", "clause"})


class ClauseRegistryError(ValueError):
    """The clause registry is malformed; the message names the file and, if known, the clause."""


@dataclass(frozen=True, slots=True)
class Clause:
    """One normative statement of the contract."""

    id: str
    area: str
    strength: Strength
    title: str
    requirement: str
    quote: str
    source: str
    url: str
    divergence: str | None = None
    errata: str | None = None


@dataclass(frozen=True, slots=True)
class Area:
    """One registry file: a group of clauses about the same subject."""

    name: str
    title: str
    description: str
    clause_ids: tuple[str, ...]


def _clean(text: str) -> str:
    # Multi-line TOML strings are wrapped for reading; store them as single-spaced prose.
    return " ".join(text.split())


def _parse_clause(area: str, where: str, index: int, raw: object) -> Clause:
    if not isinstance(raw, dict):
        raise ClauseRegistryError(f"{where}: clause #{index + 1} is not a table")
    table = cast(dict[str, object], raw)
    cid = table.get("id")
    label = f"{where}: clause {cid!r}" if isinstance(cid, str) else f"{where}: clause #{index + 1}"

    unknown = sorted(set(table) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ClauseRegistryError(f"{label}: unknown field(s) {', '.join(unknown)}")
    missing = [key for key in _REQUIRED if key not in table]
    if missing:
        raise ClauseRegistryError(f"{label}: missing field(s) {', '.join(missing)}")

    values: dict[str, str | None] = {}
    for key in (*_REQUIRED, *_OPTIONAL):
        value = table.get(key)
        if value is None and key in _OPTIONAL:
            values[key] = None
            continue
        if not isinstance(value, str):
            raise ClauseRegistryError(f"{label}: field {key!r} must be a string")
        if not value.strip():
            raise ClauseRegistryError(f"{label}: field {key!r} is empty")
        values[key] = _clean(value)

    cid = cast(str, values["id"])
    if not _ID_RE.fullmatch(cid):
        raise ClauseRegistryError(
            f"{label}: id must be dotted lowercase words matching {_ID_RE.pattern}"
        )
    # The first word of an ID names the area family (``qcow2-tables`` holds ``qcow2.l1.*``).
    family = area.split("-", 1)[0]
    if cid.split(".", 1)[0] != family:
        raise ClauseRegistryError(f"{label}: id must start with {family!r}. in area {area!r}")
    strength = values["strength"]
    if strength not in STRENGTHS:
        raise ClauseRegistryError(
            f"{label}: strength {strength!r} is not one of {', '.join(STRENGTHS)}"
        )
    if not _URL_RE.fullmatch(cast(str, values["url"])):
        raise ClauseRegistryError(f"{label}: url must be https://... or issue:N")

    return Clause(
        id=cid,
        area=area,
        strength=strength,
        title=cast(str, values["title"]),
        requirement=cast(str, values["requirement"]),
        quote=cast(str, values["quote"]),
        source=cast(str, values["source"]),
        url=cast(str, values["url"]),
        divergence=values["divergence"],
        errata=values["errata"],
    )


def parse_registry(
    files: Iterable[Traversable | Path],
) -> tuple[dict[str, Area], dict[str, Clause]]:
    """Parse and validate registry files; return the areas and the clauses by ID.

    Raises :class:`ClauseRegistryError` naming the file (and clause) for invalid TOML, unknown
    or missing fields, bad IDs or strengths, and IDs defined twice (in one file or across files).
    """
    areas: dict[str, Area] = {}
    clauses: dict[str, Clause] = {}
    where_defined: dict[str, str] = {}
    for file in sorted(files, key=lambda f: f.name):
        where = f"specs/{file.name}"
        area = file.name.removesuffix(".toml")
        try:
            doc = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ClauseRegistryError(f"{where}: invalid TOML: {exc}") from exc
        unknown = sorted(set(doc) - _AREA_KEYS)
        if unknown:
            raise ClauseRegistryError(f"{where}: unknown top-level key(s) {', '.join(unknown)}")
        title = doc.get("title")
        if not isinstance(title, str) or not title.strip():
            raise ClauseRegistryError(f"{where}: missing top-level title")
        description = doc.get("description", "")
        if not isinstance(description, str):
            raise ClauseRegistryError(f"{where}: description must be a string")
        raw_clauses = doc.get("clause", [])
        if not isinstance(raw_clauses, list) or not raw_clauses:
            raise ClauseRegistryError(f"{where}: no [[clause]] tables")

        ids: list[str] = []
        for index, raw in enumerate(raw_clauses):
            clause = _parse_clause(area, where, index, raw)
            if clause.id in clauses:
                raise ClauseRegistryError(
                    f"{where}: clause {clause.id!r} is already defined in "
                    f"{where_defined[clause.id]}"
                )
            clauses[clause.id] = clause
            where_defined[clause.id] = where
            ids.append(clause.id)
        areas[area] = Area(area, _clean(title), _clean(description), tuple(ids))
    return areas, clauses


def _registry_files() -> list[Traversable]:
    # importlib.resources, not __file__, so the registry is found in wheels and zip imports too.
    root = resources.files(__name__)
    return [f for f in root.iterdir() if f.is_file() and f.name.endswith(".toml")]


@functools.cache
def _registry() -> tuple[Mapping[str, Area], Mapping[str, Clause]]:
    return parse_registry(_registry_files())


def load_clauses() -> dict[str, Clause]:
    """Every clause of the shipped registry, by ID (parsed once, then cached)."""
    return dict(_registry()[1])


def load_areas() -> dict[str, Area]:
    """Every area of the shipped registry, by name (the registry file's stem)."""
    return dict(_registry()[0])


def get_clause(clause_id: str) -> Clause:
    """The clause with this ID; :class:`KeyError` with close matches if there is none."""
    clauses = _registry()[1]
    try:
        return clauses[clause_id]
    except KeyError:
        close = difflib.get_close_matches(clause_id, list(clauses), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown spec clause {clause_id!r}{hint}") from None
