"""Lambda's side of an invocation, without importing the local stack: the context and an SQS event."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any


def customer_id(i: int) -> str:
    return f"cust-{i:06d}"


class LambdaContext:
    """What Lambda passes as ``context`` (the APM agent reads the ARN and the request id)."""

    function_name = "billing-biller"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:billing-biller"
    memory_limit_in_mb = 512
    log_group_name = "/aws/lambda/billing-biller"
    log_stream_name = "2026/11/26/[$LATEST]0001"

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def lambda_event(body: str, queue: str = "billing-queue") -> dict[str, Any]:
    """A one-record SQS event, shaped like Lambda's SQS poller hands it over (BatchSize 1)."""
    now_ms = str(int(time.time() * 1000))
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": uuid.uuid4().hex,
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": now_ms,
                    "SenderId": "AIDAEXAMPLE",
                    "ApproximateFirstReceiveTimestamp": now_ms,
                },
                "messageAttributes": {},
                "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:us-east-1:123456789012:{queue}",
                "awsRegion": "us-east-1",
            }
        ]
    }
