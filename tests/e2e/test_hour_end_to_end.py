"""A whole hour through the local runner: embedded PostgreSQL, moto's SQS, the three emulators.

The marketplaces are the project's HTTP doubles of AWS BatchMeterUsage, Google Service Control and
the Azure metered billing API, each following its documented deduplication and limits.
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
from billing_local.cli import _seed, _subscribe_all, run_hour
from billing_local.stack import LocalStack, environment, local_stack

pytestmark = pytest.mark.e2e
NOW = datetime.now(UTC)
HOUR = Period.last_complete_before(NOW, timedelta(minutes=15))


@pytest.fixture
def local(database_url: str) -> Iterator[LocalStack]:
    with local_stack(database_url) as stack, environment({**stack.env, "POWERTOOLS_LOG_LEVEL": "WARNING"}):
        asyncio.run(_seed(database_url, 60, 3, 11, HOUR, ("aws", "gcp", "azure")))
        asyncio.run(_subscribe_all(stack))
        yield stack


async def _ledger(dsn: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT l.*, c.marketplace, c.aws_customer_identifier, c.gcp_usage_reporting_id,"
            " c.azure_resource_id"
            " FROM ledger l JOIN customers c ON c.id = l.customer_id WHERE period = $1",
            HOUR.start,
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


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    ident = {
        "aws": row["aws_customer_identifier"],
        "gcp": row["gcp_usage_reporting_id"],
        "azure": (row["azure_resource_id"] or "").lower(),
    }[row["marketplace"]]
    return row["marketplace"], ident, row["dimension"]


def test_every_customer_and_dimension_is_billed_exactly_once(local: LocalStack) -> None:
    # When the scheduled event for the hour is dispatched and the queue drained
    result = asyncio.run(run_hour({"time": NOW.isoformat()}, concurrency=8))
    # Then every customer is billed and no message is left anywhere
    assert result.report.customers == 60 and result.report.unbilled == []
    rows = asyncio.run(_ledger(local.database_url))
    assert len({(r["customer_id"], r["dimension"]) for r in rows}) == len(rows) == 60 * 3
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
    asyncio.run(run_hour({"time": NOW.isoformat()}, concurrency=8))
    held = _held(local)
    again = asyncio.run(run_hour({"period": HOUR.isoformat()}, concurrency=8))
    assert again.dispatch.already_dispatched
    assert again.stats.invocations == 0
    assert _held(local) == held


def test_a_message_delivered_twice_submits_nothing_new(local: LocalStack) -> None:
    first = asyncio.run(run_hour({"time": NOW.isoformat()}, concurrency=8))
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
    from billing_local import cli

    again = asyncio.run(cli.run_hour({"period": HOUR.isoformat()}, concurrency=8))
    # Then every one was consumed, found the hour billed, and made no marketplace call
    assert again.stats.invocations == 60
    assert all(o.already_billed for o in again.stats.outcomes)
    assert _held(local) == held and local.metering.calls == aws_calls


def test_an_hour_whose_messages_were_lost_is_finished_by_resending_the_unbilled(local: LocalStack) -> None:
    # Given an hour dispatched, then its queue purged before anything was billed
    from billing.bootstrap import Runtime
    from billing.config import load_settings

    async def dispatch_only() -> None:
        runtime = Runtime(load_settings())
        try:
            await runtime.dispatch({"period": HOUR.isoformat()})
        finally:
            await runtime.close()

    asyncio.run(dispatch_only())
    boto3.client("sqs").purge_queue(QueueUrl=local.queue_url)
    # When the hour is run again, plainly: nothing is sent, every customer stays unbilled
    plain = asyncio.run(run_hour({"period": HOUR.isoformat()}, concurrency=8))
    assert plain.dispatch.already_dispatched and plain.stats.invocations == 0
    assert len(plain.report.unbilled) == 60
    # Then with resend_unbilled (`billing run --resend-unbilled`): every customer is billed, once
    again = asyncio.run(run_hour({"period": HOUR.isoformat(), "resend_unbilled": True}, concurrency=8))
    assert again.dispatch.resent == 60 and again.report.unbilled == []
    assert set(_held(local).values()) == {1}
