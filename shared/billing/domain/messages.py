"""The queue message: a versioned JSON document, validated on both sides."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from billing.domain.errors import BadMessageError
from billing.domain.model import HOUR, Period

if TYPE_CHECKING:
    from collections.abc import Callable

# identifiers reach SQL and URLs: keep them to a safe alphabet and a sane length
CustomerId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
MAX_BODY_BYTES = 4096

# RFC 3339 date-time, the format of EventBridge's `time` and of our own messages. pydantic (even strict)
# reads a string of digits such as "12345" as seconds since 1970: only this shape is a time here.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: object) -> object:
    if isinstance(value, datetime):  # built in Python (the dispatcher), not parsed
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 date-time such as 2026-11-26T13:00:00Z")
    # fromisoformat takes at most 6 fraction digits; RFC 3339 allows more
    text = re.sub(r"(\.\d{6})\d+", r"\1", value).replace("z", "Z").replace("t", "T")
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # 2026-02-30, 25:00 ...
        raise ValueError(f"not a real date-time: {value}") from None


def _json_integer(value: object) -> object:
    # Literal[1] matches by equality, so true and 1.0 would pass for 1 even in strict mode
    if type(value) is not int:
        raise ValueError("expected a JSON integer")
    return value


# strict models take JSON's own types only (no "yes" for true, no 1 for a time)
Rfc3339Time = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


class BillMessageV1(BaseModel):
    """Bill one customer for one hour."""

    model_config = STRICT

    version: Annotated[Literal[1], BeforeValidator(_json_integer)] = 1
    customer_id: CustomerId
    period: Rfc3339Time = Field(description="start of the UTC hour to bill")
    run_id: uuid.UUID
    # A final bill (#13): the subscription ended at this instant inside the hour, which is billed at once
    # with usage up to the end, before the hour itself is over (the marketplaces' final-metering windows
    # are shorter than waiting for the hour and the dispatcher). Absent for every other bill.
    final_until: Rfc3339Time | None = None

    @field_validator("period")
    @classmethod
    def _on_the_hour(cls, value: datetime) -> datetime:
        Period(value)  # on the hour, in range
        return value

    @model_validator(mode="after")
    def _final_inside_the_hour(self) -> BillMessageV1:
        if self.final_until is not None and not self.period < self.final_until <= self.period + HOUR:
            raise ValueError("final_until lies inside the billed hour (after its start, at most its end)")
        return self

    @property
    def billing_period(self) -> Period:
        return Period(self.period)

    def to_body(self) -> str:
        # an ordinary bill's body stays exactly what consumers without final bills read
        return self.model_dump_json(exclude_none=True)


def parse_message(body: str) -> BillMessageV1:
    """Parse a message body, or raise BadMessageError saying what is wrong."""
    if len(body.encode()) > MAX_BODY_BYTES:
        raise BadMessageError(f"message body is {len(body.encode())} bytes, over {MAX_BODY_BYTES}")
    try:
        return BillMessageV1.model_validate_json(body)
    except ValidationError as exc:
        raise BadMessageError(f"malformed bill message: {problems(exc)}") from None


def problems(exc: ValidationError) -> str:
    """Every problem pydantic found, one per field, without echoing the input."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


def require_billable_now(message: BillMessageV1, clock: Callable[[], datetime]) -> None:
    """An ordinary bill needs its hour over; a final bill only its end instant passed (its hour is
    billed up to that instant, and usage after it is never billed)."""
    if message.final_until is None:
        require_ended(message.billing_period, clock, "the bill message")
        return
    now = clock().astimezone(UTC)
    if message.final_until > now:
        raise BadMessageError(
            f"the final bill names an end instant {message.final_until:%Y-%m-%dT%H:%M:%SZ} that has not "
            f"passed yet (now {now:%Y-%m-%dT%H:%M:%SZ})"
        )


def require_ended(period: Period, clock: Callable[[], datetime], what: str) -> None:
    """Refuse an hour that has not ended by ``clock``: its usage is still coming and no marketplace
    takes a record for the future."""
    now = clock().astimezone(UTC)
    if not period.has_ended(now):
        raise BadMessageError(
            f"{what} names {period}, an hour that has not ended yet (now {now:%Y-%m-%dT%H:%M:%SZ})"
        )
