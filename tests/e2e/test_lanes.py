"""Lanes end to end: each marketplace's customers in its own queue, drained by its own consumers.

Embedded PostgreSQL, moto's SQS (one queue and dead-letter queue per lane, as template.yaml deploys
them) and the three marketplace emulators, with their quotas on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from typer.testing import CliRunner

from billing.domain.model import Period
from billing_local.cli import app
from billing_local.local_run import run_hour
from billing_local.local_run import seed_database as _seed
from billing_local.local_run import subscribe_all as _subscribe_all
from billing_local.stack import LocalStack, environment, local_stack

pytestmark = pytest.mark.e2e
NOW = datetime.now(UTC)
HOUR = Period.last_complete_before(NOW, timedelta(minutes=15))
QUOTA = 20  # calls a second, in every emulator and every lane's pace


@pytest.fixture
def lanes(database_url: str) -> Iterator[LocalStack]:
    quotas = {f"BILLING_{m.upper()}_QUOTA_PER_SECOND": str(QUOTA) for m in ("aws", "gcp", "azure")}
    with (
        local_stack(database_url, lanes=True) as stack,
        environment({**stack.env, **quotas, "POWERTOOLS_LOG_LEVEL": "WARNING"}),
    ):
        for quota in (stack.metering.quota, stack.gcp.quota, stack.azure.quota):
            quota.reset(rate=QUOTA)
        asyncio.run(_seed(database_url, 45, 1, 5, HOUR, ("aws", "gcp", "azure")))
        asyncio.run(_subscribe_all(stack))
        yield stack


def test_each_marketplace_bills_in_its_own_lane(lanes: LocalStack) -> None:
    # When an hour is dispatched and drained
    result = asyncio.run(run_hour({"time": NOW.isoformat()}, 9))
    # Then each lane's consumers billed only its own marketplace's customers, and every customer once
    assert set(result.lanes) == {"aws", "gcp", "azure"}
    for lane, stats in result.lanes.items():
        assert stats.outcomes, lane
        assert {o.marketplace.value for o in stats.outcomes} == {lane}
    billed = [o.customer_id for s in result.lanes.values() for o in s.outcomes]
    assert len(billed) == len(set(billed)) == result.dispatch.dispatched
    assert result.report.unbilled == []
    # and nothing is left in any lane's queue or dead-letter queue
    sqs = boto3.client("sqs", endpoint_url=lanes.moto_url, region_name="us-east-1")
    for queue, dlq in lanes.lanes.values():
        for url in (queue, dlq):
            attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
            assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"


def test_status_states_each_lanes_capacity_at_its_quota(lanes: LocalStack) -> None:
    # Given an hour billed
    asyncio.run(run_hour({"time": NOW.isoformat()}, 9))
    # When its status is asked for
    result = CliRunner().invoke(app, ["status", "--period", HOUR.isoformat(), "--json"])
    # Then each lane shows its customers an hour at the quota, this hour's customers and the margin
    doc = json.loads(result.stdout)
    aws = doc["lanes"]["aws"]
    assert aws["customers_per_hour"] == QUOTA * 3600 // aws["units_per_customer"]
    assert aws["customers_this_hour"] == doc["marketplaces"]["aws"]["customers"] > 0
    assert aws["margin"] == aws["customers_per_hour"] - aws["customers_this_hour"]


def test_redrive_moves_a_lanes_dead_letters_back_to_its_own_queue(lanes: LocalStack) -> None:
    # Given a message in the AWS lane's dead-letter queue
    sqs = boto3.client("sqs", endpoint_url=lanes.moto_url, region_name="us-east-1")
    (aws_queue, aws_dlq), (gcp_queue, _gcp_dlq) = lanes.lanes["aws"], lanes.lanes["gcp"]
    sqs.send_message(QueueUrl=aws_dlq, MessageBody='{"dead": "letter"}')
    # When the AWS lane is redriven
    result = CliRunner().invoke(app, ["redrive", "--lane", "aws", "--wait-seconds", "0"])
    # Then the message is back on the AWS lane's queue, and no other lane got it
    assert result.exit_code == 0, result.output
    assert _count(sqs, aws_queue) == 1
    assert _count(sqs, aws_dlq) == 0
    assert _count(sqs, gcp_queue) == 0


def _count(sqs: Any, url: str) -> int:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"])
