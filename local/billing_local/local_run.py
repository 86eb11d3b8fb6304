"""A local run: seed a database, subscribe the emulators, bill an hour through the local runner.

The CLI (``billing run``, ``billing demo``, ``billing invoke``), the tests and the benchmarks import it;
it imports no CLI module, and prints nothing but its progress bars.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from billing.domain.model import Period
from billing.services.dispatch import DispatchResult
from billing_local.report import PeriodReport
from billing_local.runner import RunnerStats

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence
    from datetime import datetime

    from billing.bootstrap import Runtime
    from billing.config import Settings
    from billing_local.seed import SeedSummary
    from billing_local.stack import LocalStack

MARKETPLACES = ("aws", "gcp", "azure")


def parse_marketplaces(text: str) -> tuple[str, ...]:
    """``"aws,gcp"`` -> ``("aws", "gcp")``; ValueError for an empty list or an unknown marketplace."""
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in chosen if m not in MARKETPLACES]
    if bad or not chosen:
        raise ValueError(f"marketplaces must be among {', '.join(MARKETPLACES)}; got {text!r}")
    return chosen


@dataclass
class HourResult:
    dispatch: DispatchResult
    stats: RunnerStats
    report: PeriodReport
    concurrency: int = 0
    latency_s: float | None = None  # the marketplace's latency per call, when the caller knows it
    lanes: dict[str, RunnerStats] = field(default_factory=dict)  # per lane, when the stack has lanes


def lane_pools(settings: Any, concurrency: int | None = None) -> dict[str, tuple[str, int]]:
    """Each lane's queue and consumer count, when the settings give every marketplace its own queue: the
    template's lane MaximumConcurrency, scaled so that the lanes sum to ``concurrency`` when it is given."""
    from billing_local.stack import QueueSettings

    urls = {m: getattr(settings, f"{m}_queue_url") for m in ("aws", "gcp", "azure")}
    if not all(urls.values()):
        return {}
    caps = QueueSettings.from_template().lane_concurrency
    if concurrency:
        scale = concurrency / sum(caps.values())
        caps = {m: max(1, round(c * scale)) for m, c in caps.items()}
    return {m: (url, caps[m]) for m, url in urls.items() if url}


def local_apm_client(service_name: str = "billing") -> Any:
    """An APM agent capturing events locally (billing_local.apm_capture), instrumented like Lambda."""
    import elasticapm

    from billing.tracing import LeanClient
    from billing_local.runner import APM_SETTINGS

    client = elasticapm.get_client() or LeanClient(service_name=service_name, **APM_SETTINGS)
    elasticapm.instrument()
    return client


async def run_hour(
    event: dict[str, Any],
    concurrency: int,
    retry_delay_s: int = 1,
    apm_client: Any = None,
    latency_s: float | None = None,
    clock: Callable[[], datetime] | None = None,
    *,
    runtime: Callable[[Settings], Runtime] | None = None,
    drain: Callable[..., Awaitable[RunnerStats]] | None = None,
    quiet: bool = False,
) -> HourResult:
    """Dispatch an hour exactly as the scheduled rule would, then drain the queue with the runner.

    ``clock`` is what the dispatcher and the biller ask "has this hour ended, is it inside the
    marketplace's window?" (the wall clock when None). ``runtime`` builds the composition root from the
    run's settings (``Runtime`` with that clock by default); ``drain`` replaces the runner's drain
    (billing_local.faults.Drain wraps it with faults).
    """
    from billing.bootstrap import Runtime
    from billing.config import load_settings
    from billing.entrypoints.biller import bill_body
    from billing_local.progress import SettledProgress, progress_bar
    from billing_local.report import period_report
    from billing_local.runner import drain as runner_drain
    from billing_local.runner import drain_lanes, merged

    drain = drain or runner_drain

    settings = load_settings()
    lanes = lane_pools(settings, concurrency)
    total = sum(cap for _url, cap in lanes.values()) if lanes else concurrency
    # one process runs every consumer: give them a connection each, as Lambda would
    settings = settings.model_copy(update={"db_pool_max": total})
    if runtime is None:
        built = Runtime(settings, clock=clock) if clock is not None else Runtime(settings)
    else:
        built = runtime(settings)
    lane_stats: dict[str, RunnerStats] = {}
    try:
        dispatched = await _dispatch(built, event, apm_client)
        sqs = await built.aws_client("sqs", max_pool_connections=total + 10)
        # this run's messages: a resend sends only the unfinished customers again
        expected = dispatched.resent if dispatched.already_dispatched else dispatched.dispatched
        bar = progress_bar if not quiet else _no_progress
        with bar("customer-hours settled", total=expected) as advance:
            settled = SettledProgress(advance)
            handle = lambda d: bill_body(built, d.body, d.message_id, _sent(d.attributes))  # noqa: E731
            if lanes:
                lane_stats = await drain_lanes(
                    sqs,
                    lanes,
                    handle,
                    retry_delay_s=retry_delay_s,
                    progress=settled,
                    apm_client=apm_client,
                )
                stats = merged(lane_stats.values())
            else:
                assert settings.queue_url is not None
                stats = await drain(
                    sqs,
                    settings.queue_url,
                    handle,
                    concurrency,
                    retry_delay_s=retry_delay_s,
                    progress=settled,
                    apm_client=apm_client,
                )
        if apm_client is not None:
            apm_client._transport.flush()
        report = await period_report(await built.pool(), dispatched.period)
        return HourResult(dispatched, stats, report, total, latency_s, lane_stats)
    finally:
        await built.close()


@contextlib.contextmanager
def _no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def _sent(attributes: dict[str, Any]) -> int | None:
    sent = attributes.get("SentTimestamp")
    return int(sent) if sent else None


async def _dispatch(runtime: Any, event: dict[str, Any], apm_client: Any) -> DispatchResult:
    """The dispatch, inside a transaction shaped like the dispatcher Lambda's when APM is on."""
    if apm_client is None:
        result: DispatchResult = await runtime.dispatch(event)
        return result
    import elasticapm

    apm_client.begin_transaction("request")
    try:
        result = await runtime.dispatch(event)
        elasticapm.label(billing_hour=result.period.isoformat(), run_id=str(result.run_id))
        elasticapm.set_transaction_outcome("success")
        return result
    except Exception:
        apm_client.capture_exception(handled=False)
        elasticapm.set_transaction_outcome("failure")
        raise
    finally:
        apm_client.end_transaction("billing-dispatcher", "dispatched")


async def seed_database(
    dsn: str, customers: int, hours: int, seed: int, last: Period, marketplaces: Sequence[str]
) -> SeedSummary:
    """billing_local.seed on a pool of its own, with a progress bar."""
    import asyncpg

    from billing_local.progress import progress_bar
    from billing_local.seed import seed as seed_data

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        with progress_bar("seeding customers", total=customers) as advance:
            return await seed_data(pool, customers, hours, seed, last, marketplaces, progress=advance)
    finally:
        await pool.close()


async def subscribe_all(stack: LocalStack) -> None:
    """Subscribe every seeded customer but one AWS customer in fifty (to show a rejected record)."""
    import asyncpg

    from billing_local.seed import RATE_CARD

    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = [dict(r) for r in await conn.fetch("SELECT * FROM customers ORDER BY id")]
    finally:
        await conn.close()
    aws = [r for r in rows if r["marketplace"] == "aws"]
    unsubscribed = {r["id"] for r in aws[49::50]}
    dimensions: dict[str, set[str]] = {}
    for marketplace, _metric, dimension, _factor in RATE_CARD:
        dimensions.setdefault(marketplace, set()).add(dimension)
    stack.subscribe([r for r in rows if r["id"] not in unsubscribed], dimensions)
    for r in aws[49::50]:
        stack.metering.add_product(r["aws_product_code"], dimensions["aws"])


# --- the demo -------------------------------------------------------------------------------------


def demo_hour(now: datetime) -> Period:
    """The hour the demo bills at ``now``: the most recent hour that has ended.

    Not the scheduled rule's hour (the last one settled for the settle delay, 15 minutes): between :00
    and :15 that is the hour before the previous one, already two hours old, outside Google's window
    (usage is taken up to one hour after the hour ends: RULES["gcp"].window, two hours from its start),
    and every Google record of it would expire. The most recent ended hour started less than two hours
    before ``now``, so with the demo's fixed clock every marketplace (Google 2 h, AWS 6 h, Azure 24 h)
    still takes it. The settle delay waits for late usage; the demo's usage is all written before it
    bills, so there is none to wait for.
    """
    return Period.last_complete_before(now, timedelta(0))


def fix_clocks(stack: LocalStack, now: datetime) -> Callable[[], datetime]:
    """Set the marketplace emulators' clocks to ``now``; returns that clock for the biller."""

    def clock() -> datetime:
        return now

    for emulator in (stack.metering, stack.gcp, stack.azure):
        emulator.clock = clock
    return clock


@dataclass
class DemoResult:
    hour: Period
    first: HourResult
    again: HourResult
    held: dict[str, int]  # records each marketplace holds after the first run
    held_again: dict[str, int]  # ... and after the second


def run_demo(
    stack: LocalStack,
    customers: int,
    seed: int,
    marketplaces: Sequence[str],
    now: datetime,
    concurrency: int,
    apm_client: Any = None,
    on_start: Callable[[Period], None] | None = None,
) -> DemoResult:
    """Seed the demo customers, bill ``demo_hour(now)`` as of ``now``, then run the same hour again.

    ``now`` is the demo's clock for the whole run: the dispatcher's, the biller's and the emulators',
    so a demo that starts at :59:59 does not cross into the next hour half way through.
    """
    import asyncio

    from billing_local.migrate import migrate

    asyncio.run(migrate(stack.database_url))
    hour = demo_hour(now)
    asyncio.run(seed_database(stack.database_url, customers, 1, seed, hour, marketplaces))
    asyncio.run(subscribe_all(stack))
    clock = fix_clocks(stack, now)
    if on_start is not None:
        on_start(hour)
    # the ideal makespan is known when every customer makes one call of a known latency: AWS only
    latency = stack.metering.latency_s if tuple(marketplaces) == ("aws",) else None
    event = {"period": hour.isoformat()}
    first = asyncio.run(run_hour(event, concurrency, apm_client=apm_client, latency_s=latency, clock=clock))
    held = stack.held_records()
    again = asyncio.run(run_hour(event, concurrency, clock=clock))
    return DemoResult(hour, first, again, held, stack.held_records())
