"""Elastic APM touch points: named spans, labels and explicit outcomes (no-ops outside a transaction)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import elasticapm
from elasticapm.traces import execution_context

if TYPE_CHECKING:
    from elasticapm.traces import capture_span as CaptureSpan

    from billing.domain.messages import BillMessageV1
    from billing.domain.model import BillOutcome


def span(name: str, span_type: str = "app", subtype: str | None = None) -> CaptureSpan:
    """A named span for a domain step (rating, ledger write) inside the current transaction."""
    return elasticapm.capture_span(name, span_type=span_type, span_subtype=subtype, leaf=False)


def _active() -> bool:
    """Outside a transaction the agent would log "No transaction currently active" for each call."""
    return execution_context.get_transaction() is not None


def label_message(message: BillMessageV1) -> None:
    if not _active():
        return
    elasticapm.label(
        billing_hour=message.billing_period.isoformat(),
        run_id=str(message.run_id),
        customer_id=message.customer_id,
    )


def record_success(outcome: BillOutcome) -> None:
    """The agent leaves outcome and result empty for non-HTTP triggers: set both."""
    if not _active():
        return
    elasticapm.label(marketplace=outcome.marketplace.value)
    elasticapm.set_transaction_outcome("success", override=False)
    elasticapm.set_transaction_result(
        "already billed" if outcome.already_billed else "billed", override=False
    )


def record_failure(exc: BaseException) -> None:
    if not _active():
        return
    client = elasticapm.get_client()
    if client is not None:
        client.capture_exception(exc_info=(type(exc), exc, exc.__traceback__), handled=True)
    elasticapm.set_transaction_outcome("failure", override=True)
    elasticapm.set_transaction_result(type(exc).__name__, override=True)


def correlation_ids() -> dict[str, Any]:
    """ECS log-correlation fields of the current transaction (empty outside one)."""
    ids = {"trace.id": elasticapm.get_trace_id(), "transaction.id": elasticapm.get_transaction_id()}
    return {k: v for k, v in ids.items() if v}
