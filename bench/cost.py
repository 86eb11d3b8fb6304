"""2. Per-customer cost: round trips, throughput beside the marketplace's own bound, warm reuse, memory, $.

Round trips are counted from the APM spans of each customer's transaction (the local runner, the agent
capturing in memory), with 1 and with 50 clusters per customer, and with 30 dimensions (two
BatchMeterUsage calls of at most 25 records). Warm reuse and memory come from one simulated Lambda
execution environment: a fresh process importing the biller handler and invoking it in-process as the
Lambda runtime does (bench.lambda_child).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.common import Section, at_most, median, percentile
from bench.env import APM_ENV, LAMBDA_ENV, OTHER_CUSTOMERS, PRODUCT, customer_id, last_hour, rate_card
from bench.scheduling import Params, run_once

if TYPE_CHECKING:
    from bench.env import BenchStack

# AWS Lambda, arm64, us-east-1 (the figures the issue gives; aws.amazon.com/lambda/pricing)
PRICE_GB_S = 0.0000133334
PRICE_PER_M_REQUESTS = 0.20
PRICE_DATE = "2026-11 (as given in the issue; check aws.amazon.com/lambda/pricing before quoting)"
TEMPLATE_MEMORY_MB = 512
FULL_VCPU_MB = 1769  # Lambda gives one full vCPU at 1,769 MB, and CPU in proportion below it


@dataclass
class CostParams:
    round_trip_customers: int
    round_trip_cap: int
    throughput_customers: int
    cap: int
    invocations: int
    memory_after: int
    assumed_latency_s: float


def _round_trips(
    bench: BenchStack, p: CostParams, apm_client: Any, log: Any, section: Section
) -> dict[str, Any]:
    variants = {
        "1 cluster, 3 dimensions": (1, 3),
        "50 clusters, 3 dimensions": (50, 3),
        "1 cluster, 30 dimensions": (1, 30),
    }
    out: dict[str, Any] = {}

    async def measure(clusters: int, dims: int) -> Any:
        n, cap = p.round_trip_customers, p.round_trip_cap
        template = await bench.seeded_template(
            f"bench_rt_{clusters}_{dims}", n + cap, clusters=clusters, dims=dims
        )
        bench.subscribe(n + cap, dims)
        params = Params(customers=n, cap=cap, latency_s=0.0, jitter_s=0.0, reps=1, sequential_reps=1)
        return await run_once(bench, "runner", template, params, apm_client)

    for label, (clusters, dims) in variants.items():
        run = asyncio.run(measure(clusters, dims))
        counts = {k: sorted(set(v)) for k, v in run.spans.items()}
        out[label] = {"transactions": len(run.durations), "counts": counts, "failed": run.failed}
        log(f"  round trips, {label}: {json.dumps(counts)} over {len(run.durations)} transactions")
    base = out["1 cluster, 3 dimensions"]["counts"]
    many = out["50 clusters, 3 dimensions"]["counts"]
    wide = out["1 cluster, 30 dimensions"]["counts"]
    for label in ("1 cluster, 3 dimensions", "50 clusters, 3 dimensions"):
        c = out[label]["counts"]
        section.add(f"SQL round trips per customer ({label})", _span(c["sql"]), "", "≤ 4", max(c["sql"]) <= 4)
        section.add(
            f"usage queries per customer ({label})", _span(c["usage_sql"]), "", "= 1", c["usage_sql"] == [1]
        )
        section.add(
            f"marketplace calls per customer ({label})",
            _span(c["marketplace"]),
            "",
            "= ceil(3/25) = 1",
            c["marketplace"] == [1],
        )
    section.add(
        "50 clusters vs 1 cluster: same round trips",
        "same" if many == base else f"{many} vs {base}",
        "",
        "identical counts",
        many == base,
    )
    expected = math.ceil(30 / 25)
    section.add(
        "marketplace calls per customer (30 dimensions)",
        _span(wide["marketplace"]),
        "",
        f"= ceil(30/25) = {expected}",
        wide["marketplace"] == [expected],
    )
    section.add(
        "SQL round trips per customer (30 dimensions)", _span(wide["sql"]), "", "≤ 4", max(wide["sql"]) <= 4
    )
    return out


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{min(values)}..{max(values)}"


async def _direct_marketplace(n: int, cap: int, dims: int) -> float:
    """The same customers' BatchMeterUsage calls alone, straight to the emulator, ``cap`` at a time."""
    from billing.bootstrap import Runtime
    from billing.config import load_settings

    period = last_hour()
    runtime = Runtime(load_settings().model_copy(update={"db_pool_max": cap}))
    try:
        client = await runtime.aws_client("meteringmarketplace", max_pool_connections=max(10, cap))
        dimensions = [d for _m, _metric, d, _f in rate_card(dims)]

        async def call(i: int) -> None:
            await client.batch_meter_usage(
                ProductCode=PRODUCT,
                UsageRecords=[
                    {
                        "Timestamp": period.start,
                        "Dimension": d,
                        "Quantity": 10 + i % 7,
                        "CustomerIdentifier": f"aws-{customer_id(i)}",
                    }
                    for d in dimensions
                ],
            )

        await asyncio.gather(*(call(n + i) for i in range(cap)))  # open the connections first
        todo = iter(range(n))

        async def worker() -> None:
            for i in todo:
                await call(i)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(cap)))
        return time.perf_counter() - began
    finally:
        await runtime.close()


def _throughput(
    bench: BenchStack, p: CostParams, apm_client: Any, log: Any, section: Section
) -> dict[str, Any]:
    n, cap = p.throughput_customers, p.cap

    async def runner() -> Any:
        template = await bench.seeded_template("bench_tp", n + cap)
        bench.subscribe(n + cap)
        params = Params(customers=n, cap=cap, latency_s=0.0, jitter_s=0.0, reps=1, sequential_reps=1)
        return await run_once(bench, "runner", template, params, apm_client)

    run = asyncio.run(runner())
    bench.forget_records()
    bench.marketplace_latency(0.0, 0.0)
    direct_s = asyncio.run(_direct_marketplace(n, cap, 3))
    runner_rate = n / run.makespan
    direct_rate = n / direct_s
    log(
        f"  throughput: runner {runner_rate:.0f} customers/s ({run.makespan:.2f} s for {n}), marketplace "
        "calls alone "
        f"{direct_rate:.0f}/s ({direct_s:.2f} s)"
    )
    section.add(
        f"runner throughput, no injected latency, C={cap}", runner_rate, "customers/s", "", None, f"N={n}"
    )
    section.add(f"marketplace calls alone at C={cap} (the bound)", direct_rate, "calls/s", "", None)
    section.add(
        "runner / marketplace-alone bound",
        runner_rate / direct_rate,
        "×",
        "",
        None,
        f"runner loop CPU {run.cpu_main / n * 1000:.2f} ms and process CPU {run.cpu_process / n * 1000:.2f} "
        "ms per customer",
    )
    return {
        "customers": n,
        "cap": cap,
        "runner_makespan_s": run.makespan,
        "runner_last_done_s": run.last_done,
        "runner_customers_per_s": runner_rate,
        "direct_s": direct_s,
        "direct_calls_per_s": direct_rate,
        "ratio": runner_rate / direct_rate,
        "runner_cpu_loop_ms_per_customer": run.cpu_main / n * 1000,
        "runner_cpu_process_ms_per_customer": run.cpu_process / n * 1000,
    }


def _lambda_environment(bench: BenchStack, p: CostParams, log: Any) -> dict[str, Any]:
    """A fresh process as one Lambda execution environment, invoked p.invocations times warm."""

    async def database() -> str:
        template = await bench.seeded_template("bench_lambda", p.invocations, others=True)
        bench.subscribe(p.invocations)
        return await bench.clone(template)

    dsn = asyncio.run(database())
    bench.forget_records()
    bench.marketplace_latency(0.0, 0.0)
    env = {**os.environ, **LAMBDA_ENV, **APM_ENV, "DATABASE_URL": dsn, "ELASTIC_APM_ENVIRONMENT": "bench"}
    env.pop("BILLING_DB_POOL_MAX", None)  # the template's default: two connections per environment
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.lambda_child",
            "--period",
            last_hour().start.isoformat(),
            "--invocations",
            str(p.invocations),
            "--memory-after",
            str(p.memory_after),
            "--marketplace-customers",
            ",".join(OTHER_CUSTOMERS),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    asyncio.run(bench.drop(dsn))
    doc = _last_json(proc.stdout, "durations_s")
    if doc is None:
        raise RuntimeError(f"the Lambda child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return doc


def _last_json(text: str, key: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{") and f'"{key}"' in line:
            return dict(json.loads(line))
    return None


def run(bench: BenchStack, p: CostParams, apm_client: Any, log: Any) -> Section:
    section = Section("cost", "2 per-customer cost")
    log(
        f"2. per-customer cost: round trips over {p.round_trip_customers} customers per variant, throughput "
        "at "
        f"N={p.throughput_customers} C={p.cap}, {p.invocations} warm Lambda invocations"
    )
    raw: dict[str, Any] = {"params": p.__dict__}
    with bench.linear_moto():  # as in section 1: moto's own O(depth) costs are not the runner's
        raw["round_trips"] = _round_trips(bench, p, apm_client, log, section)
        raw["throughput"] = _throughput(bench, p, apm_client, log, section)
    child = _lambda_environment(bench, p, log)
    raw["lambda_environment"] = {
        k: v
        for k, v in child.items()
        if k not in ("durations_s", "cpu_s", "connections_opened_per_invocation")
    }

    warm = child["durations_s"][1:]
    opened = child["connections_opened_per_invocation"]
    first_backends, last_backends = child["pg_backends_after_first"], child["pg_backends_after_all"]
    log(
        f"  Lambda environment: cold invocation {child['durations_s'][0] * 1000:.0f} ms, warm p50 "
        f"{(percentile(warm, 50) or 0) * 1000:.1f} ms; connections opened: first {opened[0]}, later "
        f"{sum(opened[1:])}; "
        f"Postgres backends {len(first_backends)} → {len(last_backends)}"
    )
    section.add(
        "connections opened by the first invocation (asyncpg + aiohttp)",
        opened[0],
        "",
        "",
        None,
        f"{len(first_backends)} Postgres backend(s)",
    )
    section.add(
        f"new connections per warm invocation (invocations 2..{len(opened)})",
        sum(opened[1:]),
        "",
        "0",
        sum(opened[1:]) == 0,
        "loop.create_connection / create_unix_connection calls on the module loop",
    )
    same = first_backends == last_backends
    section.add(
        "Postgres backends after the last invocation = after the first",
        "same" if same else f"{len(first_backends)} → {len(last_backends)}",
        "",
        "same pid and backend_start",
        same,
    )
    mem = child["memory"]
    growth = mem["after_all"]["peak_rss_mb"] - mem["after_small"]["peak_rss_mb"]
    section.add(
        f"peak RSS after {mem['after_all']['n']} warm invocations − after {mem['after_small']['n']}",
        growth,
        "MB",
        "≤ 10 MB",
        at_most(growth, 10),
        f"{mem['after_small']['peak_rss_mb']:.1f} → {mem['after_all']['peak_rss_mb']:.1f} MB peak RSS",
    )
    section.add("failed invocations", child["failures"], "", "0", child["failures"] == 0)

    # Lambda cost on paper
    duration = median(warm) or 0.0
    peak_mb = mem["after_all"]["peak_rss_mb"]
    cost = lambda_cost(duration, TEMPLATE_MEMORY_MB)
    with_latency = lambda_cost(duration + p.assumed_latency_s, TEMPLATE_MEMORY_MB)
    small_mb = max(128, math.ceil(peak_mb / 64) * 64)
    small = lambda_cost(duration * max(1.0, FULL_VCPU_MB / small_mb), small_mb)
    section.add(
        "warm invocation duration (median, this machine)",
        duration * 1000,
        "ms",
        "",
        None,
        f"cold {child['durations_s'][0] * 1000:.0f} ms",
    )
    section.add(
        "peak RSS of one environment",
        peak_mb,
        "MB",
        f"template MemorySize {TEMPLATE_MEMORY_MB} MB",
        peak_mb < TEMPLATE_MEMORY_MB,
    )
    section.add(
        f"Lambda cost per 1M customer-hours at {TEMPLATE_MEMORY_MB} MB",
        cost,
        "$",
        "",
        None,
        f"{_billed_ms(duration)} ms billed each",
    )
    section.add(
        f"… with {p.assumed_latency_s * 1000:.0f} ms marketplace latency added",
        with_latency,
        "$",
        "",
        None,
        f"{_billed_ms(duration + p.assumed_latency_s)} ms billed each",
    )
    section.add(
        f"… at {small_mb} MB (peak RSS rounded up), CPU scaled to {small_mb}/{FULL_VCPU_MB} of a vCPU",
        small,
        "$",
        "",
        None,
    )
    section.note(
        f"Lambda price assumed: ${PRICE_GB_S} per GB-second and ${PRICE_PER_M_REQUESTS:.2f} per 1M "
        "requests, arm64, "
        f"us-east-1, {PRICE_DATE}. One invocation per customer-hour (BatchSize 1); duration = the median "
        "warm "
        "invocation measured here on a full core, billed rounded up to 1 ms; memory billed is the "
        "configured size, "
        "not the RSS. Lambda gives CPU in proportion to memory (one vCPU at 1,769 MB): at 512 MB the "
        "CPU-bound part "
        "of an invocation may take up to 3.5× longer than measured here. Excludes the APM extension, "
        "CloudWatch Logs "
        "and data transfer."
    )
    raw["lambda_cost"] = {
        "price_gb_s": PRICE_GB_S,
        "price_per_m_requests": PRICE_PER_M_REQUESTS,
        "price_date": PRICE_DATE,
        "warm_duration_ms": duration * 1000,
        "peak_rss_mb": peak_mb,
        "per_million_at_template_memory": cost,
        "per_million_with_latency": with_latency,
        "per_million_at_small_memory": small,
        "small_memory_mb": small_mb,
    }
    raw["warm_durations_ms"] = {
        "p50": (percentile(warm, 50) or 0) * 1000,
        "p99": (percentile(warm, 99) or 0) * 1000,
        "cold_first_ms": child["durations_s"][0] * 1000,
    }
    raw["run_id"] = str(uuid.uuid4())
    section.raw = raw
    return section


def _billed_ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def lambda_cost(duration_s: float, memory_mb: int) -> float:
    """Dollars per million invocations (one per customer-hour)."""
    gb_s = memory_mb / 1024 * _billed_ms(duration_s) / 1000
    return 1_000_000 * gb_s * PRICE_GB_S + PRICE_PER_M_REQUESTS
