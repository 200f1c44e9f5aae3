"""Figures as ratios to baselines: the table printed and the JSON written.

Every figure holds one value per repeat and the baseline measured beside it in
the same run; the ratio is taken repeat by repeat, so drift between repeats
shows in the spread instead of in the ratio.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Figure", "Spread", "Target", "percentile", "render", "to_json", "write"]


@dataclass(frozen=True)
class Spread:
    """The minimum, median and maximum of a figure's repeats."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(min(values), statistics.median(values), max(values))


@dataclass(frozen=True)
class Target:
    """What a figure should reach, checked on the medians.

    ``on`` says what is compared with ``limit``: "ratio" (value ÷ baseline),
    "value", or "excess" (value - baseline); ``at_most`` says which side passes.
    """

    text: str
    on: str
    limit: float
    at_most: bool = True

    def met(self, value: float, baseline: float) -> bool:
        if self.on == "ratio":
            measured = value / baseline
        elif self.on == "excess":
            measured = value - baseline
        else:
            measured = value
        return measured <= self.limit if self.at_most else measured >= self.limit


@dataclass
class Figure:
    """One measured figure, its baseline and the ratio of the two per repeat."""

    key: str
    title: str
    unit: str
    values: list[float]
    baseline_name: str
    baseline_unit: str
    baselines: list[float]
    target: Target | None = None
    note: str = ""
    unavailable: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratios(self) -> list[float]:
        """value ÷ baseline, repeat by repeat; against the median if counts differ."""
        if len(self.values) == len(self.baselines):
            pairs = zip(self.values, self.baselines, strict=True)
            return [v / b for v, b in pairs if b]
        middle = statistics.median(self.baselines)
        return [v / middle for v in self.values] if middle else []

    @property
    def result(self) -> str:
        if self.unavailable or not self.values or not self.baselines:
            return "n/a"
        if self.target is None:
            return "-"
        value = statistics.median(self.values)
        baseline = statistics.median(self.baselines)
        return "PASS" if self.target.met(value, baseline) else "MISS"

    @classmethod
    def missing(cls, key: str, title: str, why: str) -> Figure:
        """A figure that could not be measured on this machine, saying why."""
        return cls(key, title, "", [], "", "", [], unavailable=why)


def percentile(values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile: the smallest value with pct% at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def to_json(figures: Sequence[Figure], meta: dict[str, Any]) -> dict[str, Any]:
    """The report as plain JSON data: meta, then one entry per figure."""
    entries = []
    for fig in figures:
        entry: dict[str, Any] = {"key": fig.key, "title": fig.title}
        if fig.unavailable:
            entry.update(result="n/a", unavailable=fig.unavailable)
            entries.append(entry)
            continue
        entry.update(
            unit=fig.unit,
            values=_spread_json(fig.values),
            baseline={
                "name": fig.baseline_name,
                "unit": fig.baseline_unit,
                **_spread_json(fig.baselines),
            },
            ratio=_spread_json(fig.ratios) if fig.ratios else None,
            target=fig.target.text if fig.target else None,
            result=fig.result,
        )
        if fig.note:
            entry["note"] = fig.note
        if fig.extra:
            entry["extra"] = fig.extra
        entries.append(entry)
    return {**meta, "figures": entries}


def write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def render(figures: Sequence[Figure], heading: str) -> str:
    """The one table printed at the end of a run."""
    header = ("figure", "value [min-max]", "baseline (median)", "ratio [min-max]")
    rows = [(*header, "target", "result")]
    notes = []
    for fig in figures:
        if fig.unavailable:
            rows.append((fig.title, "not measured", "", "", "", "n/a"))
            notes.append(f"{fig.title}: {fig.unavailable}")
            continue
        value = _spread_text(fig.values, fig.unit)
        base = f"{fig.baseline_name} {_num(statistics.median(fig.baselines))}"
        base += f" {fig.baseline_unit}".rstrip()
        ratio = _spread_text(fig.ratios, "x") if fig.ratios else ""
        target = fig.target.text if fig.target else ""
        rows.append((fig.title, value, base, ratio, target, fig.result))
        if fig.note:
            notes.append(f"{fig.title}: {fig.note}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) + 2)]
    lines = [heading]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines += [f"  * {note}" for note in notes]
    return "\n".join(lines)


def _spread_json(values: Sequence[float]) -> dict[str, Any]:
    spread = Spread.of(values)
    return {
        "min": spread.min,
        "median": spread.median,
        "max": spread.max,
        "all": list(values),
    }


def _spread_text(values: Sequence[float], unit: str) -> str:
    spread = Spread.of(values)
    middle = _num(spread.median) + ("x" if unit == "x" else f" {unit}")
    if len(values) == 1:
        return middle
    return f"{middle} [{_num(spread.min)}-{_num(spread.max)}]"


def _num(value: float) -> str:
    """Three significant digits without exponents, for people reading a table."""
    size = abs(value)
    if size >= 100 or value == 0:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    if size >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}"
