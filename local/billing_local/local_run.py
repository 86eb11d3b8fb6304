"""A local run: seed a database, subscribe the emulators, bill an hour through the local runner.

The CLI (``billing run``, ``billing demo``, ``billing invoke``), the tests and the benchmarks import it;
it imports no CLI module, and prints nothing but its progress bars.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from billing.domain.model import Period
from billing.services.dispatch import DispatchResult
from billing_local.report import PeriodReport
from billing_local.runner import RunnerStats

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence
    from datetime import datetime

    from billing.bootstrap import Runtime
    from billing.config import Settings
    from billing.domain.messages import BillMessageV1
    from billing.domain.model import Marketplace
    from billing.ports import MessageQueue
    from billing_local.seed import SeedSummary
    from billing_local.stack import LocalStack

MARKETPLACES = ("aws", "gcp", "azure")
T = TypeVar("T")


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
    interrupted: bool = False  # Ctrl-C stopped the drain: the report says what settled before it
    to_settle: int | None = None  # the customer-hours this run set out to settle (None: not counted)


class DemoInterrupted(Exception):
    """Ctrl-C while the demo billed: ``result`` is what settled before it."""

    def __init__(self, result: HourResult) -> None:
        super().__init__(str(result.report.period))
        self.result = result


class DispatchInterrupted(Exception):
    """Ctrl-C during the dispatch: it was cancelled (a rerun of the hour sends what may be unbilled)."""

    def __init__(self, period: str) -> None:
        super().__init__(period)
        self.period = period


GRACE_S = 1.5  # after Ctrl-C, how long the bills in flight get to finish before they are abandoned


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
    interrupt: asyncio.Event | None = None,
) -> HourResult:
    """Dispatch an hour exactly as the scheduled rule would, then drain the queue with the runner.

    ``clock`` is what the dispatcher and the biller ask "has this hour ended, is it inside the
    marketplace's window?" (the wall clock when None). ``runtime`` builds the composition root from the
    run's settings (``Runtime`` with that clock by default); ``drain`` replaces the runner's drain
    (billing_local.faults.Drain wraps it with faults).

    ``interrupt`` (set on Ctrl-C): during the dispatch, the dispatch is cancelled and
    DispatchInterrupted raised (the run is not marked finished, so a rerun sends every customer whose
    bill may be unfinished, and the ledger bills each once); during the drain, nothing more is
    received, messages not started are released, the bills in flight get GRACE_S to finish and are
    then abandoned (their messages come back after the visibility timeout; the ledger's claim keeps a
    maybe-sent record from being billed twice), and the result, ``interrupted``, reports what settled.
    """
    from billing.bootstrap import Runtime, Wrappers
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
    sends = _SendCount()
    if runtime is None:
        built = Runtime(settings, clock=clock, wrappers=Wrappers(queue=sends.wrap))
    else:
        built = runtime(settings)
    lane_stats: dict[str, RunnerStats] = {}
    try:
        bar = progress_bar if not quiet else _no_progress
        with bar(f"customers dispatched for {event.get('period')}", total=None) as sends.advance:
            dispatched = await _until_interrupted(_dispatch(built, event, apm_client), interrupt, 0.0)
        sends.advance = None  # a throttled customer's copy, sent while billing, is not dispatch
        if dispatched is None:
            raise DispatchInterrupted(str(event.get("period")))
        sqs = await built.aws_client("sqs", max_pool_connections=total + 10)
        expected, only = await _to_settle(built, dispatched)
        # an hour dispatched before with nothing left to settle: no "0/0" line (the CLI says "already
        # billed: nothing to do"); the drain still runs, for any stray copy of the hour's messages
        settle_bar = _no_progress if dispatched.already_dispatched and not expected else bar
        with settle_bar("customer-hours settled", total=expected) as advance:
            settled = SettledProgress(advance, only)
            handle = lambda d: bill_body(built, d.body, d.message_id, _sent(d.attributes))  # noqa: E731
            seen: dict[int, RunnerStats] = {}  # each drain's stats, for a drain abandoned after Ctrl-C

            def progress(stats: RunnerStats) -> None:
                seen[id(stats)] = stats
                settled(stats)

            options: dict[str, Any] = {"interrupt": interrupt} if interrupt is not None else {}
            if lanes:
                drained = await _until_interrupted(
                    drain_lanes(
                        sqs,
                        lanes,
                        handle,
                        retry_delay_s=retry_delay_s,
                        progress=progress,
                        apm_client=apm_client,
                        **options,
                    ),
                    interrupt,
                    GRACE_S,
                )
                lane_stats = drained if drained is not None else {}
                stats = merged(lane_stats.values() if drained is not None else seen.values())
            else:
                assert settings.queue_url is not None
                alone = await _until_interrupted(
                    drain(
                        sqs,
                        settings.queue_url,
                        handle,
                        concurrency,
                        retry_delay_s=retry_delay_s,
                        progress=progress,
                        apm_client=apm_client,
                        **options,
                    ),
                    interrupt,
                    GRACE_S,
                )
                stats = alone if alone is not None else merged(seen.values())
        if apm_client is not None:
            apm_client._transport.flush()
        report = await period_report(await built.pool(), dispatched.period)
        interrupted = interrupt is not None and interrupt.is_set()
        return HourResult(dispatched, stats, report, total, latency_s, lane_stats, interrupted, expected)
    finally:
        await built.close()


async def _to_settle(built: Runtime, dispatched: DispatchResult) -> tuple[int, frozenset[str] | None]:
    """How many customer-hours this run will settle, and (when known) which.

    A dispatch or a resend: the messages it sent. An hour dispatched before, with nothing sent now (a
    rerun after Ctrl-C, after a redrive moved its messages back, after a visibility timeout): the
    hour's customers not yet billed, whose messages are what the queue holds for it; only they count,
    so a stray copy of a billed customer's message cannot take the count past the total."""
    if not dispatched.already_dispatched:
        return dispatched.dispatched, None
    if dispatched.resent:
        return dispatched.resent, None
    from billing_local.report import period_report

    unfinished = (await period_report(await built.pool(), dispatched.period)).unbilled
    return len(unfinished), frozenset(unfinished)


class _SendCount:
    """Wraps the run's queue (Runtime's ``wrappers`` seam) to advance the dispatch's progress by the
    messages each send delivered, while ``advance`` is set."""

    def __init__(self) -> None:
        self.advance: Callable[[int], None] | None = None

    def wrap(self, inner: MessageQueue) -> MessageQueue:
        counter = self

        class Counted:
            async def send(
                self,
                messages: Sequence[BillMessageV1],
                lane: Marketplace | None = None,
                delay_seconds: int = 0,
            ) -> int:
                sent = await inner.send(messages, lane=lane, delay_seconds=delay_seconds)
                if counter.advance is not None:
                    counter.advance(sent)
                return sent

        return Counted()


async def _until_interrupted(work: Awaitable[T], interrupt: asyncio.Event | None, grace_s: float) -> T | None:
    """``work``'s result; or, once ``interrupt`` is set, what it returns within ``grace_s`` (the work
    sees the same event and winds down), else None after cancelling it."""
    task = asyncio.ensure_future(work)
    if interrupt is None:
        return await task
    waiter = asyncio.ensure_future(interrupt.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not task.done():
        await asyncio.wait({task}, timeout=grace_s)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


@contextlib.contextmanager
def _no_progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
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
    """billing_local.seed on a pool of its own, TLS verified as the functions verify it (a seller may seed a
    development database on RDS), with a progress bar; its bulk writes take as long as they take."""
    from billing.adapters.postgres import create_pool
    from billing.adapters.postgres_tls import database_tls
    from billing.config import load_settings
    from billing_local.progress import progress_bar
    from billing_local.seed import seed as seed_data

    pool = await create_pool(dsn, 2, database_tls(load_settings()), command_timeout=None)
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
    runner: Callable[[Callable[[Any], Awaitable[HourResult]]], HourResult] | None = None,
) -> DemoResult:
    """Seed the demo customers, bill ``demo_hour(now)`` as of ``now``, then run the same hour again.

    ``now`` is the demo's clock for the whole run: the dispatcher's, the biller's and the emulators',
    so a demo that starts at :59:59 does not cross into the next hour half way through. ``runner``
    runs each hour's ``work(interrupt)`` (the CLI's takes Ctrl-C over; by default no interrupt);
    a billing stopped by Ctrl-C ends the demo with :class:`DemoInterrupted`.
    """
    import asyncio

    def run_alone(work: Callable[[Any], Awaitable[HourResult]]) -> HourResult:
        async def main() -> HourResult:
            return await work(None)

        return asyncio.run(main())

    go = runner or run_alone

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
    first = go(
        lambda interrupt: run_hour(
            event, concurrency, apm_client=apm_client, latency_s=latency, clock=clock, interrupt=interrupt
        )
    )
    if first.interrupted:
        raise DemoInterrupted(first)
    held = stack.held_records()
    again = go(lambda interrupt: run_hour(event, concurrency, clock=clock, interrupt=interrupt))
    if again.interrupted:
        raise DemoInterrupted(first)
    return DemoResult(hour, first, again, held, stack.held_records())
