"""SqsQueue against a scripted client: partial batch failures are resent, never dropped."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from billing.adapters.sqs import SqsQueue
from billing.domain.errors import PermanentError, TransientError
from billing.domain.messages import BillMessageV1


def messages(n: int) -> list[BillMessageV1]:
    run = uuid.uuid4()
    return [
        BillMessageV1(customer_id=f"c{i}", period=datetime(2026, 11, 26, 13, tzinfo=UTC), run_id=run)
        for i in range(n)
    ]


class ScriptedSqs:
    """Answers SendMessageBatch like SQS does: per-entry Successful/Failed, as scripted per call."""

    def __init__(self, fail_ids_per_call: list[set[str]], sender_fault: bool = False) -> None:
        self.script = fail_ids_per_call
        self.sender_fault = sender_fault
        self.delivered: list[str] = []
        self.calls: list[list[str]] = []

    async def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        fail = self.script.pop(0) if self.script else set()
        self.calls.append([e["Id"] for e in Entries])
        ok = [e for e in Entries if e["Id"] not in fail]
        self.delivered += [e["MessageBody"] for e in ok]
        return {
            "Successful": [
                {"Id": e["Id"], "MessageId": str(uuid.uuid4()), "MD5OfMessageBody": ""} for e in ok
            ],
            "Failed": [
                {"Id": i, "SenderFault": self.sender_fault, "Code": "InternalError"} for i in sorted(fail)
            ],
        }


async def test_entries_a_batch_reports_failed_are_sent_again() -> None:
    client = ScriptedSqs([{"3", "7"}])
    batch = messages(10)
    sent = await SqsQueue(client, "q").send(batch)
    assert sent == 10
    assert sorted(client.delivered) == sorted(m.to_body() for m in batch)
    assert client.calls[1] == ["3", "7"]


async def test_batches_hold_ten_entries_at_most() -> None:
    client = ScriptedSqs([])
    await SqsQueue(client, "q", in_flight=3).send(messages(25))
    assert sorted(len(c) for c in client.calls) == [5, 10, 10]
    assert len(client.delivered) == 25


async def test_entries_that_keep_failing_raise_instead_of_being_dropped() -> None:
    client = ScriptedSqs([{"0"}] * 10)
    with pytest.raises(TransientError, match="kept failing"):
        await SqsQueue(client, "q", attempts=3).send(messages(1))


async def test_a_sender_fault_is_permanent() -> None:
    client = ScriptedSqs([{"0"}], sender_fault=True)
    with pytest.raises(PermanentError, match="malformed"):
        await SqsQueue(client, "q").send(messages(2))
