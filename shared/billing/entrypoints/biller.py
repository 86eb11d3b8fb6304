"""The biller's per-record code, shared by the Lambda handler and the local runner."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import stamina.instrumentation
from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

from billing import log_context, tracing
from billing.domain.errors import BadMessageError, BudgetSpentError, PermanentError
from billing.domain.messages import parse_message
from billing.domain.model import LedgerState

if TYPE_CHECKING:
    from stamina.instrumentation import RetryDetails

    from billing.bootstrap import Runtime
    from billing.domain.model import BillOutcome
    from billing.services.bill import Biller

logger = Logger()
METRICS_NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "MarketplaceBilling")
_COUNTED = {
    LedgerState.ACCEPTED: "RecordsAccepted",
    LedgerState.DUPLICATE: "RecordsDuplicate",
    LedgerState.REJECTED: "RecordsRejected",
    LedgerState.FAILED: "RecordsFailed",
}


_BILL_KEYS = ("customer_id", "billing_hour", "run_id", "message_id")


def _log_retry(details: RetryDetails) -> None:
    # stamina names a retry_context block "<context block>": the bill's own keys say what is retried
    keys = dict(log_context.current())
    retrying = keys.pop("operation", details.name)
    logger.warning(
        "retrying after a transient error",
        extra={
            **keys,
            "retrying": retrying,
            "attempt": details.retry_num,
            "wait_s": round(details.wait_for, 3),
            "error": f"{type(details.caused_by).__name__}: {details.caused_by}",
            **tracing.correlation_ids(),
        },
    )


# stamina's default hook logs a bare "stamina.retry_scheduled" through the root logger
stamina.instrumentation.set_on_retry_hooks([_log_retry])


async def bill_body(
    runtime: Runtime, body: str, message_id: str, sent_timestamp_ms: int | None = None
) -> BillOutcome:
    """Bill the customer-hour a message body names; raise to fail the item (SQS redelivers it).

    Runs inside the invocation's APM transaction (Lambda's or the local runner's): labels it, sets
    its outcome and result, and emits the invocation's metrics.
    """
    started = asyncio.get_running_loop().time()  # the budget covers a cold start's pool too
    age_ms = int(time.time() * 1000) - sent_timestamp_ms if sent_timestamp_ms else None
    keys: dict[str, Any] = {"message_id": message_id, **tracing.correlation_ids()}
    try:
        message = parse_message(body)
    except BadMessageError as exc:
        tracing.record_failure(exc)
        _emit_metrics(None, age_ms, failed=True)
        logger.error(
            "malformed message: it fails until it lands in the dead-letter queue",
            extra={**keys, "error": str(exc), "body_bytes": len(body)},
        )
        raise
    tracing.label_message(message)
    # per-call keys, not append_keys: the local runner bills many customers in one process at once
    keys |= {
        "customer_id": message.customer_id,
        "billing_hour": message.billing_period.isoformat(),
        "run_id": str(message.run_id),
    }
    try:
        with log_context.bound(**{k: str(v) for k, v in keys.items() if k in _BILL_KEYS}):
            biller = await _built_within_budget(runtime, started)
            outcome = await biller.bill(message, started)
    except Exception as exc:
        tracing.record_failure(exc)
        _emit_metrics(None, age_ms, failed=True)
        error = {"error": str(exc), "error_type": type(exc).__name__}
        if isinstance(exc, PermanentError):
            logger.error("permanent billing error", extra={**keys, **error})
        else:
            logger.warning("billing failed; the message will be retried", extra={**keys, **error})
        raise
    tracing.record_success(outcome)
    _emit_metrics(outcome, age_ms, failed=False)
    if outcome.requeued:
        logger.warning(
            "throttled for the whole budget: put back on its lane", extra={**keys, **summary(outcome)}
        )
    else:
        logger.info("billed", extra={**keys, **summary(outcome)})
    return outcome


async def _built_within_budget(runtime: Runtime, started: float) -> Biller:
    """The environment's Biller; building it (a cold start's secret read and database connection, whose
    own timeouts are longer than the function's) counts against the invocation's budget, so a database
    that does not answer fails the item in time instead of the function timing out."""
    built = runtime.built_biller
    if built is not None:  # warm: nothing to build, no timer to arm on the per-customer path
        return built
    budget = runtime.settings.invocation_budget_seconds
    try:
        async with asyncio.timeout_at(started + budget):
            return await runtime.biller()
    except TimeoutError:
        raise BudgetSpentError(
            f"the Biller was not ready (database pool, usage source) within the {budget:g} s budget; "
            "SQS redelivers the message"
        ) from None


def _emit_metrics(outcome: BillOutcome | None, age_ms: int | None, failed: bool) -> None:
    """One EMF document per invocation; EphemeralMetrics keeps concurrent bills apart."""
    metrics = EphemeralMetrics(namespace=METRICS_NAMESPACE)
    if outcome is not None:
        metrics.add_dimension("marketplace", outcome.marketplace.value)
        for state, name in _COUNTED.items():
            metrics.add_metric(name=name, unit=MetricUnit.Count, value=outcome.count(state))
        # throttled for a whole budget and put back on its lane: not a failure, but the lane is at its quota
        metrics.add_metric(name="BillsRequeued", unit=MetricUnit.Count, value=1 if outcome.requeued else 0)
    metrics.add_metric(name="BillingFailures", unit=MetricUnit.Count, value=1 if failed else 0)
    if age_ms is not None:
        metrics.add_metric(name="MessageAgeMs", unit=MetricUnit.Milliseconds, value=max(age_ms, 0))
    metrics.flush_metrics()


def summary(outcome: BillOutcome) -> dict[str, Any]:
    return {
        "marketplace": outcome.marketplace.value,
        "already_billed": outcome.already_billed,
        "requeued": outcome.requeued,
        "marketplace_calls": outcome.marketplace_calls,
        **{state.value: outcome.count(state) for state in LedgerState if outcome.count(state)},
    }
