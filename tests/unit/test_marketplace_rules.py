"""Each marketplace's documented rules are data of its adapter: batch limits, windows, zero usage, keys."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from billing.adapters import aws_metering, azure_metering, gcp_service_control
from billing.config import Settings
from billing.domain.model import HOUR, Marketplace, Period

PERIOD = Period(datetime(2026, 11, 26, 13, tzinfo=UTC))
ADAPTERS = {
    Marketplace.AWS: aws_metering.AwsMeteringClient,
    Marketplace.AZURE: azure_metering.AzureMeteringClient,
    Marketplace.GCP: gcp_service_control.GcpServiceControlClient,
}


@pytest.mark.parametrize("marketplace", list(Marketplace))
def test_each_adapter_declares_its_marketplace_and_its_module_rules(marketplace):
    # Given the adapter class of a marketplace
    adapter = ADAPTERS[marketplace]
    # When its class attributes are read
    # Then they name the marketplace and carry its module's RULES
    module = {
        Marketplace.AWS: aws_metering,
        Marketplace.AZURE: azure_metering,
        Marketplace.GCP: gcp_service_control,
    }
    assert adapter.marketplace is marketplace and adapter.rules is module[marketplace].RULES


def test_batch_limits_are_the_documented_ones():
    # Given the three adapters' rules
    # When their batch limits are read
    limits = {m: a.rules.batch_limit for m, a in ADAPTERS.items()}
    # Then AWS and Azure take 25 records a call; Google sets only a 1 MB request size, met by 100 operations
    assert limits == {Marketplace.AWS: 25, Marketplace.AZURE: 25, Marketplace.GCP: 100}


def test_aws_window_is_six_hours():
    # Given AWS's rule: records "are not accepted more than 6 hours after the event"
    # When the window is read
    # Then it is 6 hours from the hour's start (the record's timestamp)
    assert aws_metering.RULES.window == timedelta(hours=6)


def test_azure_window_is_24_hours():
    # Given Azure's rule: usage events only "for the past 24 hours" of effectiveStartTime
    # When the window is read
    # Then it is 24 hours from the hour's start
    assert azure_metering.RULES.window == timedelta(hours=24)


def test_gcp_window_is_one_hour_after_the_usage():
    # Given Google's rule: report "within one hour of the usage being generated"
    # When the window is read (the biller measures it from the hour's start)
    # Then it ends one hour after the hour, when its last usage was generated
    one_hour = timedelta(hours=1)
    assert one_hour == gcp_service_control.REPORT_WITHIN
    assert gcp_service_control.RULES.window == HOUR + one_hour


@pytest.mark.parametrize("marketplace", list(Marketplace))
def test_every_window_outlasts_the_hour_and_the_default_settle_delay(marketplace):
    # Given the default delay before an ended hour is billed
    settle = timedelta(minutes=Settings.model_fields["settle_delay_minutes"].default)
    # When an hour is billed that long after it ended
    # Then it is still inside the marketplace's window (else no hour would ever be sent)
    assert ADAPTERS[marketplace].rules.window > HOUR + settle


def test_zero_usage_rules_per_platform():
    # Given AWS's guidance (a record every hour), Azure's (quantity > 0) and Google's (contiguous reports)
    # When the rules are read
    sends_zero = {m: a.rules.sends_zero for m, a in ADAPTERS.items()}
    # Then AWS and Google get zeros, Azure nothing
    assert sends_zero == {Marketplace.AWS: True, Marketplace.AZURE: False, Marketplace.GCP: True}


@pytest.mark.parametrize(
    ("marketplace", "words"),
    [
        (Marketplace.AWS, ("customer", "dimension", "timestamp")),
        (Marketplace.AZURE, ("resource", "dimension", "hour")),
        (Marketplace.GCP, ("operationId", "UUIDv5", "customer", "dimension", "hour")),
    ],
)
def test_idempotency_key_names_what_the_marketplace_deduplicates_on(marketplace, words):
    # Given the documented deduplication key of a marketplace
    # When the rules' description is read
    key = ADAPTERS[marketplace].rules.idempotency_key
    # Then it names every part of the key
    assert all(word in key for word in words)


def test_gcp_operation_id_is_a_uuid_version_5():
    # Given a customer, dimension and hour
    # When its operationId is made
    op_id = uuid.UUID(gcp_service_control.operation_id("cust-1", "api_calls", PERIOD))
    # Then it is a name-based UUIDv5, as Google recommends for deduplication
    assert op_id.version == 5


def test_gcp_operation_id_is_stable_across_calls():
    # Given the same customer, dimension and hour twice
    # When the operationId is made each time
    first = gcp_service_control.operation_id("cust-1", "api_calls", PERIOD)
    second = gcp_service_control.operation_id("cust-1", "api_calls", Period(PERIOD.start))
    # Then it is the same, so a resubmission is deduplicated
    assert first == second


@pytest.mark.parametrize(
    "changed",
    [
        ("cust-2", "api_calls", PERIOD),
        ("cust-1", "storage_gib", PERIOD),
        ("cust-1", "api_calls", PERIOD.shifted(1)),
    ],
)
def test_gcp_operation_id_differs_when_customer_dimension_or_hour_differs(changed):
    # Given another customer, dimension or hour
    # When its operationId is made
    # Then it differs from the original's
    original = gcp_service_control.operation_id("cust-1", "api_calls", PERIOD)
    assert gcp_service_control.operation_id(*changed) != original


def test_gcp_operation_id_cannot_be_confused_by_separators_in_ids():
    # Given ids that would collide if the parts were simply joined
    # When their operationIds are made
    # Then they differ
    operation_id = gcp_service_control.operation_id
    assert operation_id("a/b", "c", PERIOD) != operation_id("a", "b/c", PERIOD)


@pytest.mark.parametrize(
    ("text", "label"),
    [("cust-1", "cust-1"), ("Acme Corp.", "acme_corp_"), ("x" * 80, "x" * 63)],
)
def test_gcp_label_values_follow_googles_label_syntax(text, label):
    # Given a customer id
    # When it becomes a userLabels value
    # Then it has only lowercase letters, digits, _ and -, at most 63 characters
    assert gcp_service_control.label_value(text) == label


def test_azure_tokens_are_for_the_marketplace_resource():
    # Given Microsoft's marketplace metering resource id
    # When the token scope is read
    # Then it is that resource's .default scope
    assert azure_metering.SCOPE == "20e940b3-4c77-4b0b-9a53-9e16a1b010a7/.default"
