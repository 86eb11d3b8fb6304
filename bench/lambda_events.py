"""Lambda's side of an invocation, without importing the local stack: the context and an SQS event."""

from __future__ import annotations

from typing import Any

from billing_local.lambda_shapes import LambdaContext, sqs_record

__all__ = ["LambdaContext", "customer_id", "lambda_event"]


def customer_id(i: int) -> str:
    return f"cust-{i:06d}"


def lambda_event(body: str, queue: str = "billing-queue") -> dict[str, Any]:
    """A one-record SQS event, shaped like Lambda's SQS poller hands it over (BatchSize 1)."""
    return {"Records": [sqs_record(body, queue)]}
