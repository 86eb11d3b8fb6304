"""The `billing` command line: demo, run, seed, db migrate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path  # typer reads the annotations at run time
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from billing_local import cli_customers, cli_invoke, cli_local, cli_ops, errors
from billing_local.local_run import HourResult, parse_marketplaces

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from billing.domain.model import Period

# Never the local variables in a traceback: a failing `billing db migrate` would print the DSN, password
# included (older typer releases, 0.22 among them, show locals by default): every app says so itself.
# click's plain help, not typer's rich panels, which cut option names at 80 columns (help_env.py says why)
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Hourly marketplace usage billing.",
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(no_args_is_help=True, help="Database commands.", pretty_exceptions_show_locals=False)
app.add_typer(db_app, name="db")
app.add_typer(cli_local.local_app, name="local")
cli_ops.register(app)
cli_invoke.register(app)
cli_customers.register(app)
console = Console(stderr=True, soft_wrap=True)  # a message is one line, never broken mid-sentence
out = Console(soft_wrap=True)  # summaries are read and grepped: no wrapping at 80 columns


def main() -> None:
    from billing_local.errors import run
    from billing_local.help_env import prepare_help

    prepare_help(app)
    run(app)


def _dsn() -> str:
    from billing.bootstrap import database_dsn
    from billing.config import load_settings

    return database_dsn(load_settings())


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply the SQL migrations to DATABASE_URL or the database secret (safe to run twice)."""
    from billing.config import load_settings
    from billing.migrate import migrate_configured

    applied = asyncio.run(migrate_configured(load_settings()))
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
    last = cli_ops.parse_period(end, "--end") if end else _last_complete_hour()
    if end:
        cli_ops.require_ended(last, "--end", "usage of a future hour is not billable")
    from billing_local.local_run import seed_database

    summary = asyncio.run(seed_database(_dsn(), customers, hours, seed, last, chosen))
    cli_local.notify_stack()  # a running `billing local up` subscribes them with its emulators
    first = last.shifted(1 - hours)
    out.print(
        f"seeded {summary.customers} customers, {summary.usage_rows} usage rows over {hours} hour(s): "
        f"{first} to {last} (bill them with `billing run --period {last}`)"
    )


def _writable(path: Path | None, option: str) -> None:
    """Checked before any work: a run must not bill an hour and then fail to write its report."""
    if path is not None and not path.parent.is_dir():
        raise typer.BadParameter(
            f"folder {str(path.parent)!r} does not exist: create it or choose another path",
            param_hint=f"'{option}'",
        )


def _marketplaces(text: str) -> tuple[str, ...]:
    try:
        return parse_marketplaces(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _last_complete_hour() -> Period:
    from datetime import timedelta

    from billing.domain.model import Period

    return Period.last_complete_before(_now(), timedelta(0))


def _now() -> datetime:
    """The local tooling's clock (billing_local.clock: BILLING_LOCAL_NOW or the wall clock)."""
    from billing_local import clock

    return clock.now()  # a malformed BILLING_LOCAL_NOW: a ClockError, one line from billing_local.errors


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
    allow_rejected: Annotated[
        bool,
        typer.Option(
            help="Exit 0 although records were rejected (a run that rejects on purpose); failed and "
            "expired records still exit 1."
        ),
    ] = False,
) -> None:
    """Dispatch an hour and drain the queue; exit 1 if a customer is unfinished or a record was
    rejected, failed or expired, 130 on Ctrl-C. Log lines go to a file (its path is printed) unless
    --verbose."""
    from billing_local.stack import QueueSettings

    # the file takes every line, the terminal none; --verbose shows them here, as before
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "INFO")
    _quiet_by_default(verbose)
    hour = cli_ops.parse_period(period)
    cli_ops.require_ended(hour)  # by BILLING_LOCAL_NOW when pinned, as `billing status` checks it
    _writable(report, "--report")
    _writable(apm_events, "--apm-events")
    _writable(timeline, "--timeline")
    _configured()  # a missing setting is one error line, before the log path and progress lines
    try:
        cap = concurrency or QueueSettings.from_template().max_concurrency
        logs = _log_file(verbose)
        apm = _start_apm(apm_events, timeline)
        began = time.perf_counter()
        event: dict[str, Any] = {"period": hour.isoformat()}
        if resend_unbilled:
            event["resend_unbilled"] = True
        from billing_local.clock import injected
        from billing_local.local_run import DispatchInterrupted, run_hour

        cli_local.notify_stack()  # customers written by other means than `billing seed`
        with logs:
            try:
                result = _interruptible(
                    lambda interrupt: run_hour(
                        event, cap, apm_client=apm, clock=injected(), interrupt=interrupt
                    )
                )
            except DispatchInterrupted:
                _interrupted(
                    f"interrupted while dispatching {hour}: this run billed nothing; `billing run --period "
                    f"{hour}` again sends every customer not yet billed (each is billed once)"
                )
    except KeyboardInterrupt:  # outside the run's event loop (which takes Ctrl-C over while it runs)
        _interrupted(
            f"interrupted: `billing status --period {hour}` shows what is billed; `billing run --period "
            f"{hour}` again bills the rest (each customer once)"
        )
    wall = time.perf_counter() - began
    _finish_apm(apm_events, timeline)
    _say_what_the_dispatch_did(result)
    _print_summary(result, wall)
    if report:
        _write_report(report, result, wall)
    if result.interrupted:
        _interrupted(
            f"interrupted: the summary above is what settled before Ctrl-C; `billing run --period {hour}` "
            "again bills the rest (a bill abandoned in flight comes back after the queue's visibility "
            "timeout; none is billed twice)"
        )
    _exit_on_failures(result, allow_rejected)


def _configured() -> None:
    """The settings a run needs name a database and the queues, in the order a newcomer sets them."""
    from billing.config import load_settings
    from billing.domain.errors import ConfigurationError
    from billing.domain.model import Marketplace

    settings = load_settings()
    if settings.database_url is None and settings.database_secret_arn is None:
        raise ConfigurationError("set DATABASE_URL or BILLING_DATABASE_SECRET_ARN")
    if not all(settings.lane_queue_url(m.value) for m in Marketplace):
        raise ConfigurationError("set BILLING_QUEUE_URL or every lane's BILLING_<MARKETPLACE>_QUEUE_URL")


def _interrupted(message: str) -> NoReturn:
    """Say what a Ctrl-C left and how to go on (whole, never read as markup), and exit 130."""
    console.print(message, markup=False, highlight=False)
    raise typer.Exit(errors.INTERRUPTED) from None


def _log_file(verbose: bool) -> contextlib.ExitStack:
    """Unless --verbose, the run's JSON log lines go to a file (its path printed), not the terminal."""
    logs = contextlib.ExitStack()
    if not verbose:
        from billing_local.logfile import divert, run_log_path

        log_path = run_log_path(cli_local.state_dir())
        logs.enter_context(divert(log_path))
        typer.echo(f"log lines: {log_path}", err=True)  # whole, never wrapped: it is copied
    return logs


def _interruptible(work: Callable[[asyncio.Event], Awaitable[HourResult]]) -> HourResult:
    """Run ``work(interrupt)`` in an event loop whose Ctrl-C sets ``interrupt`` (once; a second one
    changes nothing: the run's grace is bounded) instead of raising KeyboardInterrupt in the middle of
    a bill, so what is in flight winds down and no traceback (or ExceptionGroup) is printed."""

    async def main() -> HourResult:
        loop = asyncio.get_running_loop()
        interrupt = asyncio.Event()

        def on_sigint() -> None:
            if not interrupt.is_set():
                interrupt.set()
                console.print("stopping: receiving no more messages, letting the bills in flight finish")

        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        except (RuntimeError, ValueError):  # not the main thread (an in-process test): no Ctrl-C to take
            return await work(interrupt)
        try:
            return await work(interrupt)
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    return asyncio.run(main())


def _say_what_the_dispatch_did(result: HourResult) -> None:
    """A rerun of an hour sends nothing: say so, rather than leave bare "0" progress lines to read."""
    from billing_local.accounting import run_failures

    d, r = result.dispatch, result.report
    if d.already_dispatched and not d.resent and not result.to_settle and not r.unbilled:
        # "billed" only when the marketplaces hold every record: else the records are listed below
        unbilled = run_failures(r.not_billed(), allow_rejected=False)
        done = "already billed" if not unbilled else "already settled, not all billed (see below)"
        console.print(
            f"hour {d.period} {done}: nothing to do (dispatched before, {d.dispatched} customer(s))",
            markup=False,
            highlight=False,
        )
    elif not r.customers:
        console.print(
            f"no customer is billable in {d.period}: nothing billed; the hour is recorded as dispatched, so "
            f"customers written later are sent by `billing run --period {d.period} --resend-unbilled`",
            markup=False,
            highlight=False,
        )


def _exit_on_failures(result: HourResult, allow_rejected: bool) -> None:
    """Exit 1 when a customer is unfinished or a record was rejected (unless allowed), failed or expired."""
    from billing_local.accounting import run_failures

    r, hour = result.report, result.dispatch.period
    failures = run_failures(r.not_billed(), allow_rejected)
    if r.unbilled:
        console.print(
            f"[red]{len(r.unbilled)} customer(s) left unfinished[/red]: " + ", ".join(r.unbilled[:10])
        )
        if result.dispatch.already_dispatched and not result.dispatch.resent:
            # the dispatcher sends an hour once: a customer missing from that dispatch (written after
            # it, or whose message was purged or lost) has no message unless it is sent again
            console.print(
                f"the hour was dispatched before ({result.dispatch.dispatched} customer(s)) and this run "
                f"sent nothing: `billing run --period {hour} --resend-unbilled` sends the unfinished "
                f"customers' messages again (each is billed once); `billing status --period {hour}` says "
                "why each one is unfinished",
                markup=False,
                highlight=False,
            )
        else:
            console.print(
                f"`billing status --period {hour}` names each one and why", markup=False, highlight=False
            )
    if failures:
        console.print(
            "[red]not billed:[/red] "
            + ", ".join(f"{n} record(s) {s.value}" for s, n in failures.items())
            + f" (`billing status --period {hour}` names each one and why)"
        )
    if r.unbilled or failures:
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
    """Bill one hour for synthetic customers on an embedded local stack (no AWS, no Docker). Log lines
    go to a file (its path is printed) unless --verbose; Ctrl-C stops it (exit 130)."""
    from billing_local.local_run import DispatchInterrupted

    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "INFO")
    _quiet_by_default(verbose)
    chosen = _marketplaces(marketplaces)
    _writable(report, "--report")
    _writable(apm_events, "--apm-events")
    _writable(timeline, "--timeline")
    apm = _start_apm(apm_events, timeline)
    now = datetime.now(UTC)
    starting = "starting embedded PostgreSQL, moto and the marketplace emulators"
    # a spinner on a terminal; a log or a pipe gets the line (rich's status draws nothing there). The
    # print is inside the try: a Ctrl-C right after the line is written can land in the print's tail
    spinner = console.status(starting) if console.is_terminal else contextlib.nullcontext()
    try:
        if not console.is_terminal:
            console.print(starting)
        with spinner:
            stack_cm = _stack_for_demo()
            stack = stack_cm.__enter__()
    except KeyboardInterrupt:  # local_stack stops what it had started before this reaches here
        _interrupted(
            "interrupted while the local stack was starting: nothing was billed; its PostgreSQL and "
            "emulators are stopped"
        )
    try:
        from billing_local.stack import environment

        with environment(stack.env), _log_file(verbose):
            stack.metering.latency_s = latency_ms / 1000
            _demo(stack, customers, seed, chosen, now, concurrency, report, apm)
    except (KeyboardInterrupt, DispatchInterrupted):  # Ctrl-C while seeding or dispatching
        _interrupted("interrupted: the demo's stack and its data are deleted now")
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
    from billing.domain.model import LedgerState
    from billing_local.local_run import DemoInterrupted, run_demo

    cap = concurrency or stack.queue.max_concurrency
    began = time.perf_counter()

    def starting(hour: Period) -> None:
        nonlocal began
        console.print(
            f"billing {customers} customers ({', '.join(marketplaces)}) for {hour} with {cap} consumers, "
            f"as of {now.strftime('%Y-%m-%dT%H:%M:%SZ')} (the demo's clock)"
        )
        began = time.perf_counter()

    try:
        result = run_demo(
            stack,
            customers,
            seed,
            marketplaces,
            now,
            cap,
            apm_client=apm,
            on_start=starting,
            runner=_interruptible,
        )
    except DemoInterrupted as stopped:
        _print_summary(stopped.result, time.perf_counter() - began)
        _interrupted(
            "interrupted: the summary above is what settled before Ctrl-C; the demo's stack and its data "
            "are deleted now"
        )
    wall = time.perf_counter() - began
    _print_summary(result.first, wall)
    again = result.again
    out.print(
        f"same hour again: {'already dispatched, ' if again.dispatch.already_dispatched else ''}"
        f"{sum(o.marketplace_calls for o in again.stats.outcomes)} marketplace calls, "
        f"records held by the marketplaces unchanged: {result.held_again == result.held} "
        f"({', '.join(f'{m} {n}' for m, n in sorted(result.held.items()))})"
    )
    if report:
        _write_report(report, result.first, wall)
    # the demo leaves one AWS customer in fifty unsubscribed on purpose (local_run.subscribe_all)
    if result.first.report.count(LedgerState.REJECTED):
        out.print(DEMO_REJECTS)
    # #13: customers subscribing through the marketplaces' own events, and their final partial hours
    from billing_local.lifecycle import lifecycle_demo

    out.print(
        "subscription lifecycle (hours of its own, three before the hour just billed, so the two never mix):"
    )
    asyncio.run(lifecycle_demo(stack, now))
    _exit_on_failures(result.first, allow_rejected=True)


DEMO_REJECTS = (
    "rejected records are expected here: the demo leaves one AWS customer in fifty unsubscribed to show "
    "what a rejection looks like (`billing run` exits 1 on them unless --allow-rejected)"
)


def _quiet_by_default(verbose: bool) -> None:
    """Local commands print a summary; JSON logs and EMF metrics only when asked for."""
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "false" if verbose else "true")


def _start_apm(apm_events: Path | None, timeline: Path | None) -> Any:
    """An APM agent capturing locally when either output is asked for; None otherwise."""
    if apm_events is None and timeline is None:
        return None
    from billing_local.apm_capture import CAPTURE
    from billing_local.local_run import local_apm_client

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
    from billing_local.timeline import write_timeline

    _writable(output, "--output")
    stats = write_timeline(events, output)  # input without transactions: one line from billing_local.errors
    out.print(
        f"{output}: {stats.transactions} transactions, {stats.spans} spans, {stats.failures} failures, "
        f"makespan {stats.makespan_ms / 1000:.2f} s, p50 {stats.p50_ms:.1f} ms, p99 {stats.p99_ms:.1f} ms"
    )


def _stack_for_demo() -> Any:
    from billing_local.stack import local_stack

    # the demo bills as the stack deploys: each marketplace in its own lane
    return local_stack(os.environ.get("DATABASE_URL"), lanes=True)


def _print_summary(result: HourResult, wall: float) -> None:
    from billing_local.render import hour_lines

    d = result.dispatch
    resent = f", resent {d.resent}" if d.resent else ""  # an hour dispatched before: its messages sent again
    out.print(f"hour {result.report.period}  run {d.run_id}  dispatched {d.dispatched}{resent}")
    for line in hour_lines(result.report):
        out.print(line, markup=False, highlight=False)
    out.print(
        f"invocations {result.stats.invocations} ({result.stats.failed} failed and retried), "
        f"wall time {wall:.2f} s"
    )


def _write_report(path: Path, result: HourResult, wall: float) -> None:
    from billing_local.render import hour_document

    path.write_text(json.dumps(hour_document(result, wall), indent=2) + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
