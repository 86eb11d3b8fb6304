"""3. Dispatcher: enqueue rate beside a bare SendMessageBatch loop, and memory that does not grow with N.

The dispatcher runs in a fresh process (bench.dispatch_child) against moto's server in this process,
so its peak RSS is its own. The customers are seeded with COPY (100,000 in about a second).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.common import Section, at_least, at_most, median
from bench.env import APM_ENV, LAMBDA_ENV, last_hour

if TYPE_CHECKING:
    from bench.env import BenchStack


@dataclass
class DispatchParams:
    small: int  # customers in the small dispatch (memory baseline)
    large: int  # customers in the large dispatch
    rate_customers: int  # customers per throughput repetition
    reps: int
    in_flight: int = 8  # Settings.dispatch_in_flight's default


def _child(mode: str, env: dict[str, str], period: str, count: int = 0, in_flight: int = 8) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.dispatch_child",
            mode,
            "--period",
            period,
            "--count",
            str(count),
            "--in-flight",
            str(in_flight),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{") and '"peak_rss_mb"' in line:
            return dict(json.loads(line))
    raise RuntimeError(f"dispatch child {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def run(bench: BenchStack, p: DispatchParams, log: Any) -> Section:
    """As shipped, moto's SendMessageBatch is O(queue depth) per entry: 100,000 would take a day."""
    with bench.linear_moto():
        section = _run(bench, p, log)
    section.note(
        "SQS: moto's server with bench/moto_linear.py's fixes (as shipped each SendMessageBatch entry scans "
        "the "
        "whole queue, so the dispatch and the bare loop would both measure moto)."
    )
    return section


def _run(bench: BenchStack, p: DispatchParams, log: Any) -> Section:
    section = Section("dispatcher", "3 dispatcher")
    log(
        f"3. dispatcher: {p.rate_customers} customers × {p.reps} repetition(s) for the rate, {p.small} vs "
        f"{p.large} "
        f"for memory, {p.in_flight} SendMessageBatch calls in flight"
    )
    period = last_hour()
    sizes = sorted({p.small, p.large, p.rate_customers})

    seeding: dict[int, float] = {}

    async def templates() -> dict[int, str]:
        import time

        out = {}
        for n in sizes:
            began = time.perf_counter()
            out[n] = await bench.seeded_template(f"bench_dispatch_{n}", n, usage=False)
            seeding[n] = time.perf_counter() - began
            log(f"  seeded {n} customers with COPY in {seeding[n]:.2f} s")
        return out

    names = asyncio.run(templates())
    section.add(
        f"seeding {max(sizes):,} customers (COPY, a fresh migrated database)",
        seeding[max(sizes)],
        "s",
        "",
        None,
    )

    def env_for(dsn: str, queue: str, apm: bool = False) -> dict[str, str]:
        env = {**os.environ, "DATABASE_URL": dsn, "BILLING_QUEUE_URL": queue}
        if apm:
            env |= LAMBDA_ENV | APM_ENV | {"AWS_LAMBDA_FUNCTION_NAME": "billing-dispatcher"}
        return env

    def one(mode: str, n: int) -> dict[str, Any]:
        dsn = asyncio.run(bench.clone(names[n]))
        queue = bench.new_queue("dispatch")
        try:
            doc = _child(mode, env_for(dsn, queue, apm=mode == "handler"), period.isoformat(), n, p.in_flight)
        finally:
            bench.delete_queue(queue)
            asyncio.run(bench.drop(dsn))
        doc["rate"] = doc["sent"] / doc["seconds"] if doc["seconds"] else None
        log(
            f"  {mode:<8} {n:>7} customers: {doc['sent']} sent in {doc['seconds']:.2f} s "
            f"({doc['rate']:.0f}/s), peak RSS {doc['peak_rss_mb']:.1f} MB"
        )
        return doc

    rates: dict[str, list[dict[str, Any]]] = {"dispatch": [], "bare": []}
    for _ in range(p.reps):
        for mode in ("dispatch", "bare"):
            rates[mode].append(one(mode, p.rate_customers))
    dispatch_rate = median([d["rate"] for d in rates["dispatch"]])
    bare_rate = median([d["rate"] for d in rates["bare"]])
    ratio = dispatch_rate / bare_rate if dispatch_rate and bare_rate else None
    section.add(
        f"dispatch rate ({p.rate_customers} customers)",
        dispatch_rate,
        "customers/s",
        "",
        None,
        f"median of {p.reps}",
    )
    section.add(f"bare SendMessageBatch loop, {p.in_flight} in flight", bare_rate, "messages/s", "", None)
    section.add(
        "dispatch / bare loop",
        ratio,
        "×",
        "≥ 0.8",
        at_least(ratio, 0.8),
        "" if ratio is None or ratio >= 0.8 else _rate_reason(rates),
    )
    small = one("dispatch", p.small)
    large = one("dispatch", p.large)
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    section.add(
        f"peak RSS dispatching {p.large:,} − dispatching {p.small:,}",
        growth,
        "MB",
        "≤ 20 MB",
        at_most(growth, 20),
        f"{small['peak_rss_mb']:.1f} → {large['peak_rss_mb']:.1f} MB",
    )
    section.add(f"dispatch rate ({p.large:,} customers)", large["rate"], "customers/s", "", None)
    handler = one("handler", p.rate_customers)
    section.add(
        f"dispatcher Lambda handler with the APM agent ({p.rate_customers} customers)",
        handler["rate"],
        "customers/s",
        "",
        None,
        "the agent adds a traceparent attribute to every entry",
    )
    section.raw = {
        "params": p.__dict__,
        "rates": rates,
        "small": small,
        "large": large,
        "handler_with_apm": handler,
        "ratio": ratio,
    }
    return section


def _rate_reason(rates: dict[str, list[dict[str, Any]]]) -> str:
    extra = median([d["seconds"] for d in rates["dispatch"]]) - median([d["seconds"] for d in rates["bare"]])
    n = rates["dispatch"][0]["sent"] or 1
    return (
        f"the dispatch takes {extra / n * 1e6:.0f} µs more per customer than the bare loop; what it does "
        "besides "
        "sending (not profiled here): a keyset query and 1,000 validated messages per page, and it waits "
        "for a "
        "page's last batches, with fewer than 8 calls in flight, before it reads the next page"
    )
