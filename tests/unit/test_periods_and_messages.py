"""Billing hours come from the event, never the wall clock; messages are validated at the edge."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

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


# --- the edges: future hours, strict types, absurd input (issue #11) ---------------------------------

AT_14_20 = lambda: datetime(2026, 11, 26, 14, 20, tzinfo=UTC)  # noqa: E731


@pytest.mark.parametrize(
    "event",
    [
        {"time": "2099-01-01T00:05:00Z"},  # a scheduled event from the future
        {"time": "2026-11-26T15:30:00Z"},  # later today: its hour (14:00) has not ended at 14:20
        {"period": "2099-01-01T00:00:00Z"},
        {"period": "2026-11-26T14:00:00Z"},  # the hour in progress
    ],
)
def test_a_dispatch_event_for_an_hour_not_yet_ended_is_refused_in_both_forms(
    event: dict[str, object],
) -> None:
    with pytest.raises(BadMessageError, match="has not ended yet"):
        dispatch_request(event, SETTLE, AT_14_20)


def test_an_hour_that_ended_inside_the_settle_delay_may_be_backfilled() -> None:
    # Given 14:05: the 13:00 hour ended 5 minutes ago, inside the 15-minute settle delay
    at_14_05 = lambda: datetime(2026, 11, 26, 14, 5, tzinfo=UTC)  # noqa: E731
    # Then an operator may still bill it: later usage is billed with the next hour
    assert period_to_bill({"period": "2026-11-26T13:00:00Z"}, SETTLE, at_14_05) == Period.parse(
        "2026-11-26T13:00:00Z"
    )


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        ({"time": 12345}, "RFC 3339"),  # seconds since 1970 are not a time here
        ({"time": "12345"}, "RFC 3339"),  # nor as a string (pydantic would read 1970-01-01T03:25:45)
        ({"time": 1.5e9}, "RFC 3339"),
        ({"time": None}, "RFC 3339"),
        ({"time": {"$date": "2026-11-26T14:05:00Z"}}, "RFC 3339"),
        ({"time": ["2026-11-26T14:05:00Z"]}, "RFC 3339"),
        ({"time": "2026-11-26 14:05:00Z"}, "RFC 3339"),
        ({"time": "2026-02-30T14:05:00Z"}, "not a real date-time"),
        ({"period": "2026-11-26T13:00:00Z", "resend_unbilled": "yes"}, "boolean"),
        ({"period": "2026-11-26T13:00:00Z", "resend_unbilled": 1}, "boolean"),
        ({"period": "2026-11-26T13:00:00Z", "resend_unbilled": "true"}, "boolean"),
        ({"period": 1764162000}, "RFC 3339"),  # 2026-11-26T13:00:00Z as a number
        ({"period": "1970-01-01T00:00:00Z"}, "lies in"),
        ({"period": "0001-01-01T00:00:00Z"}, "lies in"),
        ({"time": "0001-01-01T00:05:00Z"}, "malformed dispatch event"),  # 15 minutes before year 1
        ({"time": "9999-12-31T23:59:59Z"}, "lies in"),
        ({"period": "9999-12-31T23:00:00Z"}, "lies in"),
        ({"time": "2026-11-26T14:05:00" + "0" * 5000 + "Z"}, "RFC 3339"),
    ],
)
def test_absurd_dispatch_events_are_bad_messages(event: dict[str, object], problem: str) -> None:
    with pytest.raises(BadMessageError, match=problem):
        dispatch_request(event, SETTLE, AT_14_20)


@pytest.mark.parametrize("event", [None, [], "period", 7, ["time", "2026-11-26T14:05:00Z"]])
def test_a_dispatch_event_that_is_not_an_object_is_a_bad_message(event: object) -> None:
    with pytest.raises(BadMessageError, match="JSON object"):
        dispatch_request(event, SETTLE, AT_14_20)


def test_a_scheduled_time_with_an_offset_bills_the_same_utc_hour() -> None:
    event = {"time": "2026-11-26T15:20:00+01:00"}
    assert period_to_bill(event, SETTLE, AT_14_20) == Period.parse("2026-11-26T13:00:00Z")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("period", 1764162000, "RFC 3339"),
        ("period", "1764162000", "RFC 3339"),
        ("period", "9999-12-31T23:00:00Z", "lies in"),
        ("period", "0001-01-01T00:00:00Z", "lies in"),
        ("period", {"nested": 1}, "RFC 3339"),
        ("version", True, "version"),
        ("version", "1", "version"),
        ("version", 1.0, "version"),
        ("customer_id", 12, "customer_id"),
        ("run_id", 12, "run_id"),
    ],
)
def test_bill_messages_take_json_types_strictly(field: str, value: object, problem: str) -> None:
    with pytest.raises(BadMessageError, match=problem):
        parse_message(message_json(**{field: value}))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
TIMES = st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z"))
HOURS = st.datetimes(timezones=st.just(UTC)).map(
    lambda d: d.replace(minute=0, second=0, microsecond=0).isoformat().replace("+00:00", "Z")
)
TIMESTAMP_LIKE = (
    TIMES
    | HOURS
    | st.from_regex(r"\A[0-9]{1,6}-[0-9]{1,3}-[0-9]{1,3}T[0-9:]{5,9}(Z|[+-][0-9]{2}:[0-9]{2})?\Z")
)


@given(
    event=st.one_of(
        JSON,
        st.fixed_dictionaries({"time": JSON | TIMESTAMP_LIKE}, optional={"source": JSON}),
        st.fixed_dictionaries({"period": JSON | TIMESTAMP_LIKE}, optional={"resend_unbilled": JSON}),
    )
)
def test_any_json_event_gives_an_ended_hour_or_a_bad_message(event: object) -> None:
    # Whatever JSON arrives, the dispatcher either bills an hour that has ended or refuses the event
    # with BadMessageError: never TypeError, OverflowError or a future hour.
    try:
        request = dispatch_request(event, SETTLE, AT_14_20)
    except BadMessageError:
        return
    assert request.period.end <= AT_14_20()
    assert isinstance(request.resend_unbilled, bool)


@given(
    period=HOURS | JSON | TIMESTAMP_LIKE,
    version=st.just(1) | JSON,
    customer_id=st.just("c") | JSON,
    run_id=st.just(RUN) | JSON,
)
# the edges of datetime's range, where look-back arithmetic overflowed
@example(period="0001-01-01T00:00:00Z", version=1, customer_id="c", run_id=RUN)
@example(period="9999-12-31T23:00:00Z", version=1, customer_id="c", run_id=RUN)
def test_any_json_message_parses_or_is_a_bad_message(
    period: object, version: object, customer_id: object, run_id: object
) -> None:
    body = json.dumps({"version": version, "customer_id": customer_id, "period": period, "run_id": run_id})
    try:
        message = parse_message(body)
    except BadMessageError:
        return
    # a message that parses names an hour whose end and week-long look-back can be computed
    hour = message.billing_period
    assert hour.start - timedelta(days=7) < hour.end + timedelta(days=7)
