"""Helpers the tests share: explicit customers, rates and usage, and billing messages."""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from billing.domain.messages import BillMessageV1
from billing.domain.model import Period

PRODUCT = "prod-test-0001"
HOUR = Period(datetime(2026, 11, 26, 13, tzinfo=UTC))
RATES = (
    ("aws", "capacity_gb_hours", "CapacityGbHours", Decimal(1)),
    ("aws", "data_transfer_gb", "DataTransferGb", Decimal("0.5")),
)


async def add_rates(pool: asyncpg.Pool, rates: tuple[tuple[str, str, str, Decimal], ...] = RATES) -> None:
    await pool.executemany(
        "INSERT INTO rate_card (marketplace, metric, dimension, factor) VALUES ($1, $2, $3, $4)", rates
    )


async def add_aws_customer(
    pool: asyncpg.Pool,
    customer_id: str,
    active_from: datetime | None = None,
    active_until: datetime | None = None,
    status: str = "active",
) -> str:
    """An AWS customer; returns its CustomerIdentifier."""
    identifier = f"aws-{customer_id}"
    await pool.execute(
        """INSERT INTO customers (id, marketplace, status, active_from, active_until, aws_customer_identifier,
                                  aws_product_code) VALUES ($1, 'aws', $2, $3, $4, $5, $6)""",
        customer_id,
        status,
        active_from or datetime(2026, 1, 1, tzinfo=UTC),
        active_until,
        identifier,
        PRODUCT,
    )
    return identifier


async def add_usage(
    pool: asyncpg.Pool, customer_id: str, at: datetime, metric: str, quantity: str, cluster: str = "c1"
) -> None:
    await pool.execute(
        "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity) VALUES ($1, $2, $3, $4, $5)",
        at,
        customer_id,
        cluster,
        metric,
        Decimal(quantity),
    )


def message(customer_id: str, period: Period = HOUR, run_id: uuid.UUID | None = None) -> BillMessageV1:
    return BillMessageV1(customer_id=customer_id, period=period.start, run_id=run_id or uuid.uuid4())


def within_window(period: Period = HOUR) -> datetime:
    """A moment when the marketplaces still accept the hour (20 minutes after it ended)."""
    return period.end + timedelta(minutes=20)


async def ledger(pool: asyncpg.Pool, customer_id: str, period: Period = HOUR) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch(
        "SELECT * FROM ledger WHERE customer_id = $1 AND period = $2 ORDER BY dimension",
        customer_id,
        period.start,
    )
    return {r["dimension"]: r for r in rows}


@dataclass
class Secrets:
    """Secrets Manager on moto's server, and the SecretId of every GetSecretValue sent to it."""

    client: Any
    reads: list[str]

    def create(self, value: str) -> str:
        """A new secret holding ``value``; returns its ARN."""
        created = self.client.create_secret(Name=f"billing/test-{uuid.uuid4().hex[:8]}", SecretString=value)
        arn: str = created["ARN"]
        return arn


def lambda_records(queue_url: str) -> list[dict[str, Any]]:
    """Every message of the queue (received, not deleted) as Lambda's SQS poller hands it over."""
    import boto3

    from billing_local.lambda_shapes import sqs_record_of

    sqs = boto3.client("sqs")
    records = []
    while got := sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, AttributeNames=["All"], MessageAttributeNames=["All"]
    ).get("Messages", []):
        records += [sqs_record_of(m, queue_url) for m in got]
    return records


def throttle_every_call(stack: Any, biller: Any, left_s: float = 0.3) -> None:
    """AWS throttles every call (until ``stack.metering.fault_rate = 0``), and the bill's budget leaves
    ``left_s`` seconds for throttle retries and no lane to put the message back on: the bill fails with
    ThrottledError, its records FAILED with a refusal on record, as a bill throttled for its whole budget."""
    from billing.budget import RESERVE_SECONDS

    stack.metering.fault_rate, stack.metering.fault_kinds = 1.0, ("throttle",)
    biller.requeue, biller.budget_seconds = None, RESERVE_SECONDS + left_s


def captured_logs(monkeypatch: Any, logger: Any) -> io.StringIO:
    """What the Powertools ``logger`` writes from now on, at INFO.

    The handler keeps the stream it was created with, so it is swapped for one the test reads. Loggers of
    one service share a stdlib logger, whose level the last one built sets: one built under the fault
    suite's POWERTOOLS_LOG_LEVEL=ERROR would silence INFO and WARNING lines for later tests.
    """
    stream = io.StringIO()
    monkeypatch.setattr(logger.registered_handler, "stream", stream)
    monkeypatch.setattr(logger._logger, "level", logging.INFO)  # restored after the test
    logging.getLogger().manager._clear_cache()  # isEnabledFor caches per level
    return stream
