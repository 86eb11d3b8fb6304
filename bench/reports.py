"""5. What people see: the JSON that ``billing run --report`` and ``billing demo --report`` write.

Both commands run for real (small sizes) and the keys of their reports are checked against what the
issue asks for. A missing key is a MISS; the diff that adds it is in the bench's report to the issue.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Section
from bench.env import last_hour

if TYPE_CHECKING:
    from bench.env import BenchStack

TOP_KEYS = (
    "customers",
    "customer_hours",
    "invocations",
    "makespan_s",
    "duration_ratio_p50",
    "duration_ratio_p99",
)
STATE_KEYS = ("accepted", "duplicate", "rejected", "failed")


def _billing() -> str:
    return str(Path(sys.executable).with_name("billing"))


def check(doc: dict[str, Any], command: str, section: Section, latency_known: bool) -> list[str]:
    missing = [k for k in TOP_KEYS if k not in doc]
    marketplaces = doc.get("marketplaces", {})
    if not marketplaces:
        missing.append("marketplaces")
    for mp, states in marketplaces.items():
        missing += [f"marketplaces.{mp}.{s}" for s in STATE_KEYS if s not in states]
    if "ideal_makespan_s" not in doc:
        missing.append("ideal_makespan_s")
    elif latency_known and doc["ideal_makespan_s"] is None:
        missing.append("ideal_makespan_s (null although the latency is known)")
    asked = len(TOP_KEYS) + 1 + max(1, len(marketplaces)) * len(STATE_KEYS)
    section.add(
        f"`{command} --report`: keys present",
        f"{asked - len(missing)} of {asked}",
        "",
        "all",
        not missing,
        ("missing: " + ", ".join(missing) + " (cli._write_report; diff in the issue's report)")
        if missing
        else "",
    )
    return missing


def run(bench: BenchStack, log: Any, customers: int = 30) -> Section:
    section = Section("reports", "5 reports")
    log(
        f"5. reports: `billing demo --customers {customers} --report` and `billing run --report` against "
        "the bench stack"
    )
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        # the demo starts a stack of its own (it must not find the bench's DATABASE_URL)
        demo_file = Path(tmp) / "demo.json"
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        proc = subprocess.run(
            [
                _billing(),
                "demo",
                "--customers",
                str(customers),
                "--concurrency",
                "5",
                "--report",
                str(demo_file),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        raw["demo_exit"] = proc.returncode
        if demo_file.exists():
            raw["demo"] = json.loads(demo_file.read_text())
            raw["demo_missing"] = check(raw["demo"], "billing demo", section, latency_known=False)
        else:
            section.add("`billing demo --report` wrote a report", "no", "", "yes", False, proc.stderr[-300:])

        run_file = Path(tmp) / "run.json"

        async def database() -> str:
            template = await bench.seeded_template("bench_report", customers)
            bench.subscribe(customers)
            return await bench.clone(template)

        dsn = asyncio.run(database())
        queue = bench.new_queue("report")
        bench.forget_records()
        bench.marketplace_latency(0.0, 0.0)
        env = {**os.environ, "DATABASE_URL": dsn, "BILLING_QUEUE_URL": queue}
        proc = subprocess.run(
            [
                _billing(),
                "run",
                "--period",
                last_hour().isoformat(),
                "--concurrency",
                "5",
                "--report",
                str(run_file),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        raw["run_exit"] = proc.returncode
        bench.delete_queue(queue)
        asyncio.run(bench.drop(dsn))
        if run_file.exists():
            raw["run"] = json.loads(run_file.read_text())
            raw["run_missing"] = check(raw["run"], "billing run", section, latency_known=False)
        else:
            section.add("`billing run --report` wrote a report", "no", "", "yes", False, proc.stderr[-300:])
    section.raw = raw
    return section
