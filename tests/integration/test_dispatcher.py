"""The dispatcher against a real PostgreSQL and moto's SQS server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aioboto3
import pytest

from billing.adapters.postgres import PostgresDispatchRepository
from billing.adapters.sqs import SqsQueue
from billing.domain.messages import parse_message
from billing.services.dispatch import dispatch
from testkit import HOUR, add_aws_customer


@pytest.fixture
async def sqs(stack: Any) -> AsyncIterator[Any]:
    async with aioboto3.Session().client("sqs") as client:
        yield client


async def drain_bodies(sqs: Any, url: str) -> list[str]:
    bodies: list[str] = []
    while got := (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)).get("Messages", []):
        bodies += [m["Body"] for m in got]
    return bodies


async def test_one_valid_message_per_billable_customer_across_pages(pool: Any, stack: Any, sqs: Any) -> None:
    # Given 57 active customers, one not yet active and one cancelled before the hour
    for i in range(57):
        await add_aws_customer(pool, f"c{i:03d}")
    await add_aws_customer(pool, "future", active_from=HOUR.end)
    await add_aws_customer(pool, "gone", active_from=HOUR.start - timedelta(days=9), active_until=HOUR.start)
    # When the hour is dispatched with pages of 10
    result = await dispatch(
        HOUR, PostgresDispatchRepository(pool), SqsQueue(sqs, stack.queues.url), page_size=10
    )
    # Then each active customer got exactly one valid message for that hour and run
    messages = [parse_message(b) for b in await drain_bodies(sqs, stack.queues.url)]
    assert sorted(m.customer_id for m in messages) == [f"c{i:03d}" for i in range(57)]
    assert {(m.billing_period, m.run_id) for m in messages} == {(HOUR, result.run_id)}
    assert result.dispatched == 57


async def test_a_second_trigger_creates_no_second_run_and_sends_nothing(
    pool: Any, stack: Any, sqs: Any
) -> None:
    for i in range(12):
        await add_aws_customer(pool, f"c{i:03d}")
    repo, queue = PostgresDispatchRepository(pool), SqsQueue(sqs, stack.queues.url)
    first = await dispatch(HOUR, repo, queue)
    second = await dispatch(HOUR, repo, queue)
    assert (second.run_id, second.already_dispatched) == (first.run_id, True)
    assert len(await drain_bodies(sqs, stack.queues.url)) == 12
    assert await pool.fetchval("SELECT count(*) FROM billing_runs") == 1


class Killed(Exception):
    """The dispatcher's process dying."""


class DiesAfter:
    """An SQS client that dies (like a killed dispatcher) after ``calls`` SendMessageBatch calls."""

    def __init__(self, client: Any, calls: int) -> None:
        self._client, self._left = client, calls

    async def send_message_batch(self, **kwargs: Any) -> Any:
        if self._left == 0:
            raise Killed("dispatcher killed")
        self._left -= 1
        return await self._client.send_message_batch(**kwargs)


async def test_a_dispatcher_killed_half_way_is_completed_by_the_next_trigger(
    pool: Any, stack: Any, sqs: Any
) -> None:
    # Given 45 customers and a dispatcher killed after sending 2 batches (20 messages)
    for i in range(45):
        await add_aws_customer(pool, f"c{i:03d}")
    repo = PostgresDispatchRepository(pool)
    with pytest.raises(Killed):
        await dispatch(HOUR, repo, SqsQueue(DiesAfter(sqs, 2), stack.queues.url, in_flight=1), page_size=20)
    # When the schedule retries
    retry = await dispatch(HOUR, repo, SqsQueue(sqs, stack.queues.url))
    # Then every customer has a message (some twice: the biller is idempotent) and there is still one run
    bodies = [parse_message(b) for b in await drain_bodies(sqs, stack.queues.url)]
    assert {m.customer_id for m in bodies} == {f"c{i:03d}" for i in range(45)}
    assert {m.run_id for m in bodies} == {retry.run_id}
    assert await pool.fetchval("SELECT count(*) FROM billing_runs") == 1


async def test_customers_fully_billed_are_not_dispatched_again(pool: Any, stack: Any, sqs: Any) -> None:
    # Given an interrupted run in which c0 was billed and c1 was decided but not confirmed
    for c in ("c0", "c1", "c2"):
        await add_aws_customer(pool, c)
    run_id = await pool.fetchval("INSERT INTO billing_runs (period) VALUES ($1) RETURNING id", HOUR.start)
    for customer, state in (("c0", "accepted"), ("c1", "submitted")):
        await pool.execute(
            "INSERT INTO ledger (customer_id, period, dimension, quantity, state, rated, carry_in, carry_out,"
            " run_id)"
            " VALUES ($1, $2, 'D', 1, $3, 1, 0, 0, $4)",
            customer,
            HOUR.start,
            state,
            run_id,
        )
    await dispatch(HOUR, PostgresDispatchRepository(pool), SqsQueue(sqs, stack.queues.url))
    assert sorted(json.loads(b)["customer_id"] for b in await drain_bodies(sqs, stack.queues.url)) == [
        "c1",
        "c2",
    ]


async def test_resend_unbilled_sends_again_only_for_customers_not_finished(
    pool: Any, stack: Any, sqs: Any
) -> None:
    # Given an hour dispatched for three customers, c0 billed since, and the queue then purged
    for c in ("c0", "c1", "c2"):
        await add_aws_customer(pool, c)
    repo, queue = PostgresDispatchRepository(pool), SqsQueue(sqs, stack.queues.url)
    first = await dispatch(HOUR, repo, queue)
    await drain_bodies(sqs, stack.queues.url)
    await pool.execute(
        "INSERT INTO ledger (customer_id, period, dimension, quantity, state, rated, carry_in, carry_out,"
        " run_id) VALUES ('c0', $1, 'D', 1, 'accepted', 1, 0, 0, $2)",
        HOUR.start,
        first.run_id,
    )
    # When a plain trigger, then an operator's resend, arrive for the hour
    plain = await dispatch(HOUR, repo, queue)
    plain_bodies = await drain_bodies(sqs, stack.queues.url)
    resend = await dispatch(HOUR, repo, queue, resend_unbilled=True)
    # Then the plain trigger sends nothing, and the resend sends the two unfinished customers again,
    # in the same run, leaving the run's dispatched count as it was
    assert (plain.already_dispatched, plain.resent, plain_bodies) == (True, 0, [])
    messages = [parse_message(b) for b in await drain_bodies(sqs, stack.queues.url)]
    assert sorted(m.customer_id for m in messages) == ["c1", "c2"]
    assert {m.run_id for m in messages} == {first.run_id}
    assert (resend.already_dispatched, resend.resent, resend.dispatched) == (True, 2, 3)
    assert await pool.fetchval("SELECT dispatched FROM billing_runs") == 3
