"""AWS end to end: the Subscriptions function's own handler code on AWS's events, the Dispatcher and
the Biller on the billing queue (moto's SQS), real PostgreSQL, and the AWS Marketplace Metering emulator
(ResolveCustomer, license-based BatchMeterUsage, the 1-hour final window after License Deprovisioned).

One clock drives everything (the functions' Runtime clock and the emulator's), moved by the test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aioboto3
import asyncpg
import pytest

from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.domain.messages import BillMessageV1, parse_message
from billing.entrypoints.subscriptions import Subscriptions, handle
from billing_local.emulators.aws_events import (
    SELLER_ACCOUNT,
    agreement_event,
    registration_request,
    sns_envelope,
    sqs_event,
)
from testkit import PRODUCT, add_rates, add_usage

pytestmark = pytest.mark.e2e

ACCOUNT = "845735284135"
L1 = "arn:aws:license-manager::794222239362:license:l-e52ca6f38bf84d0fafb8802ca15ac11a"
L2 = "arn:aws:license-manager::794222239362:license:l-e52ca6f38bf84d0fafb8802ca15ac11b"
T10 = datetime(2026, 11, 26, 10, tzinfo=UTC)
END = T10 + timedelta(hours=1, minutes=30)  # 11:30: deprovisioned mid-hour


STATE = (
    "SELECT marketplace, subject_id, customer_id, tenant_id, status, billable::text, ends_at, plans::text,"
    " identity::text, link_problem, events FROM subscription_state ORDER BY 1, 2"
)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def world(stack: Any, pool: asyncpg.Pool) -> AsyncIterator[tuple[Subscriptions, Clock, Any]]:
    clock = Clock(T10)
    stack.metering.clock = clock
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb"})
    await add_rates(pool)
    runtime = Runtime(load_settings())
    runtime.clock = clock
    subs = Subscriptions(runtime)
    async with aioboto3.Session().client("sqs") as sqs:
        yield subs, clock, sqs
    await subs.close()
    await runtime.close()


async def bill_queue(subs: Subscriptions, sqs: Any, url: str) -> list[str]:
    """Drain the billing queue through the real Biller (what the Biller function does per record)."""
    biller = await subs.runtime.biller()
    billed: list[str] = []
    while got := (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)).get("Messages", []):
        for m in got:
            message = parse_message(m["Body"])
            await biller.bill(message)
            billed.append(f"{message.customer_id}@{message.billing_period.start:%H}")
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return billed


async def dispatch_hour_after(subs: Subscriptions, clock: Clock, hour: datetime) -> None:
    """The scheduled Dispatcher run 20 minutes after ``hour`` ended (it bills ``hour``)."""
    clock.now = hour + timedelta(hours=1, minutes=20)
    await subs.runtime.dispatch({"source": "aws.events", "time": clock.now.strftime("%Y-%m-%dT%H:%M:%SZ")})


def license_event(kind: str, arn: str, at: datetime, agreement: str = "agmt-1") -> dict[str, Any]:
    return agreement_event(
        f"License {kind} - Manufacturer",
        agreement_id=agreement,
        account_id=ACCOUNT,
        at=at,
        license_arn=arn,
        product_code=PRODUCT,
    )


async def test_license_subscribe_bill_cancel_mid_hour_final_hour_and_nothing_after(
    world: tuple[Subscriptions, Clock, Any], stack: Any, pool: asyncpg.Pool
) -> None:
    subs, clock, sqs = world
    url = stack.queues.url
    # Given the buyer's license arrives as AWS's EventBridge event, then the buyer registers as "acme"
    stack.metering.add_license(PRODUCT, ACCOUNT, L1, "agmt-1")
    updated = license_event("Updated", L1, T10)
    await handle(subs, updated)
    clock.now = T10 + timedelta(minutes=5)
    token = stack.metering.issue_token(PRODUCT, ACCOUNT, license_arn=L1)
    answer = await handle(subs, registration_request(token, "acme", at=clock.now))
    assert answer["statusCode"] == 200
    # usage of acme in 10:00, in 11:00 before the end, and after the end
    await add_usage(pool, "acme", T10 + timedelta(minutes=30), "capacity_gb_hours", "3")
    await add_usage(pool, "acme", END - timedelta(minutes=20), "capacity_gb_hours", "2")
    await add_usage(pool, "acme", END + timedelta(minutes=10), "capacity_gb_hours", "100")
    # When 10:00 is billed by the scheduled run
    await dispatch_hour_after(subs, clock, T10)
    assert await bill_queue(subs, sqs, url) == ["acme@10"]
    # and the license is deprovisioned at 11:30; its event is handled at 11:31
    clock.now = END + timedelta(minutes=1)
    deprovisioned = license_event("Deprovisioned", L1, END)
    stack.metering.deprovision(L1, END)
    await handle(subs, deprovisioned)
    # Then the partial 11:00 hour is billed at once (final bill), within AWS's 1-hour final window
    assert await bill_queue(subs, sqs, url) == ["acme@11"]
    # and later runs bill nothing for 11:00 again, nor 12:00 or 13:00
    for hour in (T10 + timedelta(hours=h) for h in (1, 2, 3)):
        await dispatch_hour_after(subs, clock, hour)
        assert await bill_queue(subs, sqs, url) == []
    held = sorted(
        (r.timestamp.hour, r.dimension, r.quantity, r.license_arn)
        for r in stack.metering.accepted()
        if r.quantity
    )
    assert held == [(10, "CapacityGbHours", 3, L1), (11, "CapacityGbHours", 2, L1)]
    assert {r.timestamp.hour for r in stack.metering.accepted()} == {10, 11}
    assert stack.metering.double_billed() == []
    # When every event is delivered again, newest first
    before = await pool.fetch(STATE)
    calls = stack.metering.calls
    for event in (deprovisioned, updated):
        await handle(subs, event)
    assert await bill_queue(subs, sqs, url) == []
    # Then nothing changed: same state, no new marketplace record
    assert await pool.fetch(STATE) == before
    assert stack.metering.calls == calls


async def test_two_licenses_of_one_account_are_billed_as_two_subjects_with_license_records(
    world: tuple[Subscriptions, Clock, Any], stack: Any, pool: asyncpg.Pool
) -> None:
    subs, clock, sqs = world
    for n, arn in enumerate((L1, L2), 1):
        stack.metering.add_license(PRODUCT, ACCOUNT, arn, f"agmt-{n}")
        await handle(subs, license_event("Updated", arn, T10, agreement=f"agmt-{n}"))
    tenants = [r["id"] for r in await pool.fetch("SELECT id FROM customers ORDER BY id")]
    assert tenants == [
        f"aws-{ACCOUNT}-l-e52ca6f38bf84d0fafb8802ca15ac11a",
        f"aws-{ACCOUNT}-l-e52ca6f38bf84d0fafb8802ca15ac11b",
    ]
    for n, tenant in enumerate(tenants, 1):
        await add_usage(pool, tenant, T10 + timedelta(minutes=10), "capacity_gb_hours", str(n))
    await dispatch_hour_after(subs, clock, T10)
    await bill_queue(subs, sqs, stack.queues.url)
    held = sorted((r.license_arn, r.customer, r.quantity) for r in stack.metering.accepted() if r.quantity)
    assert held == [(L1, ACCOUNT, 1), (L2, ACCOUNT, 2)]
    assert all(body.get("ProductCode") is None for body in stack.metering.last_bodies)


async def test_legacy_sns_unsubscribe_pending_bills_the_final_partial_hour(
    world: tuple[Subscriptions, Clock, Any], stack: Any, pool: asyncpg.Pool
) -> None:
    subs, clock, sqs = world
    stack.metering.subscribe(PRODUCT, "CUST-9")
    subscribe = sqs_event(sns_envelope("subscribe-success", "CUST-9", PRODUCT, T10))
    assert (await handle(subs, subscribe))["batchItemFailures"] == []
    tenant = "aws-CUST-9"
    await add_usage(pool, tenant, T10 + timedelta(minutes=50), "capacity_gb_hours", "5")
    await add_usage(pool, tenant, END - timedelta(minutes=5), "capacity_gb_hours", "7")
    clock.now = END + timedelta(minutes=3)
    pending = sqs_event(sns_envelope("unsubscribe-pending", "CUST-9", PRODUCT, END))
    assert (await handle(subs, pending))["batchItemFailures"] == []
    # both hours go out at once: 10:00 (never dispatched yet) and the final 11:00 up to 11:30
    assert sorted(await bill_queue(subs, sqs, stack.queues.url)) == [f"{tenant}@10", f"{tenant}@11"]
    held = sorted((r.timestamp.hour, r.quantity) for r in stack.metering.accepted() if r.quantity)
    assert held == [(10, 5), (11, 7)]
    # the legacy request: ProductCode + CustomerIdentifier, never a LicenseArn
    assert all(b.get("ProductCode") == PRODUCT for b in stack.metering.last_bodies)
    assert SELLER_ACCOUNT  # the events were built for the seller's account


async def test_forged_aws_registration_and_foreign_topic_messages_are_refused_and_write_nothing(
    world: tuple[Subscriptions, Clock, Any], stack: Any, pool: asyncpg.Pool
) -> None:
    subs, clock, _ = world
    # a token AWS never issued, and a genuine one presented a second time (ResolveCustomer redeems once)
    forged = await handle(subs, registration_request("f" * 64, "acme", at=clock.now))
    assert forged["statusCode"] == 401
    token = stack.metering.issue_token(PRODUCT, ACCOUNT, license_arn=L1)
    assert (await handle(subs, registration_request(token, "acme", at=clock.now)))["statusCode"] == 200
    events = await pool.fetchval("SELECT count(*) FROM subscription_events")
    assert (await handle(subs, registration_request(token, "evil", at=clock.now)))["statusCode"] == 401
    # a malformed body is a 400
    broken = registration_request(token, "acme", at=clock.now)
    broken["body"], broken["isBase64Encoded"] = "not a form", False
    assert (await handle(subs, broken))["statusCode"] == 400
    # an SNS message from a topic that is not the seller's is refused (the record fails, nothing written)
    subs.settings = type(subs.settings)(
        BILLING_AWS_SNS_TOPIC_ARNS="arn:aws:sns:us-east-1:287250355862:aws-mp-subscription-notification-billingdemo0001"
    )
    foreign = sqs_event(
        sns_envelope(
            "subscribe-success",
            "CUST-X",
            PRODUCT,
            T10,
            topic_arn="arn:aws:sns:us-east-1:999999999999:aws-mp-subscription-notification-evil",
        )
    )
    assert len((await handle(subs, foreign))["batchItemFailures"]) == 1
    assert await pool.fetchval("SELECT count(*) FROM subscription_events") == events
    assert await pool.fetchval("SELECT count(*) FROM customers WHERE id = 'evil'") == 0


async def test_a_cancellation_arriving_during_a_run_bills_each_hour_once(
    world: tuple[Subscriptions, Clock, Any], stack: Any, pool: asyncpg.Pool
) -> None:
    subs, clock, sqs = world
    url = stack.queues.url
    # Given two licensed customers billed from 10:00
    for n, arn in enumerate((L1, L2), 1):
        stack.metering.add_license(PRODUCT, ACCOUNT, arn, f"agmt-{n}")
        await handle(subs, license_event("Updated", arn, T10, agreement=f"agmt-{n}"))
    tenants = [r["id"] for r in await pool.fetch("SELECT id FROM customers ORDER BY id")]
    for tenant in tenants:
        await add_usage(pool, tenant, T10 + timedelta(minutes=10), "capacity_gb_hours", "2")
        await add_usage(pool, tenant, END - timedelta(minutes=10), "capacity_gb_hours", "5")
    # When the 11:20 run has dispatched 10:00 and, before the Biller took its messages, L1 is
    # deprovisioned at 11:30 (its final bills join the same queue)
    await dispatch_hour_after(subs, clock, T10)
    clock.now = END + timedelta(minutes=1)
    stack.metering.deprovision(L1, END)
    outcome = await handle(subs, license_event("Deprovisioned", L1, END))
    assert outcome == {"recorded": 1}
    billed = await bill_queue(subs, sqs, url)
    # Then L1's 10:00 arrived twice (the run's message and the final bills') and was billed once, its
    # partial 11:00 once; L2 only for 10:00; and later runs add nothing
    assert sorted(billed) == sorted(
        [f"{tenants[0]}@10", f"{tenants[0]}@10", f"{tenants[0]}@11", f"{tenants[1]}@10"]
    )
    for hour in (T10 + timedelta(hours=h) for h in (1, 2)):
        await dispatch_hour_after(subs, clock, hour)
        billed = await bill_queue(subs, sqs, url)
        assert billed == ([f"{tenants[1]}@11"] if hour.hour == 11 else [f"{tenants[1]}@12"])
    held = sorted(
        (r.license_arn == L1, r.timestamp.hour, r.quantity) for r in stack.metering.accepted() if r.quantity
    )
    assert held == [(False, 10, 2), (False, 11, 5), (True, 10, 2), (True, 11, 5)]
    counts = await pool.fetch(
        "SELECT customer_id, period, dimension, count(*) AS n FROM ledger GROUP BY 1, 2, 3"
    )
    assert {r["n"] for r in counts} == {1}


async def test_a_license_for_a_legacy_customers_account_and_product_bills_each_hour_once(
    world: tuple[Subscriptions, Clock, Any], stack: Any, pool: asyncpg.Pool
) -> None:
    """#13: never both identities for one customer and hour (AWS bills both). A legacy subject
    (CustomerIdentifier + ProductCode) and, from 11:20, a license subject of the same AWS account and
    product (AWS moving the listing to licenses): 10:00 is billed by the legacy identity only, 11:00
    and 12:00 by the license only, through the dispatcher and the Biller."""
    subs, clock, sqs = world
    stack.metering.subscribe(PRODUCT, "CUST-7")
    stack.metering.customer_accounts["CUST-7"] = ACCOUNT
    subscribe = sqs_event(sns_envelope("subscribe-success", "CUST-7", PRODUCT, T10, account_id=ACCOUNT))
    assert (await handle(subs, subscribe))["batchItemFailures"] == []
    legacy = "aws-CUST-7"
    licensed_at = T10 + timedelta(hours=1, minutes=20)
    stack.metering.add_license(PRODUCT, ACCOUNT, L1, "agmt-1")
    clock.now = licensed_at
    await handle(subs, license_event("Updated", L1, licensed_at))
    license_tenant = f"aws-{ACCOUNT}-l-e52ca6f38bf84d0fafb8802ca15ac11a"
    for hour, quantity in ((0, "2"), (1, "4"), (2, "6")):
        await add_usage(pool, legacy, T10 + timedelta(hours=hour, minutes=10), "capacity_gb_hours", quantity)
    for hour, quantity in ((1, "3"), (2, "5")):
        at = T10 + timedelta(hours=hour, minutes=40)
        await add_usage(pool, license_tenant, at, "capacity_gb_hours", quantity)
    billed: list[str] = []
    for hour in range(3):
        await dispatch_hour_after(subs, clock, T10 + timedelta(hours=hour))
        billed += await bill_queue(subs, sqs, stack.queues.url)
    assert sorted(billed) == sorted([f"{legacy}@10", f"{license_tenant}@11", f"{license_tenant}@12"])
    held = sorted(
        (r.timestamp.hour, r.quantity, r.license_arn) for r in stack.metering.accepted() if r.quantity
    )
    assert held == [(10, 2, None), (11, 3, L1), (12, 5, L1)]
    assert stack.metering.double_billed() == []
    # and a bill message for the legacy subject's 11:00 (a redelivery, an operator's rerun) bills nothing
    biller = await subs.runtime.biller()
    outcome = await biller.bill(
        BillMessageV1(customer_id=legacy, period=T10 + timedelta(hours=1), run_id=uuid.uuid4())
    )
    assert outcome.superseded
    assert stack.metering.double_billed() == []


async def test_a_late_license_leaves_an_hour_its_legacy_identity_already_billed(
    world: tuple[Subscriptions, Clock, Any], stack: Any, pool: asyncpg.Pool
) -> None:
    """#13, the other order: the legacy subject billed 10:00, then a license of the same account and
    product arrives at 11:30 effective from 10:40. A bill for the license's 10:00 (a final bill, a
    resend) bills nothing: AWS would charge the hour twice."""
    subs, clock, sqs = world
    stack.metering.subscribe(PRODUCT, "CUST-8")
    stack.metering.customer_accounts["CUST-8"] = ACCOUNT
    subscribe = sqs_event(sns_envelope("subscribe-success", "CUST-8", PRODUCT, T10, account_id=ACCOUNT))
    assert (await handle(subs, subscribe))["batchItemFailures"] == []
    await add_usage(pool, "aws-CUST-8", T10 + timedelta(minutes=10), "capacity_gb_hours", "2")
    await dispatch_hour_after(subs, clock, T10)
    assert await bill_queue(subs, sqs, stack.queues.url) == ["aws-CUST-8@10"]
    stack.metering.add_license(PRODUCT, ACCOUNT, L1, "agmt-1")
    clock.now = T10 + timedelta(hours=1, minutes=30)
    await handle(subs, license_event("Updated", L1, T10 + timedelta(minutes=40)))
    license_tenant = f"aws-{ACCOUNT}-l-e52ca6f38bf84d0fafb8802ca15ac11a"
    await add_usage(pool, license_tenant, T10 + timedelta(minutes=50), "capacity_gb_hours", "3")
    biller = await subs.runtime.biller()
    outcome = await biller.bill(BillMessageV1(customer_id=license_tenant, period=T10, run_id=uuid.uuid4()))
    assert outcome.superseded
    assert stack.metering.double_billed() == []
