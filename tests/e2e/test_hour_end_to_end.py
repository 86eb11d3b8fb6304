"""A whole hour through the local runner: embedded PostgreSQL, moto's SQS, the three emulators.

The marketplaces are the project's HTTP doubles of AWS BatchMeterUsage, Google Service Control and
the Azure metered billing API, each following its documented deduplication and limits.

Nothing here reads the wall clock: the biller, the dispatcher and the emulators read fixed instants,
so the tests bill the same hour with the same windows whatever minute they run at.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import boto3
import pytest

from billing.domain.model import Period
from billing_local.local_run import fix_clocks, run_demo, run_hour, seed_database, subscribe_all
from billing_local.stack import LocalStack, environment, local_stack

pytestmark = pytest.mark.e2e
# the scheduled rule's event for HOUR (five minutes past the settle delay), and the clock it runs at
NOW = datetime(2026, 11, 26, 14, 20, tzinfo=UTC)
HOUR = Period.last_complete_before(NOW, timedelta(minutes=15))


def clock() -> datetime:
    return NOW


@pytest.fixture
def local(database_url: str) -> Iterator[LocalStack]:
    with local_stack(database_url) as stack, environment({**stack.env, "POWERTOOLS_LOG_LEVEL": "WARNING"}):
        asyncio.run(seed_database(database_url, 60, 3, 11, HOUR, ("aws", "gcp", "azure")))
        asyncio.run(subscribe_all(stack))
        fix_clocks(stack, NOW)
        yield stack


async def _ledger(dsn: str, hour: Period = HOUR) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT l.*, c.marketplace, c.aws_product_code, c.aws_customer_identifier,"
            " c.gcp_usage_reporting_id,"
            " c.azure_resource_id"
            " FROM ledger l JOIN customers c ON c.id = l.customer_id WHERE period = $1",
            hour.start,
        )
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def _held(stack: LocalStack) -> Counter[tuple[str, str, str]]:
    """(marketplace, customer key, dimension) -> how many records the marketplace holds for the hour."""
    held: Counter[tuple[str, str, str]] = Counter()
    for r in stack.metering.accepted():
        held["aws", r.customer, r.dimension] += 1
    for g in stack.gcp.records.values():
        held["gcp", g.consumer_id, g.metric.rsplit("/", 1)[-1]] += 1
    for (resource, dimension, _), _event in stack.azure.accepted.items():
        held["azure", resource, dimension] += 1
    return held


def _states(rows: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """marketplace -> ledger state -> records."""
    states: dict[str, Counter[str]] = {}
    for r in rows:
        states.setdefault(r["marketplace"], Counter())[r["state"]] += 1
    return states


def _expected_states(rows: list[dict[str, Any]], stack: LocalStack) -> dict[str, Counter[str]]:
    """What each record must end as: rejected for an AWS customer the marketplace does not know as
    subscribed (subscribe_all leaves one in fifty out), skipped for a zero quantity Azure is never sent
    (it refuses 0), accepted otherwise."""
    expected: dict[str, Counter[str]] = {}
    for r in rows:
        known = stack.metering.subscriptions.get(r["aws_product_code"], set())
        if r["marketplace"] == "aws" and r["aws_customer_identifier"] not in known:
            state = "rejected"
        elif r["marketplace"] == "azure" and r["quantity"] == 0:
            state = "skipped"
        else:
            state = "accepted"
        expected.setdefault(r["marketplace"], Counter())[state] += 1
    return expected


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    ident = {
        "aws": row["aws_customer_identifier"],
        "gcp": row["gcp_usage_reporting_id"],
        "azure": (row["azure_resource_id"] or "").lower(),
    }[row["marketplace"]]
    return row["marketplace"], ident, row["dimension"]


def test_every_customer_and_dimension_is_billed_exactly_once(local: LocalStack) -> None:
    # When the scheduled event for the hour is dispatched and the queue drained
    result = asyncio.run(run_hour({"time": NOW.isoformat()}, concurrency=8, clock=clock))
    # Then every customer is billed and no message is left anywhere
    assert result.report.customers == 60 and result.report.unbilled == []
    rows = asyncio.run(_ledger(local.database_url))
    assert len({(r["customer_id"], r["dimension"]) for r in rows}) == len(rows) == 60 * 3
    # and every record of every marketplace is in the state its customer and quantity call for: nothing
    # expired, failed or left unsettled (comparing accepted rows alone passed with every Google record
    # expired), and the report counts the same
    assert _states(rows) == _expected_states(rows, local)
    assert {mp: dict(c) for mp, c in _states(rows).items()} == result.report.states
    assert all(result.report.quantities[mp].expired == 0 for mp in ("aws", "gcp", "azure"))
    # and the marketplaces hold exactly one record per billed (customer, dimension), of the ledger's quantity
    held = _held(local)
    billed = {_key(r): r for r in rows if r["state"] == "accepted"}
    assert set(held) == set(billed)
    assert set(held.values()) == {1}
    # zero quantities: sent to AWS and GCP, never to Azure
    assert all(r["quantity"] > 0 for r in rows if r["marketplace"] == "azure" and r["state"] == "accepted")
    assert {r["state"] for r in rows if r["marketplace"] == "azure" and r["quantity"] == 0} <= {"skipped"}
    assert any(r["quantity"] == 0 for r in rows if r["marketplace"] == "aws" and r["state"] == "accepted")


def test_running_the_same_hour_again_submits_nothing(local: LocalStack) -> None:
    asyncio.run(run_hour({"time": NOW.isoformat()}, concurrency=8, clock=clock))
    held = _held(local)
    again = asyncio.run(run_hour({"period": HOUR.isoformat()}, concurrency=8, clock=clock))
    assert again.dispatch.already_dispatched
    assert again.stats.invocations == 0
    assert _held(local) == held


def test_a_message_delivered_twice_submits_nothing_new(local: LocalStack) -> None:
    first = asyncio.run(run_hour({"time": NOW.isoformat()}, concurrency=8, clock=clock))
    held, aws_calls = _held(local), local.metering.calls
    # Given every customer's message is delivered once more (SQS's at-least-once delivery)
    sqs = boto3.client("sqs")
    for customer in [f"cust-{i:06d}" for i in range(60)]:
        body = {
            "version": 1,
            "customer_id": customer,
            "period": HOUR.isoformat(),
            "run_id": str(first.dispatch.run_id),
        }
        sqs.send_message(QueueUrl=local.queue_url, MessageBody=json.dumps(body))
    # When they are drained
    again = asyncio.run(run_hour({"period": HOUR.isoformat()}, concurrency=8, clock=clock))
    # Then every one was consumed, found the hour billed, and made no marketplace call
    assert again.stats.invocations == 60
    assert all(o.already_billed for o in again.stats.outcomes)
    assert _held(local) == held and local.metering.calls == aws_calls


def test_an_hour_whose_messages_were_lost_is_finished_by_resending_the_unbilled(local: LocalStack) -> None:
    # Given an hour dispatched, then its queue purged before anything was billed
    from billing.bootstrap import Runtime
    from billing.config import load_settings

    async def dispatch_only() -> None:
        runtime = Runtime(load_settings(), clock=clock)
        try:
            await runtime.dispatch({"period": HOUR.isoformat()})
        finally:
            await runtime.close()

    asyncio.run(dispatch_only())
    boto3.client("sqs").purge_queue(QueueUrl=local.queue_url)
    # When the hour is run again, plainly: nothing is sent, every customer stays unbilled
    plain = asyncio.run(run_hour({"period": HOUR.isoformat()}, concurrency=8, clock=clock))
    assert plain.dispatch.already_dispatched and plain.stats.invocations == 0
    assert len(plain.report.unbilled) == 60
    # Then with resend_unbilled (`billing run --resend-unbilled`): every customer is billed, once
    again = asyncio.run(
        run_hour({"period": HOUR.isoformat(), "resend_unbilled": True}, concurrency=8, clock=clock)
    )
    assert again.dispatch.resent == 60 and again.report.unbilled == []
    assert set(_held(local).values()) == {1}


@pytest.mark.parametrize("minute", [5, 35])
def test_the_demo_bills_an_hour_every_marketplace_still_accepts(database_url: str, minute: int) -> None:
    # Given the demo started at :05 (the scheduled rule's hour is then two hours old: Google's window,
    # one hour after the hour, has closed) or at :35
    now = datetime(2026, 11, 26, 15, minute, 30, tzinfo=UTC)
    with local_stack(database_url) as stack, environment({**stack.env, "POWERTOOLS_LOG_LEVEL": "WARNING"}):
        # When the demo runs as of that instant
        demo = run_demo(stack, 30, 5, ("aws", "gcp", "azure"), now, concurrency=8)
        rows = asyncio.run(_ledger(stack.database_url, demo.hour))
        expected = _expected_states(rows, stack)
    # Then it billed the hour that just ended, and every marketplace took its records: none expired
    assert demo.hour == Period(datetime(2026, 11, 26, 14, tzinfo=UTC))
    assert _states(rows) == expected and expected["gcp"]["accepted"] > 0
    assert {mp: dict(c) for mp, c in expected.items()} == demo.first.report.states
    assert all(q.expired == 0 for q in demo.first.report.quantities.values())
    assert demo.held["gcp"] == expected["gcp"]["accepted"]
    # and the same hour again changed nothing
    assert demo.again.dispatch.already_dispatched and demo.held_again == demo.held
