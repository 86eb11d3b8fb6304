"""Subscriptions against a real PostgreSQL, moto's SQS and the AWS Marketplace Metering emulator.

Events are recorded through the service (append + fold in one transaction), the dispatcher bills what
the recorded state says, and a subscription that ends mid-hour has its final partial hour billed by
the real Biller before the hour is over, with the usage up to the end instant only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aioboto3
import asyncpg
import pytest

from billing.adapters.postgres import PostgresDispatchRepository, PostgresUsageSource
from billing.adapters.postgres_reconcile import PostgresReconcileReader
from billing.adapters.postgres_subscriptions import PostgresSubscriptionRepository
from billing.adapters.sqs import SqsQueue
from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.domain.errors import BadMessageError
from billing.domain.messages import BillMessageV1, parse_message
from billing.domain.model import Marketplace, Period
from billing.domain.subscriptions import (
    EventSource,
    Identity,
    LifecycleEvent,
    LifecycleKind,
    SubjectKey,
)
from billing.services.dispatch import dispatch
from billing.services.reconcile import reconcile
from billing.services.subscriptions import SubscriptionService
from testkit import PRODUCT, add_rates, add_usage

T0 = datetime(2026, 11, 26, 10, tzinfo=UTC)
END = T0 + timedelta(hours=3, minutes=20)  # 13:20, inside the 13:00 hour
NOW = END + timedelta(minutes=2)  # the end has passed, its hour has not
LEGACY = SubjectKey(Marketplace.AWS, f"CUST-1/{PRODUCT}")


def ev(
    kind: LifecycleKind,
    at: datetime,
    eid: str,
    key: SubjectKey = LEGACY,
    ordering: datetime | None = None,
    **extra: Any,
) -> LifecycleEvent:
    return LifecycleEvent(
        key=key,
        kind=kind,
        effective_at=at,
        ordering=ordering or at,
        event_id=eid,
        source=EventSource.AWS_SNS,
        raw={"action": kind.value, "id": eid},
        **extra,
    )


SUBSCRIBED = ev(
    LifecycleKind.ACTIVE,
    T0,
    "sns-1",
    tenant_id="tenant-a",
    identity=Identity(aws_customer_identifier="CUST-1", aws_product_code=PRODUCT),
)
ENDING = ev(LifecycleKind.ENDING, END, "sns-2")


@pytest.fixture
async def sqs(stack: Any) -> AsyncIterator[Any]:
    async with aioboto3.Session().client("sqs") as client:
        yield client


@pytest.fixture
def service(pool: asyncpg.Pool, stack: Any, sqs: Any) -> SubscriptionService:
    return SubscriptionService(
        PostgresSubscriptionRepository(pool), SqsQueue(sqs, stack.queues.url), clock=lambda: NOW
    )


async def drain(sqs: Any, url: str) -> list[BillMessageV1]:
    out: list[BillMessageV1] = []
    while got := (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)).get("Messages", []):
        out += [parse_message(m["Body"]) for m in got]
        for m in got:
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return out


async def snapshot(pool: asyncpg.Pool) -> tuple[Any, ...]:
    state = await pool.fetch(
        "SELECT marketplace, subject_id, customer_id, tenant_id, status, billable::text, ends_at, plans,"
        " identity, link_problem, events FROM subscription_state ORDER BY 1, 2"
    )
    rows = await pool.fetch(
        "SELECT id, marketplace, status, active_from, active_until, aws_customer_identifier,"
        " aws_account_id, aws_product_code, aws_license_arn FROM customers ORDER BY id"
    )
    return tuple(tuple(r) for r in state), tuple(tuple(r) for r in rows)


async def test_a_subscription_creates_the_tenants_customer_and_keeps_every_event(
    service: SubscriptionService, pool: asyncpg.Pool
) -> None:
    # When the subscribe event arrives
    outcome = await service.record(SUBSCRIBED)
    # Then the subject is billed as the tenant's customers row, with the legacy identity
    assert outcome.appended and outcome.recorded.customer_id == "tenant-a"
    row = await pool.fetchrow("SELECT * FROM customers WHERE id = 'tenant-a'")
    assert (row["status"], row["active_from"], row["active_until"]) == ("active", T0, None)
    assert (row["aws_customer_identifier"], row["aws_product_code"], row["aws_license_arn"]) == (
        "CUST-1",
        PRODUCT,
        None,
    )
    # and the event is in the history as received
    raw = await pool.fetchval("SELECT raw FROM subscription_events WHERE event_id = 'sns-1'")
    assert raw == '{"id": "sns-1", "action": "active"}'


async def test_replayed_and_reordered_events_change_nothing(
    service: SubscriptionService, pool: asyncpg.Pool, stack: Any, sqs: Any
) -> None:
    # Given the lifecycle recorded in order
    suspended = ev(LifecycleKind.SUSPENDED, T0 + timedelta(hours=1), "sns-s")
    reinstated = ev(LifecycleKind.REINSTATED, T0 + timedelta(hours=2), "sns-r")
    for event in (SUBSCRIBED, suspended, reinstated, ENDING):
        await service.record(event)
    in_order = await snapshot(pool)
    # When every event is delivered again, newest first
    for event in (ENDING, reinstated, suspended, SUBSCRIBED):
        assert not (await service.record(event)).appended
    # Then nothing changed and the history holds each event once
    assert await snapshot(pool) == in_order
    assert await pool.fetchval("SELECT count(*) FROM subscription_events") == 4
    await drain(sqs, stack.queues.url)


async def test_the_same_events_in_another_order_give_the_same_state(
    service: SubscriptionService, pool: asyncpg.Pool, database_url: str
) -> None:
    # Given the cancellation delivered before the subscription
    await service.record(ENDING)
    await service.record(SUBSCRIBED)
    reordered = await pool.fetchrow(
        "SELECT status, billable::text AS b, ends_at, customer_id FROM subscription_state"
    )
    customer = await pool.fetchrow("SELECT status, active_from, active_until FROM customers")
    # Then the state is the one of the marketplace's order
    assert (reordered["status"], reordered["ends_at"], reordered["customer_id"]) == ("ended", END, "tenant-a")
    assert reordered["b"] == '{["2026-11-26 10:00:00+00","2026-11-26 13:20:00+00")}'
    assert tuple(customer) == ("cancelled", T0, END)


async def test_the_history_is_append_only(service: SubscriptionService, pool: asyncpg.Pool) -> None:
    await service.record(SUBSCRIBED)
    with pytest.raises(asyncpg.exceptions.RaiseError, match="append-only"):
        await pool.execute("UPDATE subscription_events SET kind = 'ended'")
    with pytest.raises(asyncpg.exceptions.RaiseError, match="append-only"):
        await pool.execute("DELETE FROM subscription_events")


async def test_a_tenant_already_billed_as_another_subject_is_not_linked_twice(
    service: SubscriptionService, pool: asyncpg.Pool
) -> None:
    # Given tenant-a billed for one AWS license
    await service.record(SUBSCRIBED)
    # When a second agreement names the same tenant
    other = SubjectKey(Marketplace.AWS, "arn:aws:license-manager::123456789012:license:l-2")
    outcome = await service.record(
        ev(
            LifecycleKind.ACTIVE,
            T0,
            "eb-2",
            key=other,
            tenant_id="tenant-a",
            identity=Identity(aws_account_id="123456789012", aws_license_arn=other.subject_id),
        )
    )
    # Then it is kept, not billed, with the reason for an operator; the first subject is untouched
    assert outcome.recorded.customer_id is None
    assert "already billed as another subject (aws:CUST-1/" in (outcome.recorded.link_problem or "")
    assert await pool.fetchval("SELECT count(*) FROM customers") == 1


async def test_two_licenses_of_one_account_are_two_customers_with_license_identity(
    service: SubscriptionService, pool: asyncpg.Pool
) -> None:
    for n in (1, 2):
        arn = f"arn:aws:license-manager::123456789012:license:l-{n}"
        await service.record(
            ev(
                LifecycleKind.ACTIVE,
                T0,
                f"eb-{n}",
                key=SubjectKey(Marketplace.AWS, arn),
                tenant_id=f"tenant-{n}",
                identity=Identity(aws_account_id="123456789012", aws_license_arn=arn),
            )
        )
    rows = await pool.fetch(
        "SELECT id, aws_account_id, aws_license_arn, aws_product_code, aws_customer_identifier"
        " FROM customers ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        (f"tenant-{n}", "123456789012", f"arn:aws:license-manager::123456789012:license:l-{n}", None, None)
        for n in (1, 2)
    ]


async def test_the_dispatcher_bills_only_hours_the_subject_was_active_during(
    service: SubscriptionService, pool: asyncpg.Pool, stack: Any, sqs: Any
) -> None:
    # Given a subject suspended 11:00-12:30 and ended at 13:20
    for event in (
        SUBSCRIBED,
        ev(LifecycleKind.SUSPENDED, T0 + timedelta(hours=1), "sns-s"),
        ev(LifecycleKind.REINSTATED, T0 + timedelta(hours=2, minutes=30), "sns-r"),
        ENDING,
    ):
        await service.record(event)
    await drain(sqs, stack.queues.url)  # the final bills, looked at in the next test
    repo, queue = PostgresDispatchRepository(pool), SqsQueue(sqs, stack.queues.url)
    billed = {}
    # When the hours 10:00 to 14:00 are dispatched
    for h in range(5):
        period = Period(T0 + timedelta(hours=h))
        await dispatch(period, repo, queue)
        billed[period.start.hour] = [m.customer_id for m in await drain(sqs, stack.queues.url)]
    # Then 10:00, 12:00 (active from 12:30) and 13:00 (until 13:20) are billed; 11:00 and 14:00 are not
    assert billed == {10: ["tenant-a"], 11: [], 12: ["tenant-a"], 13: ["tenant-a"], 14: []}


async def test_an_end_mid_hour_bills_the_partial_hour_at_once_with_usage_up_to_the_end(
    service: SubscriptionService, pool: asyncpg.Pool, stack: Any, sqs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a subscribed customer with usage before and after its end at 13:20
    await add_rates(pool)
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb"})
    stack.metering.subscribe(PRODUCT, "CUST-1")
    stack.metering.clock = lambda: NOW
    await service.record(SUBSCRIBED)
    await add_usage(pool, "tenant-a", END - timedelta(minutes=10), "capacity_gb_hours", "4")
    await add_usage(pool, "tenant-a", END + timedelta(minutes=5), "capacity_gb_hours", "100")
    # When the unsubscribe-pending event arrives at 13:22, before the hour is over
    outcome = await service.record(ENDING)
    messages = await drain(sqs, stack.queues.url)
    # Then bills were enqueued for 10:00-12:00 and a final bill for 13:00 up to 13:20
    assert outcome.final_bills == 4
    assert sorted((m.billing_period.start.hour, m.final_until) for m in messages) == [
        (10, None),
        (11, None),
        (12, None),
        (13, END),
    ]
    final = next(m for m in messages if m.final_until is not None)
    monkeypatch.setenv("BILLING_MARKETPLACE_ATTEMPTS", "2")
    runtime = Runtime(load_settings())
    try:
        biller = await runtime.biller()
        biller.clock = lambda: NOW
        # and the Biller bills the final hour now, with the 4 GB-hours before the end only
        await biller.bill(final)
        # while an ordinary message for the same unfinished hour is still refused
        with pytest.raises(BadMessageError, match="has not ended"):
            await biller.bill(BillMessageV1(customer_id="tenant-a", period=final.period, run_id=final.run_id))
    finally:
        await runtime.close()
    accepted = [(r.dimension, r.quantity) for r in stack.metering.accepted() if r.timestamp.hour == 13]
    assert sorted(accepted) == [("CapacityGbHours", 4), ("DataTransferGb", 0)]
    # and reconcile reports the 100 GB-hours after the end as unbillable, never sent, and nothing lost
    result = await reconcile(
        PostgresReconcileReader(pool),
        PostgresUsageSource(pool),
        Period(T0 + timedelta(hours=3)),
        Period(T0 + timedelta(hours=4)),
        lookback_hours=24,
        settle=timedelta(minutes=15),
        now=NOW + timedelta(hours=2),
    )
    line = next(x for x in result.lines if x.dimension == "CapacityGbHours")
    assert (line.source, line.billed) == (4, 4)
    after = [d for d in line.differences if d.kind == "unbillable after end"]
    assert [(d.amount, d.explained, d.in_sum) for d in after] == [(100, True, False)]
    assert "never sent" in after[0].reason
    assert result.clean


async def test_a_final_bill_before_its_end_instant_or_after_a_reinstatement_bills_nothing(
    service: SubscriptionService, pool: asyncpg.Pool, stack: Any, sqs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_rates(pool)
    await service.record(SUBSCRIBED)
    await service.record(ENDING)
    final = next(m for m in await drain(sqs, stack.queues.url) if m.final_until is not None)
    monkeypatch.setenv("BILLING_MARKETPLACE_ATTEMPTS", "2")
    runtime = Runtime(load_settings())
    try:
        biller = await runtime.biller()
        # a final bill is valid only once its end instant has passed
        biller.clock = lambda: END - timedelta(minutes=1)
        with pytest.raises(BadMessageError, match="has not passed"):
            await biller.bill(final)
        # and the customer re-subscribed (a newer event) before the final bill ran: it does nothing
        await service.record(ev(LifecycleKind.ACTIVE, NOW, "sns-3"))
        biller.clock = lambda: NOW
        outcome = await biller.bill(final)
    finally:
        await runtime.close()
    assert outcome.stale_final_bill and not outcome.entries
    assert stack.metering.calls == 0
    assert await pool.fetchval("SELECT count(*) FROM ledger") == 0


async def test_concurrent_deliveries_of_one_subjects_events_fold_every_event(
    service: SubscriptionService, pool: asyncpg.Pool
) -> None:
    events = [SUBSCRIBED] + [
        ev(LifecycleKind.QUANTITY_CHANGED, T0 + timedelta(minutes=i), f"q-{i}", quantity=i)
        for i in range(1, 9)
    ]
    await asyncio.gather(*(service.record(e) for e in events))
    assert await pool.fetchval("SELECT events FROM subscription_state") == 9
    plans = await pool.fetchval("SELECT plans FROM subscription_state")
    assert '"quantity": 8' in plans


async def test_a_plan_change_rates_each_hour_with_the_plan_in_force_during_it(
    service: SubscriptionService, pool: asyncpg.Pool, stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#13: a plan change moves the subject's dimensions/rates from the hour it takes effect. Subscribed
    on plan "basic" at 10:00, changed to "pro" at 13:00: hour 12 is billed in basic's dimension and
    rate, hour 13 in pro's, by the real Biller; a customer without a plan keeps the default rates."""
    # Given a rate card with a default plan and two plans that bill the same metric differently
    await add_rates(pool)
    await pool.executemany(
        "INSERT INTO rate_card (marketplace, plan, metric, dimension, factor) VALUES ($1, $2, $3, $4, $5)",
        [
            ("aws", "basic", "capacity_gb_hours", "BasicGbHours", 1),
            ("aws", "pro", "capacity_gb_hours", "ProGbHours", 3),
        ],
    )
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb", "BasicGbHours", "ProGbHours"})
    stack.metering.subscribe(PRODUCT, "CUST-1")
    await service.record(
        ev(
            LifecycleKind.ACTIVE,
            T0,
            "sns-p1",
            plan="basic",
            tenant_id="tenant-a",
            identity=Identity(aws_customer_identifier="CUST-1", aws_product_code=PRODUCT),
        )
    )
    change = T0 + timedelta(hours=3)  # 13:00
    await service.record(ev(LifecycleKind.PLAN_CHANGED, change, "sns-p2", plan="pro"))
    await add_usage(pool, "tenant-a", change - timedelta(minutes=30), "capacity_gb_hours", "5")
    await add_usage(pool, "tenant-a", change + timedelta(minutes=30), "capacity_gb_hours", "7")
    now = change + timedelta(hours=1, minutes=20)
    stack.metering.clock = lambda: now
    monkeypatch.setenv("BILLING_MARKETPLACE_ATTEMPTS", "2")
    runtime = Runtime(load_settings())
    try:
        biller = await runtime.biller()
        biller.clock = lambda: now
        # When hours 12 and 13 are billed
        for hour in (change - timedelta(hours=1), change):
            await biller.bill(BillMessageV1(customer_id="tenant-a", period=hour, run_id=uuid.uuid4()))
    finally:
        await runtime.close()
    # Then hour 12 went out in basic's dimension at basic's rate, hour 13 in pro's at pro's rate
    accepted = sorted((r.timestamp.hour, r.dimension, r.quantity) for r in stack.metering.accepted())
    assert accepted == [(12, "BasicGbHours", 5), (13, "ProGbHours", 21)]
    # and reconcile rates each hour with the same plan: nothing differs
    result = await reconcile(
        PostgresReconcileReader(pool),
        PostgresUsageSource(pool),
        Period(change - timedelta(hours=1)),
        Period(change),
        lookback_hours=24,
        settle=timedelta(minutes=15),
        now=now,
    )
    assert {(x.dimension, x.source, x.billed) for x in result.lines} == {
        ("BasicGbHours", 5, 5),
        ("ProGbHours", 21, 21),
    }
    assert result.clean
