"""Lambda's side of an invocation, as local runs, tests and benchmarks hand it to the real handlers: the
context object, and SQS event records shaped like Lambda's SQS poller delivers them. Light on purpose
(standard library only): the benchmarks' Lambda-like child processes import it."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"


@dataclass
class LambdaContext:
    """The context object Lambda's Python runtime (and so SAM's emulator) passes to the handler."""

    function_name: str
    function_version: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    aws_request_id: str
    log_group_name: str
    log_stream_name: str
    deadline_ms: int
    identity: Any = None
    client_context: Any = None

    def get_remaining_time_in_millis(self) -> int:
        return max(self.deadline_ms - int(time.time() * 1000), 0)

    @classmethod
    def of(
        cls, function_name: str = "billing-biller", request_id: str | None = None, timeout_s: int = 60
    ) -> LambdaContext:
        """A context for one invocation of ``function_name`` ($LATEST, 512 MB), ``timeout_s`` from now."""
        return cls(
            function_name=function_name,
            function_version="$LATEST",
            invoked_function_arn=f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{function_name}",
            memory_limit_in_mb=512,
            aws_request_id=request_id or str(uuid.uuid4()),
            log_group_name=f"/aws/lambda/{function_name}",
            log_stream_name="2026/11/26/[$LATEST]0001",
            deadline_ms=int(time.time() * 1000) + timeout_s * 1000,
        )


def sqs_record(
    body: str,
    queue: str = "billing-queue",
    message_id: str | None = None,
    receipt_handle: str | None = None,
    attributes: dict[str, str] | None = None,
    message_attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One record of an SQS event, as Lambda's SQS poller hands it over.

    ``message_attributes`` as SQS's ReceiveMessage answers them (``StringValue``, ``DataType``);
    without ``attributes``, those of a message sent now and received once.
    """
    now_ms = str(int(time.time() * 1000))
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": receipt_handle or uuid.uuid4().hex,
        "body": body,
        "attributes": attributes
        or {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": now_ms,
            "SenderId": "AIDAEXAMPLE",
            "ApproximateFirstReceiveTimestamp": now_ms,
        },
        "messageAttributes": {
            k: {"stringValue": v["StringValue"], "dataType": v["DataType"]}
            for k, v in (message_attributes or {}).items()
        },
        "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT_ID}:{queue}",
        "awsRegion": REGION,
    }


def sqs_record_of(message: dict[str, Any], queue_url: str) -> dict[str, Any]:
    """The record of a message SQS's ReceiveMessage returned (with its attributes) from ``queue_url``."""
    return sqs_record(
        message["Body"],
        queue=queue_url.rstrip("/").rsplit("/", 1)[-1],
        message_id=message["MessageId"],
        receipt_handle=message["ReceiptHandle"],
        attributes=message.get("Attributes"),
        message_attributes=message.get("MessageAttributes"),
    )
