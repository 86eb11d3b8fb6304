"""The biller's per-record code, shared by the Lambda handler and the local runner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import stamina.instrumentation
from aws_lambda_powertools import Logger

from billing.domain.errors import BadMessageError, PermanentError
from billing.domain.messages import parse_message

if TYPE_CHECKING:
    from stamina.instrumentation import RetryDetails

    from billing.bootstrap import Runtime
    from billing.domain.model import BillOutcome

logger = Logger()


def _log_retry(details: RetryDetails) -> None:
    logger.warning(
        "retrying after a transient error",
        extra={
            "retrying": details.name,
            "attempt": details.retry_num,
            "wait_s": round(details.wait_for, 3),
            "error": f"{type(details.caused_by).__name__}: {details.caused_by}",
        },
    )


# stamina's default hook logs a bare "stamina.retry_scheduled" through the root logger
stamina.instrumentation.set_on_retry_hooks([_log_retry])


async def bill_body(runtime: Runtime, body: str, message_id: str) -> BillOutcome:
    """Bill the customer-hour a message body names; raise to fail the item (SQS redelivers it)."""
    try:
        message = parse_message(body)
    except BadMessageError:
        logger.error(
            "malformed message: it fails until it lands in the dead-letter queue",
            extra={"message_id": message_id, "body_bytes": len(body)},
        )
        raise
    # per-call keys, not append_keys: the local runner bills many customers in one process at once
    keys = {
        "customer_id": message.customer_id,
        "billing_hour": message.billing_period.isoformat(),
        "run_id": str(message.run_id),
        "message_id": message_id,
    }
    biller = await runtime.biller()
    try:
        outcome = await biller.bill(message)
    except PermanentError as exc:
        logger.error(
            "permanent billing error", extra={**keys, "error": str(exc), "error_type": type(exc).__name__}
        )
        raise
    except Exception as exc:
        logger.warning(
            "billing failed; the message will be retried",
            extra={**keys, "error": str(exc), "error_type": type(exc).__name__},
        )
        raise
    logger.info("billed", extra={**keys, **summary(outcome)})
    return outcome


def summary(outcome: BillOutcome) -> dict[str, Any]:
    from billing.domain.model import LedgerState

    return {
        "marketplace": outcome.marketplace.value,
        "already_billed": outcome.already_billed,
        "marketplace_calls": outcome.marketplace_calls,
        **{state.value: outcome.count(state) for state in LedgerState if outcome.count(state)},
    }
