"""Rating and deciding: exact decimals, carried remainders, late usage and credits."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from billing.domain.model import Marketplace, Rate, UsageTotal
from billing.domain.rating import decide, rate_usage

H1 = datetime(2026, 11, 26, 12, tzinfo=UTC)
H2 = datetime(2026, 11, 26, 13, tzinfo=UTC)
RATES = (
    Rate(Marketplace.AWS, "gb_hours", "Storage", Decimal(1)),
    Rate(Marketplace.AWS, "transfer_gb", "Transfer", Decimal("0.1")),
)


def test_rating_is_exact_decimal_arithmetic() -> None:
    # Given usage whose float sum is not exact (0.1 + 0.2 != 0.3 in binary)
    usage = [UsageTotal(H1, "transfer_gb", Decimal("1")), UsageTotal(H1, "transfer_gb", Decimal("2"))]
    # When it is rated at 0.1 units per GB
    rated = rate_usage(usage, RATES)
    # Then the result is exactly 0.3
    assert rated == {("Transfer", H1): Decimal("0.3")}


def test_metrics_without_a_rate_are_ignored() -> None:
    assert rate_usage([UsageTotal(H1, "unknown_metric", Decimal(5))], RATES) == {}


def test_fraction_below_one_unit_carries_to_the_next_hour() -> None:
    # Given 2.6 units of usage in one hour and no carry
    first = decide(["Storage"], {("Storage", H1): Decimal("2.6")}, {}, {})
    # Then 2 units are billed and 0.6 carries
    assert (first.dimensions[0].quantity, first.dimensions[0].carry_out) == (2, Decimal("0.6"))
    # When the next hour has 1.5 units (the look-back window still shows hour 1, unchanged)
    window = {("Storage", H1): Decimal("2.6"), ("Storage", H2): Decimal("1.5")}
    second = decide(["Storage"], window, first.observations, {"Storage": Decimal("0.6")})
    # Then 2 units are billed (0.6 + 1.5 = 2.1) and 0.1 carries: floor of the total, not a sum of roundings
    assert (second.dimensions[0].quantity, second.dimensions[0].carry_out) == (2, Decimal("0.1"))


def test_late_usage_for_a_billed_hour_is_billed_with_the_next_hour() -> None:
    # Given hour 1 was decided when it had 3 units
    observed = {("Storage", H1): Decimal(3)}
    # When hour 2 is decided and hour 1 now shows 5 units (2 arrived late) besides hour 2's own 4
    decision = decide(["Storage"], {("Storage", H1): Decimal(5), ("Storage", H2): Decimal(4)}, observed, {})
    # Then hour 2 bills its own 4 plus the late 2
    assert decision.dimensions[0].quantity == 6
    assert decision.observations[("Storage", H1)] == Decimal(5)


def test_a_downward_correction_is_carried_as_credit_never_a_negative_quantity() -> None:
    # Given hour 1 was billed at 10 units and is now corrected down to 4
    observed = {("Storage", H1): Decimal(10)}
    decision = decide(["Storage"], {("Storage", H1): Decimal(4), ("Storage", H2): Decimal(2)}, observed, {})
    # Then nothing is billed and 4 units of credit carry (2 - 6)
    assert decision.dimensions[0].quantity == 0
    assert decision.dimensions[0].carry_out == Decimal(-4)


def test_credit_is_used_up_by_later_usage() -> None:
    decision = decide(["Storage"], {("Storage", H2): Decimal(7)}, {}, {"Storage": Decimal(-4)})
    assert (decision.dimensions[0].quantity, decision.dimensions[0].carry_out) == (3, Decimal(0))


def test_every_dimension_gets_a_decision_even_without_usage() -> None:
    decision = decide(["Storage", "Transfer"], {}, {}, {})
    assert [(d.dimension, d.quantity) for d in decision.dimensions] == [("Storage", 0), ("Transfer", 0)]


def test_usage_that_disappeared_is_observed_as_zero() -> None:
    decision = decide(["Storage"], {}, {("Storage", H1): Decimal(2)}, {"Storage": Decimal(0)})
    assert decision.observations == {("Storage", H1): Decimal(0)}
    assert decision.dimensions[0].carry_out == Decimal(-2)


def test_total_billed_is_floor_of_total_usage_over_many_hours() -> None:
    # Given 100 hours of 0.37 units each
    carry: dict[str, Decimal] = {}
    billed = 0
    for hour in range(100):
        at = datetime(2026, 11, 1, tzinfo=UTC).replace(day=1 + hour // 24, hour=hour % 24)
        d = decide(["Storage"], {("Storage", at): Decimal("0.37")}, {}, carry).dimensions[0]
        billed += d.quantity
        carry = {"Storage": d.carry_out}
    # Then the customer paid floor(37.00) units, with nothing left over
    assert billed == 37
    assert carry["Storage"] == Decimal(0)
