"""The `billing` command line: demo, run, seed, db migrate."""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path  # typer reads the annotations at run time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from billing.services.dispatch import DispatchResult
from billing_local import cli_customers, cli_invoke, cli_ops
from billing_local.report import PeriodReport
from billing_local.runner import RunnerStats

if TYPE_CHECKING:
    from billing.domain.model import Period

# Never the local variables in a traceback: a failing `billing db migrate` would print the DSN, password
# included (older typer releases, 0.22 among them, show locals by default): every app says so itself.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Hourly marketplace usage billing.",
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(no_args_is_help=True, help="Database commands.", pretty_exceptions_show_locals=False)
app.add_typer(db_app, name="db")
cli_ops.register(app)
cli_invoke.register(app)
cli_customers.register(app)
console = Console(stderr=True)
out = Console(soft_wrap=True)  # summaries are read and grepped: no wrapping at 80 columns


def main() -> None:
    app()


def _period(text: str) -> Period:
    from billing.domain.model import Period

    try:
        return Period.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _dsn() -> str:
    from billing.bootstrap import database_dsn
    from billing.config import load_settings

    return database_dsn(load_settings())


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply the SQL migrations to DATABASE_URL (safe to run twice)."""
    from billing_local.migrate import migrate

    applied = asyncio.run(migrate(_dsn()))
    out.print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")


@app.command("seed")
def seed_command(
    customers: Annotated[int, typer.Option(min=1, help="How many customers.")] = 300,
    hours: Annotated[int, typer.Option(min=1, help="Hours of usage, ending at --end.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same data.")] = 42,
    marketplaces: Annotated[str, typer.Option(help="Comma-separated: aws,gcp,azure.")] = "aws,gcp,azure",
    end: Annotated[
        str | None, typer.Option(help="Last hour of usage (default: the last complete hour).")
    ] = None,
) -> None:
    """Write deterministic synthetic customers, rate card and usage to DATABASE_URL."""
    chosen = _marketplaces(marketplaces)
    last = _period(end) if end else _last_complete_hour()
    summary = asyncio.run(_seed(_dsn(), customers, hours, seed, last, chosen))
    out.print(f"seeded {summary.customers} customers, {summary.usage_rows} usage rows over {hours} hour(s)")


def _marketplaces(text: str) -> tuple[str, ...]:
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in chosen if m not in ("aws", "gcp", "azure")]
    if bad or not chosen:
        raise typer.BadParameter(f"marketplaces must be among aws, gcp, azure; got {text!r}")
    return chosen


def _last_complete_hour() -> Period:
    from datetime import timedelta

    from billing.domain.model import Period

    return Period.last_complete_before(datetime.now(UTC), timedelta(0))


async def _seed(dsn: str, customers: int, hours: int, seed: int, last: Period, mps: tuple[str, ...]) -> Any:
    import asyncpg

    from billing_local.progress import progress_bar
    from billing_local.seed import seed as seed_data

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        with progress_bar("seeding customers", total=customers) as advance:
            return await seed_data(pool, customers, hours, seed, last, mps, progress=advance)
    finally:
        await pool.close()


@dataclass
class HourResult:
    dispatch: DispatchResult
    stats: RunnerStats
    report: PeriodReport
    concurrency: int = 0
    latency_s: float | None = None  # the marketplace's latency per call, when the caller knows it


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
) -> HourResult:
    """Dispatch an hour exactly as the scheduled rule would, then drain the queue with the runner."""
    from billing.bootstrap import Runtime
    from billing.config import load_settings
    from billing.entrypoints.biller import bill_body
    from billing_local.progress import progress_bar
    from billing_local.report import period_report
    from billing_local.runner import drain

    # one process runs `concurrency` consumers: give them a connection each, as Lambda would
    settings = load_settings().model_copy(update={"db_pool_max": concurrency})
    runtime = Runtime(settings)
    try:
        dispatched = await _dispatch(runtime, event, apm_client)
        sqs = await runtime.aws_client("sqs", max_pool_connections=concurrency + 10)
        assert settings.queue_url is not None
        with progress_bar("billing customers", total=dispatched.dispatched) as advance:
            stats = await drain(
                sqs,
                settings.queue_url,
                lambda d: bill_body(runtime, d.body, d.message_id, _sent(d.attributes)),
                concurrency,
                retry_delay_s=retry_delay_s,
                progress=lambda s: advance(1),
                apm_client=apm_client,
            )
        if apm_client is not None:
            apm_client._transport.flush()
        report = await period_report(await runtime.pool(), dispatched.period)
        return HourResult(dispatched, stats, report, concurrency, latency_s)
    finally:
        await runtime.close()


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


@app.command("run")
def run_command(
    period: Annotated[str, typer.Option(help="The hour to bill, e.g. 2026-11-26T13:00:00Z.")],
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Consumers (default: the template's cap).")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write a JSON report here.")] = None,
    apm_events: Annotated[
        Path | None, typer.Option(help="Capture the run's APM intake events (NDJSON).")
    ] = None,
    timeline: Annotated[Path | None, typer.Option(help="Render the run's APM timeline (HTML).")] = None,
    verbose: Annotated[bool, typer.Option(help="Show every customer's JSON log line.")] = False,
    resend_unbilled: Annotated[
        bool,
        typer.Option(
            help="If the hour was dispatched before, send its unfinished customers' messages again "
            "(after a purge or a lost message; billing is idempotent)."
        ),
    ] = False,
) -> None:
    """Dispatch an hour and drain the queue against the configured backends."""
    from billing_local.stack import QueueSettings

    _quiet_by_default(verbose)
    hour = _period(period)
    cap = concurrency or QueueSettings.from_template().max_concurrency
    apm = _start_apm(apm_events, timeline)
    began = time.perf_counter()
    event: dict[str, Any] = {"period": hour.isoformat()}
    if resend_unbilled:
        event["resend_unbilled"] = True
    result = asyncio.run(run_hour(event, cap, apm_client=apm))
    _finish_apm(apm_events, timeline)
    _print_summary(result, time.perf_counter() - began)
    if report:
        _write_report(report, result)
    if result.report.unbilled:
        console.print(
            f"[red]{len(result.report.unbilled)} customer(s) left unbilled[/red]: "
            + ", ".join(result.report.unbilled[:10])
        )
        raise typer.Exit(1)


@app.command("demo")
def demo_command(
    customers: Annotated[int, typer.Option(min=1, help="Synthetic customers to bill.")] = 300,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Consumers (default: the template's cap).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the synthetic data.")] = 42,
    marketplaces: Annotated[str, typer.Option(help="Comma-separated: aws,gcp,azure.")] = "aws,gcp,azure",
    report: Annotated[Path | None, typer.Option(help="Write a JSON report here.")] = None,
    latency_ms: Annotated[
        float, typer.Option(min=0, help="Latency of each AWS marketplace call (the emulator's), in ms.")
    ] = 0.0,
    apm_events: Annotated[
        Path | None, typer.Option(help="Capture the run's APM intake events (NDJSON).")
    ] = None,
    timeline: Annotated[Path | None, typer.Option(help="Render the run's APM timeline (HTML).")] = None,
    verbose: Annotated[bool, typer.Option(help="Show every customer's JSON log line.")] = False,
) -> None:
    """Bill one hour for synthetic customers on an embedded local stack (no AWS, no Docker)."""
    _quiet_by_default(verbose)
    chosen = _marketplaces(marketplaces)
    apm = _start_apm(apm_events, timeline)
    now = datetime.now(UTC)
    with console.status("starting embedded PostgreSQL, moto and the marketplace emulators"):
        stack_cm = _stack_for_demo()
        stack = stack_cm.__enter__()
    try:
        from billing_local.stack import environment

        with environment(stack.env):
            stack.metering.latency_s = latency_ms / 1000
            _demo(stack, customers, seed, chosen, now, concurrency, report, apm)
    finally:
        stack_cm.__exit__(None, None, None)
    _finish_apm(apm_events, timeline)


def _demo(
    stack: Any,
    customers: int,
    seed: int,
    marketplaces: tuple[str, ...],
    now: datetime,
    concurrency: int | None,
    report: Path | None,
    apm: Any = None,
) -> None:
    from datetime import timedelta

    from billing.domain.model import Period
    from billing_local.migrate import migrate

    asyncio.run(migrate(stack.database_url))
    hour = Period.last_complete_before(now, timedelta(minutes=15))
    asyncio.run(_seed(stack.database_url, customers, 1, seed, hour, marketplaces))
    asyncio.run(_subscribe_all(stack))
    cap = concurrency or stack.queue.max_concurrency
    console.print(
        f"billing {customers} customers ({', '.join(marketplaces)}) for {hour} with {cap} consumers"
    )
    began = time.perf_counter()
    # the ideal makespan is known when every customer makes one call of a known latency: AWS only
    latency = stack.metering.latency_s if marketplaces == ("aws",) else None
    result = asyncio.run(run_hour({"time": now.isoformat()}, cap, apm_client=apm, latency_s=latency))
    _print_summary(result, time.perf_counter() - began)
    held = stack.held_records()
    again = asyncio.run(run_hour({"time": now.isoformat()}, cap))
    out.print(
        f"same hour again: {'already dispatched, ' if again.dispatch.already_dispatched else ''}"
        f"{sum(o.marketplace_calls for o in again.stats.outcomes)} marketplace calls, "
        f"records held by the marketplaces unchanged: {stack.held_records() == held} ({held})"
    )
    if report:
        _write_report(report, result)
    # #13: customers subscribing through the marketplaces' own events, and their final partial hours
    from billing_local.lifecycle import lifecycle_demo

    out.print("subscription lifecycle:")
    asyncio.run(lifecycle_demo(stack, now))


async def _subscribe_all(stack: Any) -> None:
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


def _quiet_by_default(verbose: bool) -> None:
    """Local commands print a summary; JSON logs and EMF metrics only when asked for."""
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "false" if verbose else "true")


def _start_apm(apm_events: Path | None, timeline: Path | None) -> Any:
    """An APM agent capturing locally when either output is asked for; None otherwise."""
    if apm_events is None and timeline is None:
        return None
    from billing_local.apm_capture import CAPTURE

    CAPTURE.reset(apm_events)
    return local_apm_client()


def _finish_apm(apm_events: Path | None, timeline: Path | None) -> None:
    if apm_events is None and timeline is None:
        return
    from billing_local.apm_capture import CAPTURE
    from billing_local.timeline import render_timeline

    if apm_events is not None:
        out.print(f"APM events: {apm_events} ({len(CAPTURE.events)} lines)")
    if timeline is not None:
        timeline.write_text(render_timeline(CAPTURE.events, title="billing demo: one hour"))
        out.print(f"timeline: {timeline}")


@app.command("timeline")
def timeline_command(
    events: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="APM intake NDJSON.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML file to write.")],
) -> None:
    """Render captured APM intake events (NDJSON) as a self-contained HTML timeline."""
    from billing_local.timeline import TimelineInputError, write_timeline

    try:
        stats = write_timeline(events, output)
    except TimelineInputError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    out.print(
        f"{output}: {stats.transactions} transactions, {stats.spans} spans, {stats.failures} failures, "
        f"makespan {stats.makespan_ms / 1000:.2f} s, p50 {stats.p50_ms:.1f} ms, p99 {stats.p99_ms:.1f} ms"
    )


def _stack_for_demo() -> Any:
    from billing_local.stack import local_stack

    return local_stack(os.environ.get("DATABASE_URL"))


def _print_summary(result: HourResult, wall: float) -> None:
    from billing.domain.model import LedgerState

    r = result.report
    out.print(f"hour {r.period}  run {result.dispatch.run_id}")
    out.print(
        f"customers: {r.customers} billable, {r.billed} billed, {len(r.unbilled)} unbilled; "
        f"dispatched {result.dispatch.dispatched}"
    )
    for marketplace in sorted(r.states):
        counts = ", ".join(
            f"{s.value} {r.count(s, marketplace)}"
            for s in (
                LedgerState.ACCEPTED,
                LedgerState.DUPLICATE,
                LedgerState.REJECTED,
                LedgerState.FAILED,
                LedgerState.SKIPPED,
            )
        )
        out.print(f"  {marketplace}: records {counts}")
    out.print(
        f"invocations {result.stats.invocations} ({result.stats.failed} failed and retried), "
        f"wall time {wall:.2f} s"
    )


def _write_report(path: Path, result: HourResult) -> None:
    from billing.domain.model import LedgerState

    r = result.report
    doc = {
        "period": r.period,
        "customers": r.customers,
        "customer_hours": r.customers,
        "billed": r.billed,
        "unbilled": r.unbilled,
        "marketplaces": {
            mp: {
                s.value: r.count(s, mp)
                for s in (
                    LedgerState.ACCEPTED,
                    LedgerState.DUPLICATE,
                    LedgerState.REJECTED,
                    LedgerState.FAILED,
                )
            }
            for mp in sorted(r.states)
        },
        "invocations": result.stats.invocations,
        "concurrency": result.concurrency,
        "makespan_s": round(result.stats.makespan, 4),
        "ideal_makespan_s": _ideal_makespan(result),
        **_duration_ratios(result.stats),
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _ideal_makespan(result: HourResult) -> float | None:
    """ceil(customers / consumers) × the marketplace's latency per call, when that latency is known."""
    if not result.latency_s or not result.concurrency:
        return None
    return round(math.ceil(result.dispatch.dispatched / result.concurrency) * result.latency_s, 4)


def _duration_ratios(stats: RunnerStats) -> dict[str, float | None]:
    """Each invocation's recorded duration over its own work (the time inside the biller's code).

    The recorded duration is the APM transaction's when the run captured APM events, else the runner's
    own measure of the invocation. 1.0 means no transaction holds another message's wait.
    """
    from billing_local.apm_capture import CAPTURE

    recorded = {
        t["faas"]["trigger"]["request_id"]: t["duration"] / 1000
        for t in CAPTURE.of_type("transaction")
        if t.get("type") == "messaging" and t.get("faas", {}).get("trigger", {}).get("request_id")
    }
    ratios = sorted(
        recorded.get(message_id, duration) / work
        for message_id, duration, work in zip(stats.message_ids, stats.durations, stats.work, strict=True)
        if work > 0
    )
    if not ratios:
        return {"duration_ratio_p50": None, "duration_ratio_p99": None}
    return {
        "duration_ratio_p50": round(statistics.median(ratios), 4),
        "duration_ratio_p99": round(ratios[min(len(ratios) - 1, math.ceil(0.99 * len(ratios)) - 1)], 4),
    }


if __name__ == "__main__":  # pragma: no cover
    main()
