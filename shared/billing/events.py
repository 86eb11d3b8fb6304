"""The dispatcher's trigger events, parsed at the edge."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from billing.domain.errors import BadMessageError
from billing.domain.model import Period

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


class ScheduledEvent(BaseModel):
    """An EventBridge scheduled event, or EventBridge Scheduler's input carrying the scheduled time."""

    model_config = ConfigDict(extra="allow")
    time: AwareDatetime


class BackfillEvent(BaseModel):
    """An operator's `{"period": "2026-11-26T13:00:00Z"}`: bill that hour.

    ``"resend_unbilled": true`` sends a message again for every customer whose bill for the hour is not
    finished, even when the hour was dispatched before (its messages purged or lost); billing is
    idempotent, so a customer whose message is still queued is billed once all the same.
    """

    model_config = ConfigDict(extra="forbid")
    period: AwareDatetime
    resend_unbilled: bool = False


@dataclass(frozen=True)
class DispatchRequest:
    period: Period
    resend_unbilled: bool = False


def period_to_bill(
    event: Mapping[str, Any], settle: timedelta, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> Period:
    """The hour an event asks for: from the event itself, never from the wall clock."""
    return dispatch_request(event, settle, clock).period


def dispatch_request(
    event: Mapping[str, Any], settle: timedelta, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> DispatchRequest:
    """What an event asks the dispatcher for: the hour from the event itself, never from the wall clock.

    The clock only refuses a backfill of an hour that has not ended yet.
    """
    try:
        if "period" in event:
            backfill = BackfillEvent.model_validate(event)
            period = Period(backfill.period)
            if period.end > clock():
                raise BadMessageError(f"cannot bill {period}: the hour has not ended yet")
            return DispatchRequest(period, backfill.resend_unbilled)
        if "time" in event:
            scheduled = ScheduledEvent.model_validate(event)
            return DispatchRequest(Period.last_complete_before(scheduled.time, settle))
    except ValidationError as exc:
        raise BadMessageError(f"malformed dispatch event: {exc.errors()[0]['msg']}") from None
    except ValueError as exc:  # Period's own checks (not on the hour)
        raise BadMessageError(f"malformed dispatch event: {exc}") from None
    raise BadMessageError('a dispatch event needs "time" (scheduled) or "period" (backfill)')
