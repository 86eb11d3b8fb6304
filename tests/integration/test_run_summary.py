"""`billing run`'s summary and exit code tell the truth: a rejected record is not "billed".

The whole command runs (typer's CliRunner, in a thread: it starts its own event loop) against the real
stack of the tests: embedded PostgreSQL, moto's SQS, the AWS Marketplace Metering emulator over HTTP.
The biller and the dispatcher read the wall clock here (the command has no clock to inject), so the
hour billed is the one that ended an hour ago or more: past the settle delay, well inside AWS's
six-hour window for BatchMeterUsage timestamps.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from billing.domain.model import Period
from billing_local.cli import app
from testkit import HOUR, PRODUCT, add_aws_customer, add_rates, add_usage


def recent_hour() -> Period:
    return Period.last_complete_before(datetime.now(UTC) - timedelta(hours=1), timedelta(0))


async def run(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


async def two_customers_one_unsubscribed(pool: Any, stack: Any, hour: Period) -> None:
    await add_rates(pool)
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb"})
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "paying"))
    await add_aws_customer(pool, "gone")  # AWS answers CustomerNotSubscribed: rejected, not retried
    for customer in ("paying", "gone"):
        await add_usage(pool, customer, hour.start, "capacity_gb_hours", "3")
        await add_usage(pool, customer, hour.start, "data_transfer_gb", "4")


async def test_run_with_a_rejected_record_exits_1_and_its_summary_shows_it(
    pool: Any, stack: Any, tmp_path: Path
) -> None:
    # Given an hour with a subscribed customer and one AWS refuses
    hour = recent_hour()
    await two_customers_one_unsubscribed(pool, stack, hour)
    report = tmp_path / "run.json"
    # When the hour is run
    result = await run("run", "--period", hour.isoformat(), "--concurrency", "2", "--report", str(report))
    # Then it fails, and the summary counts only the settled customer as billed
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    out = result.stdout
    assert "customers: 2 billable, 1 billed, 1 finished not billed (a record rejected or expired)" in out
    # with the records and units per ledger state and dimension, every final state shown
    assert "accepted       2 record(s): CapacityGbHours 3, DataTransferGb 2" in out
    assert "rejected       2 record(s): CapacityGbHours 3, DataTransferGb 2" in out
    for state in ("duplicate", "failed", "expired", "skipped"):
        assert f"    {state:<9}      0 record(s)" in out
    assert "skipped: nothing to send" in out and "expired: the hour was past" in out
    assert f"not billed: 2 record(s) rejected (`billing status --period {hour}` names each" in result.stderr
    # and the JSON report carries the same, with the run id and the wall time
    doc = json.loads(report.read_text())
    assert (doc["billed"], doc["finished_not_billed"], doc["unbilled"]) == (1, 1, [])
    aws = doc["marketplaces"]["aws"]
    assert (aws["accepted"], aws["rejected"], aws["failed"], aws["expired"]) == (2, 2, 0, 0)
    assert aws["quantities"]["rejected"] == {"CapacityGbHours": 3, "DataTransferGb": 2}
    assert aws["customers"] == {"billable": 2, "billed": 1, "finished_not_billed": 1, "unfinished": 0}
    assert doc["run_id"] in result.stdout and doc["wall_time_s"] > 0


async def test_allow_rejected_lets_a_run_that_rejects_on_purpose_exit_0(pool: Any, stack: Any) -> None:
    # Given the same hour
    hour = recent_hour()
    await two_customers_one_unsubscribed(pool, stack, hour)
    # When it is run with --allow-rejected
    result = await run("run", "--period", hour.isoformat(), "--concurrency", "2", "--allow-rejected")
    # Then it exits 0, still showing the rejected records
    assert result.exit_code == 0, result.output
    assert "rejected       2 record(s)" in result.stdout


def test_seed_prints_the_hours_it_wrote(database_url: str) -> None:
    result = CliRunner().invoke(
        app,
        ["seed", "--customers", "3", "--hours", "3", "--end", "2026-11-26T13:00:00Z"],
        env={"DATABASE_URL": database_url},
    )
    assert result.exit_code == 0, result.output
    assert "over 3 hour(s): 2026-11-26T11:00:00Z to 2026-11-26T13:00:00Z" in result.stdout


async def test_a_run_before_seeding_says_how_to_bill_the_customers_written_since(
    pool: Any, stack: Any
) -> None:
    hour = recent_hour()
    # Given an hour run on an empty database: recorded as dispatched with 0 customers
    empty = await run("run", "--period", hour.isoformat(), "--concurrency", "1")
    assert empty.exit_code == 0, empty.output
    assert f"no customer is billable in {hour}" in empty.stderr
    assert f"`billing run --period {hour} --resend-unbilled`" in empty.stderr
    # When a customer is written and the hour is run again
    await add_rates(pool)
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb"})
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "late"))
    await add_usage(pool, "late", hour.start, "capacity_gb_hours", "3")
    again = await run("run", "--period", hour.isoformat(), "--concurrency", "1")
    # Then it fails, saying its dispatch sent nothing and which command sends the customer
    assert again.exit_code == 1, again.output
    assert "1 customer(s) left unfinished: late" in again.stderr
    assert (
        f"the hour was dispatched before (0 customer(s)) and this run sent nothing: `billing run --period "
        f"{hour} --resend-unbilled` sends the unfinished customers' messages again"
    ) in again.stderr
    # and that command bills it, its summary counting the message it sent again
    resent = await run("run", "--period", hour.isoformat(), "--concurrency", "1", "--resend-unbilled")
    assert resent.exit_code == 0, resent.output
    assert "dispatched 0, resent 1" in resent.stdout
    assert "customers: 1 billable, 1 billed" in resent.stdout
    # after which a run of the hour has nothing to do, and says so instead of a "0/0" progress line
    done = await run("run", "--period", hour.isoformat(), "--concurrency", "1")
    assert done.exit_code == 0, done.output
    assert f"hour {hour} already billed: nothing to do" in done.stderr
    assert "customer-hours settled" not in done.stderr


# An hour run after AWS's six-hour window (BatchMeterUsage takes timestamps up to six hours old): the
# biller settles its records as expired without a call, their units going back to the carry.
LATE = "2026-11-26T21:00:00Z"  # BILLING_LOCAL_NOW: eight hours after HOUR starts


async def customers_past_the_window(pool: Any, stack: Any, with_usage: tuple[str, ...]) -> None:
    await add_rates(pool)
    for customer in ("idle", *with_usage):
        await add_aws_customer(pool, customer)
    for customer in with_usage:
        await add_usage(pool, customer, HOUR.start, "capacity_gb_hours", "3")


async def run_late() -> Any:
    """`billing run` of HOUR by a clock past its marketplace windows (BILLING_LOCAL_NOW=LATE)."""
    return await asyncio.to_thread(
        CliRunner().invoke, app, ["run", "--period", HOUR.isoformat()], env={"BILLING_LOCAL_NOW": LATE}
    )


async def test_records_expired_with_no_unit_to_bill_are_not_money_lost(pool: Any, stack: Any) -> None:
    # Given a customer without usage in an hour billed after the marketplace's window: its records
    # expire with quantity 0 and nothing carried (in the window they would have been sent as zeros)
    await customers_past_the_window(pool, stack, with_usage=())
    # When the hour is run
    result = await run_late()
    # Then nothing is lost: the customer is billed (nothing owed) and the run exits 0
    assert result.exit_code == 0, result.output
    assert "customers: 1 billable, 1 billed, 0 finished not billed" in result.stdout
    assert (
        "expired        2 record(s): CapacityGbHours 0, DataTransferGb 0 (2 with no unit to bill)"
        in result.stdout
    )
    assert "not billed" not in result.stderr


async def test_records_expired_with_units_still_fail_the_run(pool: Any, stack: Any) -> None:
    # Given the same hour with a second customer whose usage expired with it
    await customers_past_the_window(pool, stack, with_usage=("used",))
    # When the hour is run
    result = await run_late()
    # Then its record with units is money not collected this hour: exit 1, counting only that record
    # (its DataTransferGb record, with no usage, has no unit to bill, like the idle customer's two)
    assert result.exit_code == 1, result.output
    assert "customers: 2 billable, 1 billed, 1 finished not billed" in result.stdout
    assert (
        "expired        4 record(s): CapacityGbHours 0, DataTransferGb 0 (3 with no unit to bill)"
        in result.stdout
    )
    assert f"not billed: 1 record(s) expired (`billing status --period {HOUR}`" in result.stderr
    assert "units: 0 billed, 3 expired (back to the carry)" in result.stdout
