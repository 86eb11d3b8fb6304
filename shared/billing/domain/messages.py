"""The queue message: a versioned JSON document, validated on both sides."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from billing.domain.errors import BadMessageError
from billing.domain.model import Period, hour_floor

# identifiers reach SQL and URLs: keep them to a safe alphabet and a sane length
CustomerId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
MAX_BODY_BYTES = 4096


class BillMessageV1(BaseModel):
    """Bill one customer for one hour."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    customer_id: CustomerId
    period: datetime = Field(description="start of the UTC hour to bill")
    run_id: uuid.UUID

    @field_validator("period")
    @classmethod
    def _on_the_hour(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("period must carry a timezone (UTC)")
        if hour_floor(value) != value:
            raise ValueError("period must start on the hour")
        return value

    @property
    def billing_period(self) -> Period:
        return Period(self.period)

    def to_body(self) -> str:
        return self.model_dump_json()


def parse_message(body: str) -> BillMessageV1:
    """Parse a message body, or raise BadMessageError saying what is wrong."""
    if len(body.encode()) > MAX_BODY_BYTES:
        raise BadMessageError(f"message body is {len(body.encode())} bytes, over {MAX_BODY_BYTES}")
    try:
        return BillMessageV1.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise BadMessageError(f"malformed bill message: {problems}") from None
