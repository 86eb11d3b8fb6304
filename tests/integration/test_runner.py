"""The local runner (billing_local.runner.drain) against moto's SQS server, with handlers that fail."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import pytest

from billing.collector import YOUNG_THRESHOLD
from billing.domain.model import BillOutcome, Marketplace
from billing_local.runner import Delivery, drain
from testkit import HOUR


@pytest.fixture
async def sqs(stack: Any) -> AsyncIterator[Any]:
    async with aioboto3.Session().client("sqs") as client:
        yield client


async def send(sqs: Any, url: str, bodies: list[str]) -> None:
    for start in range(0, len(bodies), 10):
        chunk = bodies[start : start + 10]
        await sqs.send_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(chunk)]
        )


def outcome(body: str) -> BillOutcome:
    return BillOutcome(body, HOUR, Marketplace.AWS)


async def test_a_handler_failure_is_redelivered_and_every_message_handled_once_it_succeeds(
    sqs: Any, stack: Any
) -> None:
    # Given 12 messages, and a handler that fails each one's first delivery: with an exception, or with
    # a CancelledError nothing asked for (as a library may leak one when its connection is cut)
    bodies = [f"m{i:02d}" for i in range(12)]
    await send(sqs, stack.queues.url, bodies)
    seen: Counter[str] = Counter()

    async def handle(delivery: Delivery) -> BillOutcome:
        seen[delivery.body] += 1
        if seen[delivery.body] == 1:
            if int(delivery.body[1:]) % 2:
                raise asyncio.CancelledError
            raise RuntimeError("transient")
        return outcome(delivery.body)

    # When the runner drains the queue with 4 consumers
    stats = await asyncio.wait_for(drain(sqs, stack.queues.url, handle, concurrency=4, retry_delay_s=1), 60)
    # Then every message failed once, was redelivered and handled, and the queue is empty
    assert (stats.failed, stats.succeeded) == (12, 12)
    assert sorted(o.customer_id for o in stats.outcomes) == bodies
    assert set(seen.values()) == {2}
    attrs = await sqs.get_queue_attributes(QueueUrl=stack.queues.url, AttributeNames=["All"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"
    assert attrs["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0"


async def test_a_message_that_keeps_failing_ends_in_the_dead_letter_queue(sqs: Any, stack: Any) -> None:
    # Given a poison message beside a good one
    await send(sqs, stack.queues.url, ["good", "poison"])

    async def handle(delivery: Delivery) -> BillOutcome:
        if delivery.body == "poison":
            raise ValueError("malformed")
        return outcome(delivery.body)

    # When the runner drains the queue
    stats = await asyncio.wait_for(drain(sqs, stack.queues.url, handle, concurrency=2, retry_delay_s=0), 60)
    # Then the good one is handled once, and the poison one fails maxReceiveCount times, then is moved
    assert [o.customer_id for o in stats.outcomes] == ["good"]
    assert stats.failed == stack.queues.settings.max_receive_count
    got = await sqs.receive_message(QueueUrl=stack.queues.dlq_url, MaxNumberOfMessages=10)
    assert [m["Body"] for m in got["Messages"]] == ["poison"]


async def test_messages_sent_right_after_a_drain_are_not_hidden_by_its_last_long_poll(
    sqs: Any, stack: Any
) -> None:
    # Given a drain of 3 messages with long polls of 3 s, that ends (the last delete finds the queue
    # empty) while its poller waits inside a ReceiveMessage
    await send(sqs, stack.queues.url, ["a", "b", "c"])

    async def handle(delivery: Delivery) -> BillOutcome:
        return outcome(delivery.body)

    first = await drain(sqs, stack.queues.url, handle, concurrency=3, wait_time_s=3)
    # When 5 messages are sent as soon as it returns, and drained again
    await send(sqs, stack.queues.url, ["d", "e", "f", "g", "h"])
    second = await asyncio.wait_for(drain(sqs, stack.queues.url, handle, concurrency=3, wait_time_s=3), 60)
    # Then each drain billed its own messages: none was taken by a ReceiveMessage left open at SQS (it
    # would hide them for the queue's 360 s visibility timeout)
    assert sorted(o.customer_id for o in first.outcomes) == ["a", "b", "c"]
    assert sorted(o.customer_id for o in second.outcomes) == ["d", "e", "f", "g", "h"]


async def test_the_runner_freezes_what_was_alive_when_it_started(sqs: Any, stack: Any) -> None:
    # Given a process with nothing frozen (the runner's start is its cold start)
    gc.unfreeze()
    gc.set_threshold(700, *gc.get_threshold()[1:])  # CPython's default
    assert gc.get_freeze_count() == 0

    async def handle(delivery: Delivery) -> BillOutcome:
        return outcome(delivery.body)

    # When the runner drains a queue
    await send(sqs, stack.queues.url, ["m00"])
    stats = await asyncio.wait_for(drain(sqs, stack.queues.url, handle, concurrency=1), 60)
    # Then what was alive at its start (modules, clients, pools) is out of the cyclic collector's reach
    assert stats.succeeded == 1
    assert gc.get_freeze_count() > 10_000
    # and its young collections run as rarely as in a Lambda environment
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
