"""Section ``demo_scaling``: ``billing demo`` time per customer at 3,000 customers against 300.

As shipped, moto scans the whole queue for every message sent or received, so the demo's time per
customer grew with the number of customers (3,000 took 16 minutes, or died with ``ReadTimeoutError``).
The local stack's moto now has billing_local.moto_fixes (linear queues). Each run is the real command
line in a process of its own (``billing demo --customers N``, its own embedded stack). The fixed cost
of a demo (starting PostgreSQL, moto and the emulators, migrating) is measured by a tiny run and taken
off both, so it neither flatters the small run nor hides growth. Target: per customer at the large
size <= 1.3 x per customer at the small size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import Section, at_most

if TYPE_CHECKING:
    from collections.abc import Callable


@dataclass
class ScalingParams:
    small: int = 300
    large: int = 3_000
    baseline: int = 10  # a tiny run: the demo's fixed cost


@dataclass(frozen=True)
class DemoRun:
    """One ``billing demo --customers N``: its wall time, exit code and the end of its stderr."""

    customers: int
    seconds: float
    returncode: int
    stderr_tail: str = ""


@dataclass(frozen=True)
class Verdict:
    per_customer_s: dict[int, float]  # beyond the fixed cost, at the small and the large size
    ratio: float | None  # per customer at the large size / at the small size
    ok: bool | None
    reason: str  # why it is a MISS ("" otherwise)


TARGET = 1.3


def verdict(runs: dict[int, DemoRun], params: ScalingParams) -> Verdict:
    """The scaling ratio and whether it meets the target. A demo that failed is a MISS whatever its
    time: one that died early (a 3,000-customer demo killed by a ReadTimeoutError) looks fast."""
    fixed = runs[params.baseline].seconds
    per = {n: max(runs[n].seconds - fixed, 0.0) / n for n in (params.small, params.large)}
    ratio = per[params.large] / per[params.small] if per[params.small] > 0 else None
    failed = [r for r in runs.values() if r.returncode != 0]
    if failed:
        reason = "; ".join(
            f"`billing demo --customers {r.customers}` exited {r.returncode}"
            + (f": {_last_line(r.stderr_tail)}" if r.stderr_tail.strip() else "")
            for r in failed
        )
        return Verdict(per, ratio, False, f"{reason} (a failed demo's time says nothing about scaling)")
    ok = at_most(ratio, TARGET)
    if ok is None:
        small = f"the {params.small}-customer demo took no longer than the fixed cost"
        return Verdict(per, ratio, None, small)
    grows = f"{ratio:.2f} x > {TARGET} x: the demo's time per customer grows with its customers"
    return Verdict(per, ratio, ok, "" if ok else grows)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1][:200]


def _demo(customers: int) -> DemoRun:
    billing = str(Path(sys.executable).with_name("billing"))
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # its own stack
    env.update({"POWERTOOLS_LOG_LEVEL": "ERROR", "POWERTOOLS_METRICS_DISABLED": "true"})
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        began = time.perf_counter()
        proc = subprocess.run(
            [billing, "demo", "--customers", str(customers), "--report", str(Path(tmp) / "r.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=3_600,
            check=False,
        )
        return DemoRun(customers, time.perf_counter() - began, proc.returncode, proc.stderr[-300:])


def run(params: ScalingParams, log: Callable[[str], None]) -> Section:
    section = Section("demo_scaling", "10 demo scaling")
    log(
        "10. demo scaling: `billing demo --customers N` for N = "
        f"{params.baseline}, {params.small}, {params.large}"
    )
    runs: dict[int, DemoRun] = {}
    for n in (params.baseline, params.small, params.large):
        runs[n] = demo = _demo(n)
        log(f"  {n} customers: {demo.seconds:.1f} s, exit {demo.returncode}")
        section.add(
            f"`billing demo --customers {n}`: wall time (exit {demo.returncode})",
            round(demo.seconds, 1),
            "s",
            note=demo.stderr_tail if demo.returncode else "",
        )
    judged = verdict(runs, params)
    per = judged.per_customer_s
    fixed = runs[params.baseline].seconds
    section.add(
        f"per customer beyond the fixed {fixed:.1f} s: {params.small} / {params.large} customers",
        f"{per[params.small] * 1000:.1f} / {per[params.large] * 1000:.1f} ms",
    )
    section.add(
        f"per customer at {params.large} / at {params.small}",
        None if judged.ratio is None else round(judged.ratio, 2),
        "x",
        f"<= {TARGET}, every demo exit 0",
        judged.ok,
        note=judged.reason,
    )
    section.raw.update(
        {
            "seconds": {n: r.seconds for n, r in runs.items()},
            "exit_codes": {n: r.returncode for n, r in runs.items()},
            "per_customer_s": per,
            "ratio": judged.ratio,
        }
    )
    return section
