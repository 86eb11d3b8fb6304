"""AWS's 2026 identity through the real aioboto3 client and the project's metering emulator.

The emulator (billing_local.emulators.aws_metering) follows the Metering API reference of 2026: a
license-based BatchMeterUsage has LicenseArn + CustomerAWSAccountId records and no ProductCode, a
legacy one ProductCode + CustomerIdentifier; it refuses a request mixing them, and records what it
received on the wire (``last_bodies``) so the tests read the JSON body botocore really sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError

from billing.adapters import aws_subscriptions
from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.domain.model import Customer, CustomerStatus, LedgerEntry, LedgerState, Marketplace
from billing.domain.subscriptions import EventSource, billable_during, fold
from billing.ports import MarketplaceClient
from billing_local.emulators.aws_events import agreement_event, registration_request
from testkit import HOUR, PRODUCT, add_rates, add_usage, ledger, message, within_window

ACCOUNT = "845735284135"
LICENSE_A = "arn:aws:license-manager::794222239362:license:l-e52ca6f38bf84d0fafb8802ca15ac11a"
LICENSE_B = "arn:aws:license-manager::794222239362:license:l-e52ca6f38bf84d0fafb8802ca15ac11b"


def customer(customer_id: str, **identity: str) -> Customer:
    return Customer(
        customer_id,
        Marketplace.AWS,
        CustomerStatus.ACTIVE,
        datetime(2026, 1, 1, tzinfo=UTC),
        None,
        **identity,
    )


def entries(customer_id: str, **quantities: int) -> list[LedgerEntry]:
    return [LedgerEntry(customer_id, d, HOUR, q, LedgerState.PENDING) for d, q in quantities.items()]


@pytest.fixture
async def runtime(stack: Any) -> AsyncIterator[Runtime]:
    stack.metering.clock = within_window
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb"})
    rt = Runtime(load_settings())
    yield rt
    await rt.close()


@pytest.fixture
async def aws(runtime: Runtime) -> MarketplaceClient:
    return await runtime.marketplace(Marketplace.AWS)


async def test_a_license_subject_is_metered_by_license_arn_with_no_product_code(
    aws: MarketplaceClient, stack: Any
) -> None:
    # Given a license-based subject (2026): an account and the license of one of its agreements
    stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE_A)
    subject = customer("lic-a", aws_account_id=ACCOUNT, aws_license_arn=LICENSE_A)
    # When its hour is billed through the runtime's client (botocore validates the parameters)
    results = await aws.submit(subject, HOUR, entries("lic-a", CapacityGbHours=3, DataTransferGb=0))
    # Then AWS accepted both records, and the body on the wire had LicenseArn + account and no ProductCode
    assert {r.dimension: r.state for r in results} == {
        "CapacityGbHours": LedgerState.ACCEPTED,
        "DataTransferGb": LedgerState.ACCEPTED,
    }
    body = stack.metering.last_bodies[-1]
    assert "ProductCode" not in body
    assert [
        (r["LicenseArn"], r["CustomerAWSAccountId"], "CustomerIdentifier" in r) for r in body["UsageRecords"]
    ] == [
        (LICENSE_A, ACCOUNT, False),
        (LICENSE_A, ACCOUNT, False),
    ]
    assert {r.license_arn for r in stack.metering.accepted()} == {LICENSE_A}


async def test_one_account_with_two_licenses_of_one_product_is_billed_as_two_subjects(
    aws: MarketplaceClient, stack: Any
) -> None:
    # Given one AWS account holding two agreements (two licenses) for the same product
    stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE_A)
    stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE_B)
    first = customer("team-1", aws_account_id=ACCOUNT, aws_license_arn=LICENSE_A)
    second = customer("team-2", aws_account_id=ACCOUNT, aws_license_arn=LICENSE_B)
    # When both are billed for the same hour and dimension with different quantities
    one = await aws.submit(first, HOUR, entries("team-1", CapacityGbHours=2))
    two = await aws.submit(second, HOUR, entries("team-2", CapacityGbHours=5))
    # Then both are accepted, each under its own license (no DuplicateRecord between them)
    assert [r.state for r in one + two] == [LedgerState.ACCEPTED, LedgerState.ACCEPTED]
    assert one[0].record_id != two[0].record_id
    held = sorted((r.license_arn, r.customer, r.quantity) for r in stack.metering.accepted())
    assert held == [(LICENSE_A, ACCOUNT, 2), (LICENSE_B, ACCOUNT, 5)]


async def test_a_legacy_subject_keeps_product_code_and_customer_identifier(
    aws: MarketplaceClient, stack: Any
) -> None:
    stack.metering.subscribe(PRODUCT, "X01EXAMPLEX")
    legacy = customer("old", aws_customer_identifier="X01EXAMPLEX", aws_product_code=PRODUCT)
    results = await aws.submit(legacy, HOUR, entries("old", CapacityGbHours=1))
    assert [r.state for r in results] == [LedgerState.ACCEPTED]
    body = stack.metering.last_bodies[-1]
    assert body["ProductCode"] == PRODUCT
    assert [sorted(r) for r in body["UsageRecords"]] == [
        ["CustomerIdentifier", "Dimension", "Quantity", "Timestamp"]
    ]


async def test_a_subject_migrated_to_a_license_is_never_metered_by_both_identities(
    aws: MarketplaceClient, stack: Any
) -> None:
    # Given a subject that still carries its legacy identifiers and now has a license (migration)
    stack.metering.subscribe(PRODUCT, "X01EXAMPLEX")
    stack.metering.customer_accounts["X01EXAMPLEX"] = ACCOUNT
    stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE_A)
    both = customer(
        "moved",
        aws_customer_identifier="X01EXAMPLEX",
        aws_product_code=PRODUCT,
        aws_account_id=ACCOUNT,
        aws_license_arn=LICENSE_A,
    )
    # When its hour is billed, twice (a redelivered message)
    await aws.submit(both, HOUR, entries("moved", CapacityGbHours=4))
    await aws.submit(both, HOUR, entries("moved", CapacityGbHours=4))
    # Then every request was license-based only, and AWS holds no hour billed both ways
    assert all("ProductCode" not in b for b in stack.metering.last_bodies)
    assert all("CustomerIdentifier" not in r for b in stack.metering.last_bodies for r in b["UsageRecords"])
    assert stack.metering.double_billed() == []
    assert len(stack.metering.accepted()) == 1


async def test_the_emulator_refuses_a_request_mixing_product_code_and_license_arn(
    runtime: Runtime, stack: Any
) -> None:
    # what the adapter must never send (AWS would bill it twice); the emulator makes it fail loudly
    stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE_A)
    client = await runtime.aws_client("meteringmarketplace", retries={"total_max_attempts": 1})
    record = {"Timestamp": HOUR.start, "Dimension": "CapacityGbHours", "Quantity": 1}
    with pytest.raises(ClientError) as refused:
        await client.batch_meter_usage(
            ProductCode=PRODUCT,
            UsageRecords=[record | {"LicenseArn": LICENSE_A, "CustomerAWSAccountId": ACCOUNT}],
        )
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert stack.metering.accepted() == []


async def test_a_license_past_its_final_metering_hour_is_refused_permanently(
    aws: MarketplaceClient, stack: Any
) -> None:
    # Given a license deprovisioned during the hour, and a bill sent more than an hour after that
    stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE_A)
    stack.metering.deprovision(LICENSE_A, HOUR.start + timedelta(minutes=30))
    stack.metering.clock = lambda: HOUR.start + timedelta(minutes=95)
    subject = customer("gone", aws_account_id=ACCOUNT, aws_license_arn=LICENSE_A)
    results = await aws.submit(subject, HOUR, entries("gone", CapacityGbHours=1))
    # Then AWS's InvalidLicenseException is a permanent refusal, never retried or carried
    assert [(r.state, (r.reason or "").split(":")[0]) for r in results] == [
        (LedgerState.REJECTED, "InvalidLicenseException")
    ]


async def test_resolve_customer_through_the_real_client(runtime: Runtime, stack: Any) -> None:
    client = await runtime.aws_client("meteringmarketplace", retries={"total_max_attempts": 1})
    token = stack.metering.issue_token(PRODUCT, ACCOUNT, license_arn=LICENSE_A)
    answer = await client.resolve_customer(RegistrationToken=token)
    assert (answer["CustomerAWSAccountId"], answer["LicenseArn"], answer["ProductCode"]) == (
        ACCOUNT,
        LICENSE_A,
        PRODUCT,
    )
    assert answer["Metadata"]["AgreementId"].startswith("agmt-")
    assert "CustomerIdentifier" not in answer
    # a token is redeemed once; a forged one is unknown
    for bad, code in ((token, "ExpiredTokenException"), ("forged", "InvalidTokenException")):
        with pytest.raises(ClientError) as refused:
            await client.resolve_customer(RegistrationToken=bad)
        assert refused.value.response["Error"]["Code"] == code


# -- registration: the fulfillment URL POST -> ResolveCustomer -> a REGISTRATION LifecycleEvent ---------


async def test_a_license_registration_links_the_license_subject_to_the_sellers_tenant(
    runtime: Runtime, stack: Any
) -> None:
    client = await runtime.aws_client("meteringmarketplace", retries={"total_max_attempts": 1})
    token = stack.metering.issue_token(PRODUCT, ACCOUNT, license_arn=LICENSE_A)
    form = aws_subscriptions.registration_form(registration_request(token, "tenant-0001"))
    event = await aws_subscriptions.register(form, client, HOUR.start)
    assert event.key == aws_subscriptions.license_subject(LICENSE_A)
    assert (event.tenant_id, event.effective_at) == ("tenant-0001", HOUR.start)
    assert event.source is EventSource.AWS_REGISTRATION
    assert (event.identity.aws_account_id, event.identity.aws_license_arn) == (ACCOUNT, LICENSE_A)
    assert event.identity.aws_customer_identifier is None
    assert event.identity.aws_agreement_id == stack.metering.licenses[LICENSE_A].agreement_id
    # registering alone bills nothing: AWS's License Updated event is what makes the license billable,
    # and a registration never revives a license that has been deprovisioned
    assert not billable_during(fold(event.key, [event]), HOUR)
    updated, gone = (
        aws_subscriptions.parse_eventbridge(
            agreement_event(
                detail_type,
                agreement_id="agmt-1",
                account_id=ACCOUNT,
                at=HOUR.start - timedelta(minutes=minutes),
                license_arn=LICENSE_A,
                product_code=PRODUCT,
            )
        )
        for detail_type, minutes in (
            ("License Updated - Manufacturer", 2),
            ("License Deprovisioned - Manufacturer", 1),
        )
    )
    state = fold(event.key, [updated, event])
    assert billable_during(state, HOUR)
    assert (state.tenant_id, state.identity.aws_license_arn) == ("tenant-0001", LICENSE_A)
    assert not billable_during(fold(event.key, [updated, gone, event]), HOUR)


async def test_a_legacy_registration_without_a_tenant_gets_a_derived_one(
    runtime: Runtime, stack: Any
) -> None:
    client = await runtime.aws_client("meteringmarketplace", retries={"total_max_attempts": 1})
    token = stack.metering.issue_token(PRODUCT, ACCOUNT, customer_identifier="X01EXAMPLEX")
    event = await aws_subscriptions.register(
        aws_subscriptions.registration_form(registration_request(token)), client, HOUR.start
    )
    assert event.key == aws_subscriptions.legacy_subject("X01EXAMPLEX", PRODUCT)
    assert event.tenant_id == "aws-X01EXAMPLEX"
    assert (event.identity.aws_customer_identifier, event.identity.aws_product_code) == (
        "X01EXAMPLEX",
        PRODUCT,
    )


async def test_a_forged_or_reused_registration_token_is_refused(runtime: Runtime, stack: Any) -> None:
    client = await runtime.aws_client("meteringmarketplace", retries={"total_max_attempts": 1})
    token = stack.metering.issue_token(PRODUCT, ACCOUNT, license_arn=LICENSE_A)
    await aws_subscriptions.register(aws_subscriptions.RegistrationForm(token, None), client, HOUR.start)
    for bad in (token, "forged-token"):
        with pytest.raises(aws_subscriptions.RegistrationRefusedError) as refused:
            await aws_subscriptions.register(
                aws_subscriptions.RegistrationForm(bad, "t1"), client, HOUR.start
            )
        assert refused.value.status == 401


async def test_resolve_customer_failing_is_unavailable_not_refused(runtime: Runtime, stack: Any) -> None:
    client = await runtime.aws_client("meteringmarketplace", retries={"total_max_attempts": 1})
    token = stack.metering.issue_token(PRODUCT, ACCOUNT, license_arn=LICENSE_A)
    stack.metering.faults.append("throttle")
    with pytest.raises(aws_subscriptions.RegistrationUnavailableError):
        await aws_subscriptions.register(aws_subscriptions.RegistrationForm(token, "t1"), client, HOUR.start)


async def test_a_legacy_customers_final_hour_is_accepted_within_the_hour_after_unsubscribe_pending(
    aws: MarketplaceClient, stack: Any
) -> None:
    # unsubscribe-pending at 13:40: the partial hour 13:00 is billable until 14:40, the hour 14:00 never
    stack.metering.subscribe(PRODUCT, "X01EXAMPLEX")
    stack.metering.unsubscribe(PRODUCT, "X01EXAMPLEX", HOUR.start + timedelta(minutes=40))
    legacy = customer("leaving", aws_customer_identifier="X01EXAMPLEX", aws_product_code=PRODUCT)
    stack.metering.clock = lambda: HOUR.start + timedelta(minutes=45)
    final = await aws.submit(legacy, HOUR, entries("leaving", CapacityGbHours=1))
    stack.metering.clock = lambda: HOUR.start + timedelta(minutes=70)
    later = await aws.submit(legacy, HOUR.shifted(1), entries("leaving", CapacityGbHours=1))
    stack.metering.clock = lambda: HOUR.start + timedelta(minutes=101)
    too_late = await aws.submit(legacy, HOUR, entries("leaving", DataTransferGb=1))
    assert [r.state for r in final + later + too_late] == [
        LedgerState.ACCEPTED,
        LedgerState.REJECTED,
        LedgerState.REJECTED,
    ]


# -- through the biller: PostgreSQL customers, the ledger, the real client, the emulator ---------------


async def add_license_customer(pool: Any, customer_id: str, license_arn: str) -> None:
    await pool.execute(
        """INSERT INTO customers (id, marketplace, status, active_from, aws_account_id, aws_license_arn)
           VALUES ($1, 'aws', 'active', $2, $3, $4)""",
        customer_id,
        datetime(2026, 1, 1, tzinfo=UTC),
        ACCOUNT,
        license_arn,
    )


async def test_the_biller_bills_two_licenses_of_one_account_as_two_subjects(
    runtime: Runtime, pool: Any, stack: Any
) -> None:
    # Given one AWS account with two agreements (licenses) of one product, each its own customer row
    await add_rates(pool)
    stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE_A)
    stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE_B)
    await add_license_customer(pool, "acct-team-1", LICENSE_A)
    await add_license_customer(pool, "acct-team-2", LICENSE_B)
    await add_usage(pool, "acct-team-1", HOUR.start + timedelta(minutes=5), "capacity_gb_hours", "2")
    await add_usage(pool, "acct-team-2", HOUR.start + timedelta(minutes=7), "capacity_gb_hours", "5")
    biller = await runtime.biller()
    biller.clock = within_window
    # When the hour is billed for both
    await biller.bill(message("acct-team-1"))
    await biller.bill(message("acct-team-2"))
    # Then AWS holds each license's own records, sent by LicenseArn without ProductCode, and the ledger
    # has each one's record id
    held = sorted((r.license_arn, r.dimension, r.quantity) for r in stack.metering.accepted())
    assert held == [
        (LICENSE_A, "CapacityGbHours", 2),
        (LICENSE_A, "DataTransferGb", 0),
        (LICENSE_B, "CapacityGbHours", 5),
        (LICENSE_B, "DataTransferGb", 0),
    ]
    assert all("ProductCode" not in body for body in stack.metering.last_bodies)
    for customer_id in ("acct-team-1", "acct-team-2"):
        rows = await ledger(pool, customer_id)
        assert {r["state"] for r in rows.values()} == {"accepted"}
    assert stack.metering.double_billed() == []


async def test_a_request_botocore_refuses_before_sending_is_rejected_not_left_maybe_sent(
    aws: MarketplaceClient, stack: Any
) -> None:
    # Given a quantity below the Metering model's minimum (0): botocore's parameter validation refuses the
    # request before a connection is opened
    stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE_A)
    subject = customer("lic-a", aws_account_id=ACCOUNT, aws_license_arn=LICENSE_A)
    calls = len(stack.metering.last_bodies)
    # When the hour is submitted
    results = await aws.submit(subject, HOUR, entries("lic-a", CapacityGbHours=-1))
    # Then nothing reached AWS, and the record is refused for good: not 'submitted' (maybe accepted), which
    # would keep it unsettled for ever and out of every carry
    assert len(stack.metering.last_bodies) == calls
    assert [(r.state, (r.reason or "").split(":")[0]) for r in results] == [
        (LedgerState.REJECTED, "ParamValidationError before sending")
    ]
