"""The dispatcher's trigger events, parsed at the edge."""

from __future__ import annotations

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
    """An operator's `{"period": "2026-11-26T13:00:00Z"}`: bill that hour."""

    model_config = ConfigDict(extra="forbid")
    period: AwareDatetime


def period_to_bill(
    event: Mapping[str, Any], settle: timedelta, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> Period:
    """The hour an event asks for: from the event itself, never from the wall clock.

    The clock only refuses a backfill of an hour that has not ended yet.
    """
    try:
        if "period" in event:
            period = Period(BackfillEvent.model_validate(event).period)
            if period.end > clock():
                raise BadMessageError(f"cannot bill {period}: the hour has not ended yet")
            return period
        if "time" in event:
            return Period.last_complete_before(ScheduledEvent.model_validate(event).time, settle)
    except ValidationError as exc:
        raise BadMessageError(f"malformed dispatch event: {exc.errors()[0]['msg']}") from None
    except ValueError as exc:  # Period's own checks (not on the hour)
        raise BadMessageError(f"malformed dispatch event: {exc}") from None
    raise BadMessageError('a dispatch event needs "time" (scheduled) or "period" (backfill)')
