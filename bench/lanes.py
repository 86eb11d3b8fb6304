"""Sections ``quota`` and ``lanes``: the marketplaces' quotas kept, one lane's throttling kept in its lane.

- quota: N AWS customers billed through the local runner against the AWS emulator holding a quota of Q
  BatchMeterUsage calls a second (a rolling one-second window, answered with ThrottlingException past
  it). Figures: the most calls the emulator saw arrive in any one second (target <= Q), the calls it
  refused, the messages dead-lettered (target 0) and the makespan against N/Q (target <= 1.15).
- lanes: AWS, Google and Azure customers, each marketplace in its own lane (queue, DLQ, consumers), run
  twice: clean, then with every AWS call throttled for a while. Figure: the most any Google or Azure
  customer finished later in the throttled run than in the clean one, as a share of their lanes'
  clean makespan (target <= 10 %); and the AWS customers all billed, none dead-lettered.

Each run has its own local stack with lanes (embedded PostgreSQL, moto, the emulators), so nothing of
another section's queues or records is in the way.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bench.common import Section, at_most

if TYPE_CHECKING:
    from collections.abc import Callable

# quiet logs and no EMF lines: the bench prints figures
QUIET = {
    "POWERTOOLS_LOG_LEVEL": "ERROR",
    "POWERTOOLS_METRICS_DISABLED": "true",
    "ELASTIC_APM_ENABLED": "false",
}


@dataclass
class QuotaParams:
    customers: int = 600
    quota: float = 10.0  # AWS BatchMeterUsage calls a second, enforced by the emulator
    consumers: int = 10  # the AWS lane's consumers (its MaximumConcurrency, in one process)


@dataclass
class LanesParams:
    customers: int = 300  # spread over the three marketplaces by the seed
    throttle_s: float = 60.0  # every AWS call throttled for this long
    budget_s: float = 10.0  # BILLING_INVOCATION_BUDGET_SECONDS: how long a throttled bill keeps trying
    aws_quota: float = 10.0
    requeue_delay_s: int = 10  # BILLING_REQUEUE_DELAY_SECONDS (30 by default): a shorter run
    latency_s: float = 0.25  # each Google and Azure call


def _dead_letters(stack: Any) -> int:
    import boto3

    sqs = boto3.client("sqs", endpoint_url=stack.moto_url, region_name="us-east-1")
    total = 0
    for _queue, dlq in stack.lanes.values():
        attrs = sqs.get_queue_attributes(
            QueueUrl=dlq,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        total += sum(int(v) for v in attrs.values())
    return total


def _prepare(stack: Any, customers: int, marketplaces: tuple[str, ...]) -> None:
    from billing.domain.model import Period
    from billing_local.local_run import seed_database as _seed
    from billing_local.migrate import migrate
    from billing_local.seed import RATE_CARD

    asyncio.run(migrate(stack.database_url))
    hour = Period.last_complete_before(datetime.now(UTC), _settle())
    asyncio.run(_seed(stack.database_url, customers, 1, 7, hour, marketplaces))

    import asyncpg

    async def rows() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(stack.database_url)
        try:
            return [dict(r) for r in await conn.fetch("SELECT * FROM customers ORDER BY id")]
        finally:
            await conn.close()

    dimensions: dict[str, set[str]] = {}
    for marketplace, _metric, dimension, _factor in RATE_CARD:
        dimensions.setdefault(marketplace, set()).add(dimension)
    stack.subscribe(asyncio.run(rows()), dimensions)


def _settle() -> Any:
    from datetime import timedelta

    return timedelta(minutes=15)


def _run_hour(env: dict[str, str], consumers: int | None = None) -> Any:
    from billing_local.local_run import run_hour
    from billing_local.stack import environment

    with environment(env):
        return asyncio.run(run_hour({"time": datetime.now(UTC).isoformat()}, consumers or 0))


def run_quota(params: QuotaParams, log: Callable[[str], None]) -> Section:
    from billing_local.stack import environment, local_stack

    section = Section("quota", "8 quota")
    section.note("AWS quota kept: the emulator refuses past Q calls in any rolling one-second window")
    n, q = params.customers, params.quota
    log(f"quota: {n} AWS customers, emulated quota {q:g} calls/s, {params.consumers} consumers")
    with (
        local_stack(os.environ.get("BENCH_DATABASE_URL"), lanes=True) as stack,
        environment({**stack.env, **QUIET}),
    ):
        _prepare(stack, n, ("aws",))
        stack.metering.quota.reset(rate=q)
        env = {
            "BILLING_AWS_QUOTA_PER_SECOND": f"{q:g}",
            "BILLING_AWS_LANE_ENVIRONMENTS": "1",  # one process: its consumers share one pacer
        }
        # only the AWS lane has customers: give it every consumer
        result = _run_hour(env, params.consumers * 3)
        aws = result.lanes.get("aws")
        makespan = aws.makespan if aws else result.stats.makespan
        quota = stack.metering.quota
        dead = _dead_letters(stack)
        billed = len(result.report.marketplaces["aws"].missing) == 0 if result.report.marketplaces else False
    ideal = n / q
    section.add("customers billed (N), every one settled", n, "", ok=billed and not result.report.unbilled)
    section.add(
        "most BatchMeterUsage calls arriving in any one second",
        quota.max_arrivals_per_second(),
        "calls",
        target=f"<= Q = {q:g}",
        ok=at_most(quota.max_arrivals_per_second(), q),
    )
    section.add("calls the emulator refused (ThrottlingException), retried", quota.refused, "calls")
    section.add("messages dead-lettered", dead, "", target="0", ok=dead == 0)
    section.add("makespan", round(makespan, 1), "s")
    ratio = makespan / ideal
    section.add(
        f"makespan / (N/Q = {ideal:g} s)",
        round(ratio, 3),
        "x",
        target="<= 1.15",
        ok=at_most(ratio, 1.15),
    )
    section.raw = {
        "customers": n,
        "quota": q,
        "max_arrivals_per_second": quota.max_arrivals_per_second(),
        "admitted": quota.admitted,
        "refused": quota.refused,
        "dead_lettered": dead,
        "makespan_s": makespan,
        "ideal_s": ideal,
        "invocations": result.stats.invocations,
        "failed_invocations": result.stats.failed,
    }
    return section


def run_lanes(params: LanesParams, log: Callable[[str], None]) -> Section:
    from billing_local.stack import environment, local_stack

    section = Section("lanes", "9 lanes")
    section.note("one marketplace throttled hard (every AWS call) delays no customer of the other lanes")
    runs: dict[str, Any] = {}
    dead = 0
    for label in ("clean", "throttled"):
        log(f"lanes: {label} run, {params.customers} customers over AWS, Google and Azure")
        with (
            local_stack(os.environ.get("BENCH_DATABASE_URL"), lanes=True) as stack,
            environment({**stack.env, **QUIET}),
        ):
            _prepare(stack, params.customers, ("aws", "gcp", "azure"))
            stack.metering.quota.reset(rate=params.aws_quota)
            # a marketplace's latency, so that a lane's makespan is seconds, not the event loop's jitter
            stack.gcp.delay("check", params.latency_s)
            stack.gcp.delay("report", params.latency_s)
            stack.azure.delay(params.latency_s)
            env = {
                "BILLING_AWS_QUOTA_PER_SECOND": f"{params.aws_quota:g}",
                "BILLING_AWS_LANE_ENVIRONMENTS": "1",
                "BILLING_INVOCATION_BUDGET_SECONDS": f"{params.budget_s:g}",
                "BILLING_REQUEUE_DELAY_SECONDS": str(params.requeue_delay_s),
            }
            timer = None
            if label == "throttled":
                # every AWS call answered ThrottlingException, then the throttle lifts
                stack.metering.fault_rate, stack.metering.fault_kinds = 1.0, ("throttle",)

                def lift() -> None:
                    stack.metering.fault_rate = 0.0

                timer = threading.Timer(params.throttle_s, lift)
                timer.start()
            try:
                runs[label] = _run_hour(env)
            finally:
                if timer is not None:
                    timer.cancel()
            if label == "throttled":
                dead = _dead_letters(stack)
    clean, throttled = runs["clean"], runs["throttled"]
    worst = 0.0
    for lane in ("gcp", "azure"):
        base, hit = clean.lanes[lane], throttled.lanes[lane]
        # Rank by rank: the k-th customer to finish in the throttled run against the k-th in the clean
        # one. SQS hands messages out in no fixed order, so the same customer may be first in one run and
        # last in the other; the k-th finish is what a lane's customers as a whole waited.
        clean_ends = sorted(t - base.started for t in base.completed.values())
        hit_ends = sorted(t - hit.started for t in hit.completed.values())
        for before, after in zip(clean_ends, hit_ends, strict=False):
            worst = max(worst, (after - before) / max(base.makespan, 1e-9))
        section.add(
            f"{lane} lane makespan, clean / AWS throttled", f"{base.makespan:.1f} / {hit.makespan:.1f}", "s"
        )
    section.add(
        "most the k-th Google or Azure customer finished later, / its lane's clean makespan",
        round(worst * 100, 1),
        "%",
        target="<= 10 %",
        ok=at_most(worst, 0.10),
    )
    aws = throttled.lanes["aws"]
    requeued = sum(1 for o in aws.outcomes if o.requeued)
    section.add(
        f"AWS lane makespan, clean / throttled {params.throttle_s:g} s",
        f"{clean.lanes['aws'].makespan:.1f} / {aws.makespan:.1f}",
        "s",
    )
    section.add("AWS bills put back on their lane after a whole budget of throttles", requeued, "")
    unbilled = len(throttled.report.unbilled)
    section.add(
        "customers unbilled after the throttled run / dead-lettered",
        f"{unbilled} / {dead}",
        "",
        target="0 / 0",
        ok=unbilled == 0 and dead == 0,
    )
    section.raw = {
        "customers": params.customers,
        "throttle_s": params.throttle_s,
        "budget_s": params.budget_s,
        "worst_delay_share": worst,
        "requeued": requeued,
        "unbilled": unbilled,
        "dead_lettered": dead,
        "makespans": {
            label: {lane: stats.makespan for lane, stats in run.lanes.items()} for label, run in runs.items()
        },
    }
    return section


if __name__ == "__main__":  # pragma: no cover
    began = time.perf_counter()
    for s in (
        run_quota(QuotaParams(customers=150), print),
        run_lanes(LanesParams(customers=90, throttle_s=15), print),
    ):
        for f in s.figures:
            print(s.title, "|", f.name, "|", f.shown(), "|", f.target, "|", f.status)
    print(f"{time.perf_counter() - began:.0f} s")
