"""What every benchmark shares: figures with targets, statistics, the machine, the results folder."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


@dataclass
class Figure:
    """One measured figure beside its target; ``ok`` is None for a figure without a target."""

    section: str
    name: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""
    ok: bool | None = None
    note: str = ""

    @property
    def status(self) -> str:
        return "info" if self.ok is None else ("PASS" if self.ok else "MISS")

    def shown(self) -> str:
        return fmt(self.value, self.unit)


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            text = str(value)
        elif abs(value) >= 100:
            text = f"{value:,.0f}"
        elif abs(value) >= 10:
            text = f"{value:.1f}"
        else:
            text = f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def summary(values: list[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": statistics.fmean(values) if values else None,
    }


@dataclass
class Section:
    """One benchmark's figures and raw measurements, written to bench/results/<key>.json."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    began: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def add(
        self,
        name: str,
        value: Any,
        unit: str = "",
        target: str = "",
        ok: bool | None = None,
        note: str = "",
    ) -> Figure:
        figure = Figure(self.title, name, value, unit, target, ok, note)
        self.figures.append(figure)
        return figure

    def note(self, text: str) -> None:
        self.notes.append(text)

    def misses(self) -> list[Figure]:
        return [f for f in self.figures if f.ok is False]


def machine() -> dict[str, Any]:
    """The machine a run came from: what the README's table is stamped with."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": model or platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def write_json(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    return path


def section_doc(section: Section, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "section": section.key,
        "title": section.title,
        "config": config,
        "seconds": round(section.seconds, 2),
        "figures": [asdict(f) | {"status": f.status} for f in section.figures],
        "notes": section.notes,
        "raw": section.raw,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def print_table(sections: list[Section], stream: Any = None) -> None:
    """The console table: every figure with its target and PASS/MISS, then the misses with reasons."""
    out = stream or sys.stdout
    rows = [("section", "figure", "value", "target", "status")]
    for s in sections:
        for f in s.figures:
            rows.append((s.title, f.name, f.shown(), f.target or "-", f.status))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)
    misses = [(s, f) for s in sections for f in s.misses()]
    print(file=out)
    if misses:
        print(f"{len(misses)} target(s) missed:", file=out)
        for s, f in misses:
            print(
                f"  - [{s.title}] {f.name} = {f.shown()} (target {f.target}): {f.note or 'see notes'}",
                file=out,
            )
    else:
        print("every target met", file=out)
    for s in sections:
        for text in s.notes:
            print(f"  note [{s.title}]: {text}", file=out)


def markdown(sections: list[Section], info: dict[str, Any], config: dict[str, Any]) -> str:
    """The table to paste into the README, stamped with the machine it came from."""
    lines = [
        f"Measured with `make bench` on {info['nproc']} × {info['cpu']}, Python {info['python']} "
        f"(load average at start {info['loadavg_at_start'][0]}); sizes: {config.get('sizes', '')}.",
        "",
        "| | figure | measured | target | |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for s in sections:
        for f in s.figures:
            status = "" if f.ok is None else f.status
            lines.append(
                f"| {s.title} | {f.name} | {f.shown()} | {(f.target or '').replace('|', '/')} | {status} |"
            )
    return "\n".join(lines) + "\n"
