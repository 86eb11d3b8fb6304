"""Each lane's capacity at its quota: customers per hour, this hour's share and the margin."""

from __future__ import annotations

from billing_local.capacity import lane_capacities, units_per_customer


def test_aws_at_its_documented_quota_bills_36000_customers_an_hour() -> None:
    # 10 BatchMeterUsage requests a second, one request per customer with up to 25 dimensions
    (aws, gcp, azure) = lane_capacities(
        {"aws": 10.0, "gcp": 100_000.0}, {"aws": 2, "gcp": 2}, {"aws": 30_000}
    )
    assert (aws.customers_per_hour, aws.customers_this_hour, aws.margin) == (36_000, 30_000, 6_000)
    # Google: a services.check and one unit per reported operation, 6,000,000 units a minute
    assert gcp.units_per_customer == 3
    assert gcp.customers_per_hour == 120_000_000
    # Azure documents no rate: no capacity is claimed
    assert azure.customers_per_hour is None and azure.margin is None


def test_a_customer_with_more_than_25_dimensions_costs_more_calls() -> None:
    assert units_per_customer("aws", 25) == 1
    assert units_per_customer("aws", 26) == 2
    assert units_per_customer("azure", 30) == 2


def test_an_hour_past_the_quota_shows_a_negative_margin() -> None:
    (aws, *_rest) = lane_capacities({"aws": 10.0}, {"aws": 2}, {"aws": 40_000})
    assert aws.margin == -4_000
    assert "margin -4,000" in aws.line()


def test_a_lane_line_formats_its_quota_like_its_counts() -> None:
    # the Google lane's quota beside its customers: "100,000/s", not "100000/s" next to "36,000"
    (_aws, gcp, _azure) = lane_capacities({"gcp": 100_000.0, "aws": 10.0}, {"gcp": 2}, {"gcp": 5})
    assert "customers/hour at 100,000/s " in gcp.line()
