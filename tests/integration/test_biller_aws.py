"""The biller against a real PostgreSQL and the AWS Marketplace Metering emulator.

The emulator (billing_local.emulators.aws_metering) is an HTTP double of BatchMeterUsage that
follows AWS's documented behaviour (SigV4 required, 25 records, 6-hour window, idempotent identical
records, DuplicateRecord for another quantity, CustomerNotSubscribed, throttling, UnprocessedRecords);
the real aioboto3 client talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from billing.bootstrap import Runtime, Wrappers
from billing.budget import RESERVE_SECONDS
from billing.config import load_settings
from billing.domain.errors import (
    BadMessageError,
    BudgetSpentError,
    MarketplaceUnavailableError,
    ThrottledError,
)
from billing.domain.model import LedgerState, Marketplace
from billing.services.bill import Biller
from billing_local.faults import AFTER_ACCEPT, Clock, Killed, KillingLedger
from testkit import (
    HOUR,
    PRODUCT,
    add_aws_customer,
    add_rates,
    add_usage,
    ledger,
    message,
    throttle_every_call,
    within_window,
)


@pytest.fixture
def clock() -> Clock:
    """The biller's clock: 20 minutes after the hour ended, until a test moves it."""
    return Clock(within_window())


@pytest.fixture
async def runtime(stack: Any, monkeypatch: pytest.MonkeyPatch, clock: Clock) -> AsyncIterator[Runtime]:
    monkeypatch.setenv("BILLING_MARKETPLACE_ATTEMPTS", "2")
    stack.metering.clock = within_window
    rt = Runtime(load_settings(), clock=clock)
    yield rt
    await rt.close()


@pytest.fixture
async def biller(runtime: Runtime, pool: Any, stack: Any) -> Biller:
    await add_rates(pool)
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb"})
    return await runtime.biller()


async def test_customer_hour_is_billed_and_the_answer_recorded(biller: Biller, pool: Any, stack: Any) -> None:
    # Given a subscribed customer with 2.5 GB-hours and 3 GB of transfer (rated 0.5 unit per GB)
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start + timedelta(minutes=5), "capacity_gb_hours", "1.25", cluster="a")
    await add_usage(pool, "c1", HOUR.start + timedelta(minutes=35), "capacity_gb_hours", "1.25", cluster="b")
    await add_usage(pool, "c1", HOUR.start + timedelta(minutes=10), "data_transfer_gb", "3")
    # When the hour is billed
    outcome = await biller.bill(message("c1"))
    # Then AWS holds 2 CapacityGbHours and 1 DataTransferGb, and the ledger has their record ids
    held = {r.dimension: r for r in stack.metering.accepted()}
    assert {d: r.quantity for d, r in held.items()} == {"CapacityGbHours": 2, "DataTransferGb": 1}
    rows = await ledger(pool, "c1")
    assert {d: (r["state"], r["quantity"], r["record_id"]) for d, r in rows.items()} == {
        d: ("accepted", held[d].quantity, held[d].record_id) for d in held
    }
    # and the fractions carry: 0.5 of each
    assert {d: str(r["carry_out"]) for d, r in rows.items()} == {
        "CapacityGbHours": "0.50",
        "DataTransferGb": "0.5",
    }
    assert outcome.marketplace_calls == 1


async def test_an_idle_aws_customer_gets_quantity_zero_records(biller: Biller, pool: Any, stack: Any) -> None:
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "idle"))
    await biller.bill(message("idle"))
    assert sorted((r.dimension, r.quantity) for r in stack.metering.accepted()) == [
        ("CapacityGbHours", 0),
        ("DataTransferGb", 0),
    ]


async def test_redelivered_message_makes_no_marketplace_call(biller: Biller, pool: Any, stack: Any) -> None:
    # Given a customer-hour already billed
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "7")
    msg = message("c1")
    await biller.bill(msg)
    calls = stack.metering.calls
    # When the same message is delivered again, and another run's message for the same hour arrives
    again = await biller.bill(msg)
    other_run = await biller.bill(message("c1"))
    # Then neither calls the marketplace
    assert again.already_billed and other_run.already_billed
    assert stack.metering.calls == calls


async def test_crash_between_submit_and_record_resubmits_the_recorded_decision(
    pool: Any, stack: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a biller that dies after AWS accepted the records but before the ledger recorded the answer
    armed = [True]

    def killing(repo: Any) -> KillingLedger:
        return KillingLedger(repo, lambda step, customer: armed[0] and step == AFTER_ACCEPT)

    monkeypatch.setenv("BILLING_MARKETPLACE_ATTEMPTS", "2")
    stack.metering.clock = within_window
    runtime = Runtime(load_settings(), clock=clock, wrappers=Wrappers(repository=killing))
    await add_rates(pool)
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb"})
    biller = await runtime.biller()
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "5")
    with pytest.raises(Killed):
        await biller.bill(message("c1"))
    armed[0] = False
    first_ids = {r.dimension: r.record_id for r in stack.metering.accepted()}
    assert {r["state"] for r in (await ledger(pool, "c1")).values()} == {"submitted"}
    # and late usage arrives meanwhile (it must not change the recorded decision)
    await add_usage(pool, "c1", HOUR.start + timedelta(minutes=50), "capacity_gb_hours", "3")
    # When the message is redelivered after the dead invocation's lease ran out
    await pool.execute("UPDATE ledger SET lease_until = now() - interval '1 second'")
    await biller.bill(message("c1"))
    # Then the same records were resubmitted, AWS answered with the original ids, and nothing was added
    rows = await ledger(pool, "c1")
    assert {d: (r["state"], r["quantity"], r["record_id"]) for d, r in rows.items()} == {
        "CapacityGbHours": ("accepted", 5, first_ids["CapacityGbHours"]),
        "DataTransferGb": ("accepted", 0, first_ids["DataTransferGb"]),
    }
    assert len(stack.metering.accepted()) == 2
    await runtime.close()


async def test_two_deliveries_at_the_same_moment_bill_once(biller: Biller, pool: Any, stack: Any) -> None:
    # Given one message delivered twice at the same moment
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "4")
    msg = message("c1")
    # When both deliveries run concurrently
    results = await asyncio.gather(biller.bill(msg), biller.bill(msg))
    # Then exactly one marketplace call was made, and the other delivery waited for it and ended as
    # already billed (not failed: a failed twin spends a receive, and quick redeliveries dead-letter it)
    assert stack.metering.calls == 1
    assert sorted(r.already_billed for r in results) == [False, True]
    assert {r["state"] for r in (await ledger(pool, "c1")).values()} == {"accepted"}


async def test_unsubscribed_customer_is_rejected_and_not_retried(
    biller: Biller, pool: Any, stack: Any
) -> None:
    await add_aws_customer(pool, "gone")
    outcome = await biller.bill(message("gone"))
    assert outcome.count(LedgerState.REJECTED) == 2
    rows = await ledger(pool, "gone")
    assert {(r["state"], r["last_error"]) for r in rows.values()} == {("rejected", "CustomerNotSubscribed")}
    calls = stack.metering.calls
    assert (await biller.bill(message("gone"))).already_billed
    assert stack.metering.calls == calls


async def test_a_throttled_call_is_retried_within_the_invocation(
    biller: Biller, pool: Any, stack: Any
) -> None:
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    stack.metering.faults.extend(["throttle"])
    outcome = await biller.bill(message("c1"))
    assert outcome.count(LedgerState.ACCEPTED) == 2
    assert stack.metering.calls == 2


async def test_throttles_are_retried_within_the_budget_without_spending_attempts(
    biller: Biller, pool: Any, stack: Any
) -> None:
    # Given AWS throttles five calls in a row (the adapter has 2 attempts for other faults)
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "3")
    stack.metering.faults.extend(["throttle"] * 5)
    # When the message is billed
    outcome = await biller.bill(message("c1"))
    # Then one invocation bills it: a throttle is "not processed", retried with jitter until the budget
    assert outcome.count(LedgerState.ACCEPTED) == 2
    assert stack.metering.calls == 6
    assert sorted((r.dimension, r.quantity) for r in stack.metering.accepted()) == [
        ("CapacityGbHours", 3),
        ("DataTransferGb", 0),
    ]


async def test_a_bill_throttled_for_its_whole_budget_goes_back_to_its_lane_not_to_the_dlq(
    biller: Biller, pool: Any, stack: Any
) -> None:
    # Given AWS throttles every call, and a budget that leaves half a second for throttle retries
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "3")
    stack.metering.fault_rate, stack.metering.fault_kinds = 1.0, ("throttle",)
    requeued: list[tuple[Any, Marketplace, float | None]] = []

    async def requeue(msg: Any, lane: Marketplace, retry_after: float | None) -> None:
        requeued.append((msg, lane, retry_after))

    biller.requeue, biller.budget_seconds = requeue, RESERVE_SECONDS + 0.5
    # When the message is billed, the delivery ends as handled, with a copy of the message on the AWS lane
    sent = message("c1")
    outcome = await biller.bill(sent)
    assert outcome.requeued and not outcome.entries
    assert requeued == [(sent, Marketplace.AWS, None)]
    # and the ledger records the refusals, its lease released for the copy
    rows = await ledger(pool, "c1")
    assert {r["state"] for r in rows.values()} == {"failed"}
    assert {r["lease_owner"] for r in rows.values()} == {None}
    # Then once the throttling stops, the copy bills the hour, once
    stack.metering.fault_rate = 0.0
    await biller.bill(sent)
    assert sorted((r.dimension, r.quantity) for r in stack.metering.accepted()) == [
        ("CapacityGbHours", 3),
        ("DataTransferGb", 0),
    ]


async def test_without_a_lane_to_go_back_to_a_throttled_bill_fails_its_item(
    biller: Biller, pool: Any, stack: Any
) -> None:
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    stack.metering.fault_rate, stack.metering.fault_kinds = 1.0, ("throttle",)
    biller.requeue, biller.budget_seconds = None, RESERVE_SECONDS + 0.2
    with pytest.raises(ThrottledError, match="ThrottlingException"):
        await biller.bill(message("c1"))


async def test_an_internal_error_leaves_the_submission_unconfirmed_until_resubmitted(
    biller: Biller, pool: Any, stack: Any
) -> None:
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    stack.metering.faults.extend(["internal"] * 5)
    with pytest.raises(MarketplaceUnavailableError):
        await biller.bill(message("c1"))
    # an InternalServiceError may have been recorded by AWS: the row stays "submitted", not "failed"
    assert {r["state"] for r in (await ledger(pool, "c1")).values()} == {"submitted"}
    await biller.bill(message("c1"))
    assert {r["state"] for r in (await ledger(pool, "c1")).values()} == {"accepted"}


async def test_unprocessed_records_are_sent_again(biller: Biller, pool: Any, stack: Any) -> None:
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    stack.metering.faults.append("unprocessed")
    outcome = await biller.bill(message("c1"))
    assert outcome.count(LedgerState.ACCEPTED) == 2
    assert stack.metering.calls == 2


async def test_another_quantity_already_metered_is_recorded_as_duplicate(
    biller: Biller, pool: Any, stack: Any
) -> None:
    # Given AWS already holds a record for the hour with another quantity (e.g. sent by an older system)
    identifier = await add_aws_customer(pool, "c1")
    stack.metering.subscribe(PRODUCT, identifier)
    from billing_local.emulators.aws_metering import Record

    key = (PRODUCT, identifier, "CapacityGbHours", HOUR.start)
    stack.metering.records[key] = Record(PRODUCT, identifier, "CapacityGbHours", HOUR.start, 99, "older")
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "3")
    # When the hour is billed
    await biller.bill(message("c1"))
    # Then the ledger says duplicate, with AWS's reason
    row = (await ledger(pool, "c1"))["CapacityGbHours"]
    assert (row["state"], row["quantity"]) == ("duplicate", 3)
    assert "DuplicateRecord" in row["last_error"]


async def test_unknown_customer_is_a_bad_message(biller: Biller) -> None:
    with pytest.raises(BadMessageError, match="unknown customer"):
        await biller.bill(message("nobody"))


async def test_a_message_for_an_hour_not_yet_ended_is_a_bad_message_and_bills_nothing(
    clock: Clock, biller: Biller, pool: Any, stack: Any
) -> None:
    # Given a customer with usage, and a message for the hour while it is still going on
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "7")
    clock.now = HOUR.end - timedelta(minutes=1)
    # When it is delivered, Then it is refused (the item fails until the dead-letter queue holds it)
    with pytest.raises(BadMessageError, match="has not ended yet"):
        await biller.bill(message("c1"))
    # and nothing was decided, claimed or sent
    assert await ledger(pool, "c1") == {}
    assert stack.metering.calls == 0


async def test_an_hour_that_ended_inside_the_settle_delay_is_billed(
    clock: Clock, biller: Biller, pool: Any, stack: Any
) -> None:
    # The settle delay is the schedule's courtesy to late usage, not a rule of the biller: usage later
    # still is billed with the next hour, so a message the minute after the hour ends is billed.
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "7")
    clock.now = HOUR.end + timedelta(minutes=1)
    await biller.bill(message("c1"))
    assert {r.dimension: r.quantity for r in stack.metering.accepted()}["CapacityGbHours"] == 7


async def test_a_bill_that_outlives_its_budget_fails_the_item_and_leaves_its_records_unsettled(
    biller: Biller, pool: Any, stack: Any
) -> None:
    # Given AWS taking 6 s to answer (less than botocore's read timeout) and a bill budget of 2 s
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "7")
    stack.metering.latency_s = 6.0
    biller.budget_seconds = 2.0
    # When the bill runs, Then it stops at its budget with a transient error (SQS redelivers the message)
    with pytest.raises(BudgetSpentError, match="budget"):
        await biller.bill(message("c1"))
    # and the records stay unsettled, never failed: the request may have reached AWS (it has: AWS
    # records it once its 6 s are up), so only a resubmission of the same records may settle them
    rows = await ledger(pool, "c1")
    assert rows and {r["state"] for r in rows.values()} <= {"pending", "submitted"}


async def test_an_hour_past_the_window_carries_its_usage_to_the_next_hour(
    clock: Clock, biller: Biller, pool: Any, stack: Any
) -> None:
    # Given an hour whose message is processed 7 hours later (AWS accepts 6)
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "4.5")
    late = HOUR.start + timedelta(hours=7)
    clock.now = late
    stack.metering.clock = lambda: late
    outcome = await biller.bill(message("c1"))
    # Then nothing is sent for it and its quantity is carried
    assert stack.metering.calls == 0
    assert outcome.count(LedgerState.EXPIRED) == 2
    # When the current hour is billed
    now_hour = HOUR.shifted(6)
    await add_usage(pool, "c1", now_hour.start, "capacity_gb_hours", "1")
    biller.lookback_hours = 24
    await biller.bill(message("c1", now_hour))
    # Then it carries the 4.5 + 1 units: 5 billed, 0.5 carried
    assert [
        (r.dimension, r.quantity) for r in stack.metering.accepted() if r.dimension == "CapacityGbHours"
    ] == [("CapacityGbHours", 5)]


async def test_decided_hour_past_the_window_returns_its_quantity_to_the_carry(
    clock: Clock, biller: Biller, pool: Any, stack: Any
) -> None:
    # Given an hour decided and throttled, whose redelivery comes after the window closed
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "6")
    throttle_every_call(stack, biller)
    with pytest.raises(MarketplaceUnavailableError):
        await biller.bill(message("c1"))
    stack.metering.fault_rate = 0.0
    late = HOUR.start + timedelta(hours=7)
    clock.now = late
    stack.metering.clock = lambda: late
    await biller.bill(message("c1"))
    rows = await ledger(pool, "c1")
    assert rows["CapacityGbHours"]["state"] == "expired"
    carry = await pool.fetchval(
        "SELECT carry FROM balances WHERE customer_id = 'c1' AND dimension = 'CapacityGbHours'"
    )
    assert carry == 6
    # When the next hour is billed, the 6 units go with it
    await biller.bill(message("c1", HOUR.shifted(6)))
    assert [r.quantity for r in stack.metering.accepted() if r.dimension == "CapacityGbHours"] == [6]


async def test_a_failed_row_without_a_refusal_on_record_is_not_carried_past_the_window(
    clock: Clock, biller: Biller, pool: Any, stack: Any
) -> None:
    # Given an hour whose submission ended 'failed' with no refusal on record (as a release before migration
    # 0004 left it: it also took a reset after sending for 'failed'), redelivered after the window
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "6")
    throttle_every_call(stack, biller)
    with pytest.raises(MarketplaceUnavailableError):
        await biller.bill(message("c1"))
    stack.metering.fault_rate = 0.0
    await pool.execute("UPDATE ledger SET refused_attempts = 0 WHERE customer_id = 'c1'")
    late = HOUR.start + timedelta(hours=7)
    clock.now = late
    stack.metering.clock = lambda: late
    # When it is redelivered after the window closed
    await biller.bill(message("c1"))
    # Then the hour is left for an operator (AWS may hold it), its quantity not carried to a later hour
    rows = await ledger(pool, "c1")
    assert rows["CapacityGbHours"]["state"] == "rejected"
    assert "the marketplace may have received" in rows["CapacityGbHours"]["last_error"]
    carry = await pool.fetchval(
        "SELECT carry FROM balances WHERE customer_id = 'c1' AND dimension = 'CapacityGbHours'"
    )
    assert carry == 0


async def test_refused_attempts_are_counted_so_a_refused_hour_still_expires(
    biller: Biller, pool: Any, stack: Any
) -> None:
    # Given an hour throttled on its first delivery and again on a second one
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "6")
    throttle_every_call(stack, biller)
    for _ in range(2):
        with pytest.raises(MarketplaceUnavailableError):
            await biller.bill(message("c1"))
    # Then both attempts are on record as refused
    rows = await ledger(pool, "c1")
    assert {(r["attempts"], r["refused_attempts"]) for r in rows.values()} == {(2, 2)}


async def test_an_hour_aws_refuses_as_out_of_bounds_before_our_clock_says_so_is_carried(
    biller: Biller, pool: Any, stack: Any
) -> None:
    # Given AWS's clock past the hour's 6-hour window while the biller's still says it is inside
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "3")
    stack.metering.clock = lambda: HOUR.start + timedelta(hours=7)
    # When the hour is billed
    outcome = await biller.bill(message("c1"))
    # Then one call is made and refused (TimestampOutOfBoundsException is not retried), nothing is
    # accepted, and the hour is settled as expired with its quantity carried
    assert stack.metering.calls == 1
    assert stack.metering.accepted() == []
    assert outcome.count(LedgerState.EXPIRED) == 2
    assert (
        await pool.fetchval(
            "SELECT carry FROM balances WHERE customer_id = 'c1' AND dimension = 'CapacityGbHours'"
        )
        == 3
    )


def test_run_ids_do_not_affect_idempotency() -> None:
    assert (
        message("c", run_id=uuid.UUID(int=1)).billing_period
        == message("c", run_id=uuid.UUID(int=2)).billing_period
    )


async def test_each_retry_log_line_names_the_customer_hour_and_marketplace(
    runtime: Runtime, biller: Biller, pool: Any, stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from billing.entrypoints import biller as entrypoint

    # Given AWS throttles the first BatchMeterUsage call of a customer's hour
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    stack.metering.faults.append("throttle")
    from testkit import captured_logs

    stream = captured_logs(monkeypatch, entrypoint.logger)
    # When its message is billed (as the Lambda handler and the local runner bill it)
    body = message("c1").model_dump_json()
    await entrypoint.bill_body(runtime, body, "msg-1")
    # Then the retry's log line says whose hour, on which marketplace, and which call is retried
    logs = [json.loads(line) for line in stream.getvalue().splitlines()]
    (retry,) = [entry for entry in logs if entry["message"] == "retrying after a transient error"]
    assert {k: retry.get(k) for k in ("customer_id", "billing_hour", "marketplace", "retrying")} == {
        "customer_id": "c1",
        "billing_hour": HOUR.isoformat(),
        "marketplace": "aws",
        "retrying": "BatchMeterUsage",
    }
    assert retry["message_id"] == "msg-1"
