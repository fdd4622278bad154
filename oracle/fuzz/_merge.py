"""ConformanceStats as JSON, and many runs' stats merged into one.

Both work field by field from the dataclass's own fields, so a counter added to
:class:`ConformanceStats` is carried and summed without touching this module: integers add
up, ``(key, count)`` tables add up by key, ``(label, text)`` rows that write out a table
(``"write 12, read 3"``) add up by name, other rows keep each run's text (joined by `` | ``
where the runs differ), lists of names concatenate; ``warnings`` (paths a
run never took) keeps the ones no run took.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from ._stats import ConformanceStats

__all__ = ["merge_stats", "stats_from_json", "stats_to_json"]


def stats_to_json(stats: ConformanceStats) -> dict[str, Any]:
    """``stats`` as a JSON object (tables as lists of ``[key, count]``)."""
    return {f.name: _plain(getattr(stats, f.name)) for f in dataclasses.fields(stats)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def stats_from_json(obj: dict[str, Any]) -> ConformanceStats:
    """The inverse of :func:`stats_to_json` (fields it does not know are ignored)."""
    names = {f.name for f in dataclasses.fields(ConformanceStats)}
    return ConformanceStats(**{k: _frozen(v) for k, v in obj.items() if k in names})


def _is_pairs(values: Sequence[Any]) -> bool:
    return all(
        isinstance(v, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in v)
        for v in values
    ) and any(values)


def _is_table(values: Sequence[Any]) -> bool:
    """``(key, count)`` pairs, counts whole numbers."""
    return _is_pairs(values) and all(
        isinstance(count, int) and not isinstance(count, bool)
        for value in values for _, count in value
    )


_COUNT_ITEM = re.compile(r"^(\S.*?) (\d[\d,]*)$")


def _sum_counts(texts: Sequence[str]) -> str | None:
    """Rows that are tables written out (``"write 12, read 1,024"``) summed by name, most
    frequent first; None when a text is not such a table."""
    total: Counter[str] = Counter()
    for text in texts:
        for item in text.split(", "):
            match = _COUNT_ITEM.match(item)
            if match is None:
                return None
            total[match[1]] += int(match[2].replace(",", ""))
    return ", ".join(f"{name} {count:,}" for name, count in total.most_common())


def _merge_rows(values: Iterable[tuple[tuple[str, Any], ...]]) -> tuple[tuple[str, str], ...]:
    texts: dict[str, list[str]] = {}
    for rows in values:
        for label, text in rows:
            texts.setdefault(label, []).append(str(text))
    merged: list[tuple[str, str]] = []
    for label, all_texts in texts.items():
        summed = _sum_counts(all_texts) if len(all_texts) > 1 else None
        distinct = list(dict.fromkeys(all_texts))
        merged.append((label, summed if summed is not None else " | ".join(distinct)))
    return tuple(merged)


def _merge_table(name: str, values: Iterable[tuple[tuple[Any, int], ...]]) -> tuple[Any, ...]:
    total: Counter[Any] = Counter()
    for table in values:
        for key, count in table:
            total[key] += count
    if name == "ops":
        # As a single run lists them: most frequent first.
        return tuple(total.most_common())
    return tuple(sorted(total.items()))


def merge_stats(runs: Sequence[ConformanceStats], *, parallel: bool) -> ConformanceStats:
    """One :class:`ConformanceStats` for ``runs`` of the same target.

    Counters add up; ``seconds`` is the longest run's when the runs ran side by side
    (``parallel``: campaign workers), their sum when they ran one after another (a worker's
    rounds), so that steps per second stays the campaign's throughput.
    """
    if not runs:
        raise ValueError("merge_stats needs at least one run")
    merged: dict[str, Any] = {}
    for field in dataclasses.fields(ConformanceStats):
        values = [getattr(run, field.name) for run in runs]
        if field.name == "seconds":
            merged[field.name] = max(values) if parallel else sum(values)
        elif isinstance(values[0], bool):
            merged[field.name] = any(values)
        elif isinstance(values[0], (int, float)):
            merged[field.name] = sum(values)
        elif field.name == "warnings":
            # A path the campaign never took is one that no run took.
            merged[field.name] = tuple(
                w for w in values[0] if all(w in value for value in values[1:])
            )
        elif isinstance(values[0], tuple) and _is_table(values):
            merged[field.name] = _merge_table(field.name, values)
        elif isinstance(values[0], tuple) and _is_pairs(values):
            merged[field.name] = _merge_rows(values)
        elif isinstance(values[0], tuple):
            merged[field.name] = tuple(item for value in values for item in value)
        else:
            merged[field.name] = values[0]
    return ConformanceStats(**merged)
