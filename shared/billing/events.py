"""The dispatcher's trigger events, parsed at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from billing.domain.errors import BadMessageError
from billing.domain.messages import STRICT, Rfc3339Time, problems, require_ended
from billing.domain.model import Period

if TYPE_CHECKING:
    from collections.abc import Callable


class ScheduledEvent(BaseModel):
    """An EventBridge scheduled event, or EventBridge Scheduler's input carrying the scheduled time."""

    # EventBridge adds fields (id, source, resources, detail...): only `time` is read
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    time: Rfc3339Time


class BackfillEvent(BaseModel):
    """An operator's `{"period": "2026-11-26T13:00:00Z"}`: bill that hour.

    ``"resend_unbilled": true`` sends a message again for every customer whose bill for the hour is not
    finished, even when the hour was dispatched before (its messages purged or lost); billing is
    idempotent, so a customer whose message is still queued is billed once all the same.
    """

    model_config = STRICT
    period: Rfc3339Time
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
    event: object, settle: timedelta, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> DispatchRequest:
    """What an event asks the dispatcher for: the hour from the event itself, never from the wall clock.

    The clock only refuses an hour that has not ended yet, in either form (a scheduled event's hour
    ends at least the settle delay before its time, so a genuine one always passes).
    """
    if not isinstance(event, Mapping):
        raise BadMessageError(f"a dispatch event is a JSON object, got {type(event).__name__}")
    try:
        if "period" in event:
            backfill = BackfillEvent.model_validate(event)
            request = DispatchRequest(Period(backfill.period), backfill.resend_unbilled)
        elif "time" in event:
            scheduled = ScheduledEvent.model_validate(event)
            request = DispatchRequest(Period.last_complete_before(scheduled.time, settle))
        else:
            raise BadMessageError('a dispatch event needs "time" (scheduled) or "period" (backfill)')
    except ValidationError as exc:
        raise BadMessageError(f"malformed dispatch event: {problems(exc)}") from None
    except (ValueError, OverflowError) as exc:  # Period's own checks: on the hour, in range
        raise BadMessageError(f"malformed dispatch event: {exc}") from None
    require_ended(request.period, clock, "the dispatch event")
    return request
