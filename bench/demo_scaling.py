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


def _demo(customers: int) -> tuple[float, int, str]:
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
        return time.perf_counter() - began, proc.returncode, proc.stderr[-300:]


def run(params: ScalingParams, log: Callable[[str], None]) -> Section:
    section = Section("demo_scaling", "10 demo scaling")
    log(
        "10. demo scaling: `billing demo --customers N` for N = "
        f"{params.baseline}, {params.small}, {params.large}"
    )
    seconds: dict[int, float] = {}
    for n in (params.baseline, params.small, params.large):
        wall, rc, err = _demo(n)
        seconds[n] = wall
        log(f"  {n} customers: {wall:.1f} s, exit {rc}")
        section.add(
            f"`billing demo --customers {n}`: wall time (exit {rc})",
            round(wall, 1),
            "s",
            note=err if rc else "",
        )
    fixed = seconds[params.baseline]
    per = {n: max(seconds[n] - fixed, 0.0) / n for n in (params.small, params.large)}
    ratio = per[params.large] / per[params.small] if per[params.small] > 0 else None
    section.add(
        f"per customer beyond the fixed {fixed:.1f} s: {params.small} / {params.large} customers",
        f"{per[params.small] * 1000:.1f} / {per[params.large] * 1000:.1f} ms",
    )
    section.add(
        f"per customer at {params.large} / at {params.small}",
        None if ratio is None else round(ratio, 2),
        "x",
        "<= 1.3",
        at_most(ratio, 1.3),
    )
    section.raw.update({"seconds": seconds, "per_customer_s": per, "ratio": ratio})
    return section
