"""The daily audit: ``billing reconcile`` of the previous complete UTC day, as a scheduled function.

It emits the EMF metric ``ReconcileUnexplained`` (the number of unexplained differences, 0 when clean; the
stack alarms when it is above 0) and logs each unexplained difference, so the alarm's reader finds the
customer, dimension, hour and reason in the function's logs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from billing.domain.errors import BadMessageError
from billing.domain.model import Period
from billing.domain.reconciliation import num
from billing.entrypoints.biller import METRICS_NAMESPACE

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from billing.bootstrap import Runtime
    from billing.domain.reconciliation import Reconciliation

logger = Logger()


class _Scheduled(BaseModel):
    """An EventBridge (Scheduler) event: the day before the scheduled time's UTC day is audited."""

    model_config = ConfigDict(extra="allow")
    time: AwareDatetime


class _Day(BaseModel):
    """An operator's ``{"day": "2026-11-26"}``: audit that UTC day."""

    model_config = ConfigDict(extra="forbid")
    day: dt.date


@dataclass(frozen=True)
class AuditRequest:
    first: Period  # the day's first hour
    last: Period  # its last hour, included
    now: dt.datetime  # the clock the reconciliation judges late usage by


def audit_request(
    event: Mapping[str, Any], clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
) -> AuditRequest:
    """The day an event asks to audit: from the event itself; the clock only for an operator's day."""
    try:
        if "day" in event:
            day = _Day.model_validate(event).day
            now = clock()
        elif "time" in event:
            now = _Scheduled.model_validate(event).time.astimezone(dt.UTC)
            day = now.date() - dt.timedelta(days=1)
        else:
            raise BadMessageError('an audit event needs "time" (scheduled) or "day"')
        first = Period(dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC))
    except ValidationError as exc:
        raise BadMessageError(f"malformed audit event: {exc.errors()[0]['msg']}") from None
    except ValueError as exc:  # Period's own checks
        raise BadMessageError(f"malformed audit event: {exc}") from None
    if first.shifted(24).start > now:
        raise BadMessageError(f"cannot audit {day}: the day has not ended yet")
    return AuditRequest(first, first.shifted(23), now)


async def audit(runtime: Runtime, event: Mapping[str, Any]) -> Reconciliation:
    """Reconcile the event's day with the layer's reconciliation; log and count what is unexplained."""
    from billing.adapters.postgres_reconcile import PostgresReconcileReader
    from billing.services.reconcile import reconcile

    request = audit_request(event)
    settings = runtime.settings
    result = await reconcile(
        PostgresReconcileReader(await runtime.pool()),
        await runtime.usage_source(),
        request.first,
        request.last,
        lookback_hours=settings.lookback_hours,
        settle=settings.settle_delay,
        now=request.now,
        usage_source=settings.usage_source.value,
        concurrency=settings.db_pool_max,
    )
    for line in result.lines:
        for difference in line.unexplained:
            logger.warning(
                "reconcile: unexplained difference",
                extra={
                    "customer_id": line.customer_id,
                    "marketplace": line.marketplace,
                    "dimension": line.dimension,
                    "billing_hour": difference.period,
                    "kind": difference.kind,
                    "amount": num(difference.amount),
                    "reason": difference.reason,
                },
            )
    metrics = EphemeralMetrics(namespace=METRICS_NAMESPACE)
    metrics.add_metric(name="ReconcileUnexplained", unit=MetricUnit.Count, value=result.unexplained)
    metrics.flush_metrics()
    logger.info("reconciled", extra=summary(result))
    return result


def summary(result: Reconciliation) -> dict[str, Any]:
    """The audit's answer: the day's range, its size and its verdict."""
    return {
        "from": result.start.isoformat(),
        "to": result.end.isoformat(),
        "customers": result.customers,
        "lines": len(result.lines),
        "unexplained": result.unexplained,
        "clean": result.clean,
    }
