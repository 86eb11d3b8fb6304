"""Billing hours come from the event, never the wall clock; messages are validated at the edge."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from billing.domain.errors import BadMessageError
from billing.domain.messages import BillMessageV1, parse_message
from billing.domain.model import Period
from billing.events import dispatch_request, period_to_bill

SETTLE = timedelta(minutes=15)
RUN = str(uuid.uuid4())


def test_scheduled_event_bills_the_last_complete_hour_after_the_settle_delay() -> None:
    # Given the scheduled event of 14:20 and 15 minutes for late usage to settle
    event = {"source": "aws.events", "time": "2026-11-26T14:20:00Z", "detail": {}}
    # Then the hour billed is 13:00-14:00
    assert period_to_bill(event, SETTLE) == Period.parse("2026-11-26T13:00:00Z")


def test_an_event_inside_the_settle_delay_bills_the_hour_before() -> None:
    event = {"time": "2026-11-26T14:05:00Z"}
    assert period_to_bill(event, SETTLE) == Period.parse("2026-11-26T12:00:00Z")


def test_a_replayed_event_bills_its_own_hour_whatever_the_clock_says() -> None:
    # Given an event from yesterday replayed today
    event = {"time": "2026-11-25T09:30:00Z"}
    late_clock = lambda: datetime(2026, 11, 26, 18, tzinfo=UTC)  # noqa: E731
    # Then yesterday's hour is billed
    assert period_to_bill(event, SETTLE, late_clock) == Period.parse("2026-11-25T08:00:00Z")


def test_backfill_event_bills_the_named_hour() -> None:
    assert period_to_bill({"period": "2026-11-26T13:00:00Z"}, SETTLE) == Period.parse("2026-11-26T13:00:00Z")


def test_a_backfill_may_ask_to_resend_unbilled_customers_and_a_schedule_never_does() -> None:
    assert dispatch_request({"period": "2026-11-26T13:00:00Z"}, SETTLE).resend_unbilled is False
    asked = dispatch_request({"period": "2026-11-26T13:00:00Z", "resend_unbilled": True}, SETTLE)
    assert (asked.period, asked.resend_unbilled) == (Period.parse("2026-11-26T13:00:00Z"), True)
    assert dispatch_request({"time": "2026-11-26T14:20:00Z"}, SETTLE).resend_unbilled is False


def test_backfill_of_an_hour_not_yet_ended_is_refused() -> None:
    clock = lambda: datetime(2026, 11, 26, 13, 30, tzinfo=UTC)  # noqa: E731
    with pytest.raises(BadMessageError, match="has not ended"):
        period_to_bill({"period": "2026-11-26T13:00:00Z"}, SETTLE, clock)


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"period": "2026-11-26T13:30:00Z"},
        {"period": "yesterday"},
        {"time": "2026-11-26T14:20:00"},
        {"period": "2026-11-26T13:00:00Z", "extra": 1},
        {"period": "2026-11-26T13:00:00Z", "resend_unbilled": "perhaps"},
    ],
)
def test_malformed_dispatch_events_are_refused_clearly(event: dict[str, object]) -> None:
    with pytest.raises(BadMessageError, match=r"dispatch event|has not ended"):
        period_to_bill(event, SETTLE)


def test_message_round_trips_through_its_json_body() -> None:
    message = BillMessageV1(
        customer_id="cust-1", period=datetime(2026, 11, 26, 13, tzinfo=UTC), run_id=uuid.uuid4()
    )
    assert parse_message(message.to_body()) == message
    assert json.loads(message.to_body())["version"] == 1


def message_json(**fields: object) -> str:
    doc = {"version": 1, "customer_id": "c", "period": "2026-11-26T13:00:00Z", "run_id": str(uuid.uuid4())}
    return json.dumps({**doc, **fields})


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("not json", "malformed"),
        (
            message_json(version=2),
            "version",
        ),
        (
            message_json(period="2026-11-26T13:30:00Z"),
            "on the hour",
        ),
        (
            message_json(customer_id="c/../x"),
            "customer_id",
        ),
        ('{"version": 1, "customer_id": "c", "period": "2026-11-26T13:00:00Z"}', "run_id"),
    ],
)
def test_bad_messages_raise_a_clear_error(body: str, problem: str) -> None:
    with pytest.raises(BadMessageError, match=problem):
        parse_message(body)


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(BadMessageError, match="bytes"):
        parse_message("x" * 5000)


def test_period_rejects_hours_not_on_the_hour_and_naive_times() -> None:
    with pytest.raises(ValueError, match="on the hour"):
        Period(datetime(2026, 11, 26, 13, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="timezone"):
        Period(datetime(2026, 11, 26, 13))
