"""billing_local.moto_fixes: a ReceiveMessage and a DeleteMessageBatch cost the same at any queue depth,
and answer as moto 5.2.5 does.

moto's server runs in this process (the session's ``moto_url``, real HTTP, boto3 as the client), so
the work its SQS models do per call can be counted: the clock reads of a receive (moto's
``unix_time_millis``, ~10 µs each, two per queued message as shipped) and the messages a delete asks
whether they ever had its receipt handle. Counts, not timings: what grows with the depth is the work.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.sqs import models
from moto.sqs.models import Message, Queue

from billing_local import moto_fixes


@pytest.fixture
def sqs(moto_url: str) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(params=["shipped", "fixed"])
def variant(request: pytest.FixtureRequest, moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """moto's SQS as shipped, or with the fixes (the session's server applied them)."""
    if request.param == "shipped":
        as_shipped(monkeypatch)
    return str(request.param)


def as_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Queue, "messages", moto_fixes.SHIPPED["messages"])
    monkeypatch.setattr(Queue, "delete_message", moto_fixes.SHIPPED["delete_message"])
    monkeypatch.setattr(Message, "mark_received", moto_fixes.SHIPPED["mark_received"])


def queue_of(sqs: Any, depth: int, **attributes: str) -> str:
    url: str = sqs.create_queue(QueueName=f"depth-{uuid.uuid4().hex[:10]}", Attributes=attributes)["QueueUrl"]
    for start in range(0, depth, 10):
        sqs.send_message_batch(
            QueueUrl=url,
            Entries=[{"Id": str(i), "MessageBody": f"m{start + i}"} for i in range(min(10, depth - start))],
        )
    return url


@pytest.fixture
def clock_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    count = [0]
    read = models.unix_time_millis

    def counted(*args: Any) -> float:
        count[0] += 1
        return read(*args)

    monkeypatch.setattr(models, "unix_time_millis", counted)
    yield count


def clock_reads_per_receive(sqs: Any, depth: int, count: list[int]) -> int:
    url = queue_of(sqs, depth, VisibilityTimeout="60")
    count[0] = 0
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)["Messages"]
    assert len(got) == 10
    return count[0]


def test_moto_as_shipped_reads_the_clock_twice_per_queued_message_on_a_receive(
    sqs: Any, clock_reads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    as_shipped(monkeypatch)
    shallow, deep = (
        clock_reads_per_receive(sqs, 20, clock_reads),
        clock_reads_per_receive(sqs, 400, clock_reads),
    )
    # 380 more messages queued, 760 more clock reads: O(depth) per receive (the reason for the fix)
    assert deep - shallow == 2 * 380


def test_with_the_fix_a_receive_reads_the_clock_as_often_whatever_the_depth(
    sqs: Any, clock_reads: list[int]
) -> None:
    assert clock_reads_per_receive(sqs, 20, clock_reads) == clock_reads_per_receive(sqs, 400, clock_reads)


@pytest.fixture
def handle_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    count = [0]
    had = Message.had_receipt_handle

    def counted(self: Any, handle: str) -> bool:
        count[0] += 1
        return bool(had(self, handle))

    monkeypatch.setattr(Message, "had_receipt_handle", counted)
    yield count


def handle_checks_per_delete(sqs: Any, depth: int, count: list[int]) -> int:
    url = queue_of(sqs, depth, VisibilityTimeout="60")
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)["Messages"]
    count[0] = 0
    answer = sqs.delete_message_batch(
        QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)]
    )
    assert len(answer["Successful"]) == 10
    return count[0]


def test_moto_as_shipped_asks_every_queued_message_on_a_delete(
    sqs: Any, handle_checks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    as_shipped(monkeypatch)
    shallow, deep = (
        handle_checks_per_delete(sqs, 20, handle_checks),
        handle_checks_per_delete(sqs, 400, handle_checks),
    )
    assert deep - shallow >= 10 * 380  # at least one look at each queued message per delete


def test_with_the_fix_a_delete_asks_no_message_whatever_the_depth(sqs: Any, handle_checks: list[int]) -> None:
    assert handle_checks_per_delete(sqs, 20, handle_checks) == 0
    assert handle_checks_per_delete(sqs, 400, handle_checks) == 0


# -- the same answers as moto's ------------------------------------------------------------------------


def bodies(messages: list[dict[str, Any]]) -> list[str]:
    return sorted(m["Body"] for m in messages)


def receive(sqs: Any, url: str, wait: int = 0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait, AttributeNames=["All"]
    ).get("Messages", [])
    return got


def test_visibility_and_receive_counts(sqs: Any, variant: str) -> None:
    url = queue_of(sqs, 3, VisibilityTimeout="60")
    first = receive(sqs, url)
    assert bodies(first) == ["m0", "m1", "m2"]
    assert receive(sqs, url) == []  # in flight: hidden for the visibility timeout
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first[0]["ReceiptHandle"], VisibilityTimeout=0)
    again = receive(sqs, url, wait=2)  # visible again (a long poll: moto's clock is in milliseconds)
    assert bodies(again) == [first[0]["Body"]]
    assert again[0]["Attributes"]["ApproximateReceiveCount"] == "2"
    assert again[0]["ReceiptHandle"] != first[0]["ReceiptHandle"]


def test_delayed_messages_wait(sqs: Any, variant: str) -> None:
    url = queue_of(sqs, 0, VisibilityTimeout="60")
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=60)
    sqs.send_message(QueueUrl=url, MessageBody="now")
    assert bodies(receive(sqs, url)) == ["now"]


def test_deletes_by_current_and_old_receipt_handles(sqs: Any, variant: str) -> None:
    url = queue_of(sqs, 2, VisibilityTimeout="60")
    first = {m["Body"]: m["ReceiptHandle"] for m in receive(sqs, url)}
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first["m1"], VisibilityTimeout=0)
    second = receive(sqs, url, wait=2)
    assert bodies(second) == ["m1"]
    answer = sqs.delete_message_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "current", "ReceiptHandle": first["m0"]},
            {"Id": "old", "ReceiptHandle": first["m1"]},  # moto accepts a message's earlier handle
            {"Id": "unknown", "ReceiptHandle": "not-a-handle"},
        ],
    )
    assert sorted(e["Id"] for e in answer["Successful"]) == ["current", "old"]
    assert [(e["Id"], e["Code"]) for e in answer["Failed"]] == [("unknown", "ReceiptHandleIsInvalid")]
    sqs.delete_message(QueueUrl=url, ReceiptHandle=second[0]["ReceiptHandle"])  # deleted: ignored, as moto
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_redrive_to_the_dead_letter_queue(sqs: Any, variant: str) -> None:
    dlq = queue_of(sqs, 0)
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    url = queue_of(
        sqs,
        1,
        VisibilityTimeout="60",
        RedrivePolicy=json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "1"}),
    )
    (message,) = receive(sqs, url)
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
    assert receive(sqs, url, wait=2) == []  # received once = maxReceiveCount: moved, not delivered
    moved = receive(sqs, dlq)
    assert bodies(moved) == ["m0"]
    # the source queue's handle no longer deletes it (it is the dead-letter queue's now), as in moto
    with pytest.raises(sqs.exceptions.ReceiptHandleIsInvalid):
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
