"""The clause registry in specs/*.toml and its loader."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest
from pyimago.specs import (
    STRENGTHS,
    Clause,
    ClauseRegistryError,
    get_clause,
    load_areas,
    load_clauses,
    parse_registry,
)

AREAS = {
    "access",
    "storage",
    "raw",
    "backing",
    "create",
    "interop",
    "errors",
    "qcow2-header",
    "qcow2-features",
    "qcow2-extensions",
    "qcow2-tables",
    "qcow2-refcounts",
    "qcow2-compressed",
    "qcow2-zero",
    "qcow2-snapshots",
    "qcow2-corrupt",
    "crash",
    "tools",
    "qcow2-extended-l2",
    "qcow2-data-file",
    "qcow2-lazy-refcounts",
}

# IDs that tests and code already cite: they are part of the contract and must never vanish.
STABLE_IDS = [
    "access.read.no-short",
    "access.read.past-end-zero",
    "access.write.read-only",
    "access.write.past-end",
    "access.range.overflow",
    "access.write.no-short",
    "access.mapping.tiling",
    "access.mapping.writable-gate",
    "access.mapping.explicit-top-only",
    "access.mapping.eof-top-only",
    "access.mapping.special-compressed",
    "access.mapping.shallow-indirect",
    "access.write-zeroes.no-free",
    "access.write-zeroes.soft",
    "access.discard-to-zero.reads-zero",
    "access.discard-to-zero.frees",
    "access.discard-to-any.unspecified",
    "access.discard-to-backing.visible",
    "access.discard-to-backing.partial-kept",
    "access.unsupported",
    "access.flush.no-sync",
    "access.sync.no-flush",
    "access.invalidate-cache",
    "access.close.flushes",
    "access.resize.shrink-discards",
    "access.resize.grow-none",
    "access.resize.grow-zero",
    "access.resize.grow-format-allocate",
    "access.resize.grow-full-allocate",
    "access.resize.grow-write-data",
    "access.cow.partial-cluster",
    "access.parallel.same-result",
    "access.ensure-data-mapping",
    "storage.read.past-eof-zero",
    "storage.write.extends",
    "storage.memory.survives-reopen",
    "qcow2.header.magic",
    "qcow2.header.version",
    "qcow2.header.cluster-bits",
    "qcow2.header.v3-length",
    "qcow2.header.size-512",
    "qcow2.header.backing-name",
    "qcow2.header.l1-size",
    "qcow2.header.limits",
    "qcow2.header.refcount-order",
    "qcow2.features.incompatible-unknown",
    "qcow2.features.dirty",
    "qcow2.features.corrupt",
    "qcow2.features.external-data",
    "qcow2.features.extended-l2",
    "qcow2.features.compression-type",
    "qcow2.features.encryption",
    "qcow2.features.autoclear-clear",
    "qcow2.extensions.layout",
    "qcow2.extensions.preserved",
    "qcow2.extensions.backing-format",
    "qcow2.extensions.feature-names",
    "qcow2.l1.entry-layout",
    "qcow2.l1.growth",
    "qcow2.l2.entry-layout",
    "qcow2.l2.copied-flag",
    "qcow2.l2.unallocated-backing",
    "qcow2.l2.cow-shared",
    "qcow2.metadata.alignment",
    "qcow2.metadata.overlap",
    "qcow2.metadata.outside-file",
    "qcow2.refcount.table-layout",
    "qcow2.refcount.entry-width",
    "qcow2.refcount.growth",
    "qcow2.refcount.no-leaks",
    "qcow2.refcount.order-of-updates",
    "qcow2.compressed.layout",
    "qcow2.compressed.zlib",
    "qcow2.compressed.zstd",
    "qcow2.compressed.cow-overwrite",
    "qcow2.zero.flag",
    "qcow2.zero.preallocated",
    "qcow2.zero.v2-none",
    "qcow2.snapshots.read-active",
    "backing.resolve-relative",
    "backing.format-extension",
    "backing.probe",
    "backing.gate",
    "backing.loop",
    "backing.shorter",
    "backing.longer",
    "raw.passthrough",
    "raw.no-backing",
    "raw.resize",
    "create.options",
    "create.preallocation",
    "create.layout",
    "interop.qemu-check",
    "interop.qemu-read",
    "interop.qemu-map",
    "errors.hierarchy",
    "errors.bad-input-clear",
]

GOOD_CLAUSE = """
[[clause]]
id = "{id}"
strength = "must"
title = "A title"
requirement = "A requirement."
quote = "A quote."
source = "pyimago decision"
url = "issue:6"
"""


def write_area(folder: Path, name: str, body: str, title: str = "An area") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(f'title = "{title}"\n{body}', encoding="utf-8")
    return path


# -- the shipped registry ------------------------------------------------------------------------


def test_every_area_file_parses() -> None:
    areas = load_areas()
    assert set(areas) == AREAS
    clauses = load_clauses()
    for name, area in areas.items():
        assert area.title
        assert area.clause_ids
        assert all(clauses[cid].area == name for cid in area.clause_ids)
    assert sum(len(a.clause_ids) for a in areas.values()) == len(clauses)


def test_registry_files_ship_as_package_resources() -> None:
    # Loaded through importlib.resources, so they must be package data, not just repo files.
    names = {f.name for f in resources.files("pyimago.specs").iterdir()}
    assert {f"{area}.toml" for area in AREAS} <= names


def test_stable_ids_exist() -> None:
    clauses = load_clauses()
    missing = sorted(set(STABLE_IDS) - set(clauses))
    assert not missing, f"clauses other code cites are gone: {missing}"


def test_ids_are_well_formed_and_strengths_valid() -> None:
    id_re = re.compile(r"^[a-z0-9]+(\.[a-z0-9-]+)+$")
    for cid, clause in load_clauses().items():
        assert cid == clause.id
        assert id_re.fullmatch(cid)
        assert cid.split(".")[0] == clause.area.split("-")[0]
        assert clause.strength in STRENGTHS


def test_every_clause_has_quote_source_and_url() -> None:
    for clause in load_clauses().values():
        assert clause.title and clause.requirement
        assert clause.quote and clause.source
        assert clause.url.startswith("https://") or re.fullmatch(r"issue:\d+", clause.url)
        # Whitespace is folded so quotes and wrapped strings read as prose.
        for text in (clause.requirement, clause.quote, clause.divergence or ""):
            assert "  " not in text and "\n" not in text


def test_decisions_cite_the_tracker_and_sources_pin_versions() -> None:
    for clause in load_clauses().values():
        if clause.url.startswith("issue:"):
            assert clause.source.startswith("pyimago decision"), clause.id
        if "hreitz/imago" in clause.url:
            assert "/v0.2.3/" in clause.url, clause.id
        if "qemu-project/qemu" in clause.url:
            assert "/master/" not in clause.url, clause.id


def test_autoclear_bit_1_erratum_is_recorded() -> None:
    clause = get_clause("qcow2.features.raw-external-data")
    assert "incompatible feature bit 1" in clause.quote
    assert clause.errata is not None
    assert "bit 2" in clause.errata


def test_write_past_end_divergence_is_recorded() -> None:
    clause = get_clause("access.write.past-end")
    assert clause.strength == "must"
    assert clause.divergence is not None
    assert "truncat" in clause.divergence


def test_issue_6_coverage_areas_have_clauses() -> None:
    clauses = load_clauses()
    prefixes = [
        "access.read.",
        "access.write.",
        "access.write-zeroes.",
        "access.discard-to-zero.",
        "access.discard-to-any.",
        "access.discard-to-backing.",
        "access.mapping.",
        "access.resize.",
        "access.flush.",
        "access.sync.",
        "qcow2.header.",
        "qcow2.features.",
        "qcow2.l1.",
        "qcow2.l2.",
        "qcow2.refcount.",
        "qcow2.compressed.",
        "qcow2.zero.",
        "backing.gate",
        "backing.resolve-",
        "raw.",
    ]
    for prefix in prefixes:
        assert any(cid.startswith(prefix) for cid in clauses), prefix


def test_get_clause_and_its_error() -> None:
    assert get_clause("access.read.no-short").area == "access"
    with pytest.raises(KeyError, match=r"access\.read\.no-short"):
        get_clause("access.read.no-shrt")


def test_clauses_are_frozen_slotted_values() -> None:
    clause = get_clause("access.read.no-short")
    assert not hasattr(clause, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        clause.strength = "may"  # type: ignore[misc, unused-ignore]


def test_load_clauses_returns_a_fresh_mapping() -> None:
    first = load_clauses()
    first.clear()
    assert load_clauses()


# -- validation ----------------------------------------------------------------------------------


def test_parse_registry_accepts_a_minimal_file(tmp_path: Path) -> None:
    path = write_area(tmp_path, "demo", GOOD_CLAUSE.format(id="demo.thing"))
    areas, clauses = parse_registry([path])
    assert areas["demo"].clause_ids == ("demo.thing",)
    assert clauses["demo.thing"] == Clause(
        id="demo.thing",
        area="demo",
        strength="must",
        title="A title",
        requirement="A requirement.",
        quote="A quote.",
        source="pyimago decision",
        url="issue:6",
    )


def test_duplicate_ids_across_files_name_both(tmp_path: Path) -> None:
    a = write_area(tmp_path, "demo", GOOD_CLAUSE.format(id="demo.thing"))
    b = write_area(tmp_path, "demo-more", GOOD_CLAUSE.format(id="demo.thing"))
    with pytest.raises(ClauseRegistryError, match=r"'demo\.thing' is already defined") as info:
        parse_registry([a, b])
    assert "specs/demo.toml" in str(info.value)
    assert "specs/demo-more.toml" in str(info.value)


def test_duplicate_ids_in_one_file(tmp_path: Path) -> None:
    body = GOOD_CLAUSE.format(id="demo.thing") * 2
    with pytest.raises(ClauseRegistryError, match=r"already defined"):
        parse_registry([write_area(tmp_path, "demo", body)])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('strength = "must"', 'strength = "shall"'), r"strength 'shall' is not one of"),
        (('id = "demo.thing"', 'id = "Demo.Thing"'), r"id must be dotted lowercase"),
        (('id = "demo.thing"', 'id = "demo"'), r"id must be dotted lowercase"),
        (('id = "demo.thing"', 'id = "other.thing"'), r"must start with 'demo'"),
        (('quote = "A quote."\n', ""), r"missing field\(s\) quote"),
        (('url = "issue:6"', 'url = "http://example.org"'), r"url must be"),
        (('title = "A title"', 'title = "  "'), r"field 'title' is empty"),
        (('title = "A title"', "title = 3"), r"field 'title' must be a string"),
        (('source = "pyimago decision"', 'sauce = "x"'), r"unknown field\(s\) sauce"),
    ],
    ids=[
        "strength",
        "id-case",
        "id-one-word",
        "id-family",
        "missing-field",
        "url-scheme",
        "empty-field",
        "field-type",
        "unknown-field",
    ],
)
def test_bad_clause_errors_name_file_and_clause(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    body = GOOD_CLAUSE.format(id="demo.thing").replace(*edit)
    with pytest.raises(ClauseRegistryError, match=message) as info:
        parse_registry([write_area(tmp_path, "demo", body)])
    assert "specs/demo.toml" in str(info.value)
    if "demo.thing" in body:
        assert "demo.thing" in str(info.value)


def test_file_level_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("title = \n", encoding="utf-8")
    with pytest.raises(ClauseRegistryError, match=r"specs/broken\.toml: invalid TOML"):
        parse_registry([broken])
    untitled = tmp_path / "untitled.toml"
    untitled.write_text(GOOD_CLAUSE.format(id="untitled.x"), encoding="utf-8")
    with pytest.raises(ClauseRegistryError, match=r"missing top-level title"):
        parse_registry([untitled])
    with pytest.raises(ClauseRegistryError, match=r"no \[\[clause\]\] tables"):
        parse_registry([write_area(tmp_path, "empty", "")])
    with pytest.raises(ClauseRegistryError, match=r"unknown top-level key"):
        parse_registry([write_area(tmp_path, "extra", 'colour = "red"\n')])
