"""Google and Azure end to end: the Subscriptions function's handler code on the marketplaces' own
signed calls (a Pub/Sub push with a Google-signed OIDC token; Azure's webhook with an Entra token and the
landing page), the Dispatcher and the Biller on moto's SQS, real PostgreSQL, and the project's
emulators of the Procurement API + Service Control and of the SaaS fulfillment + metering APIs.

The signers sign with local keys whose public halves the emulators serve where Google's and Microsoft's
are (certificate URL, JWK Set); the handler verifies them with google-auth and PyJWT as in production.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import pytest

from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.domain.messages import parse_message
from billing.entrypoints.subscriptions import Subscriptions, handle
from billing_local.emulators.azure import AzureEmulator, AzureResource
from billing_local.emulators.azure import create_app as azure_app
from billing_local.emulators.azure_fulfillment import Fulfillment, WebhookSigner, landing_page_event
from billing_local.emulators.gcp import GcpEmulator
from billing_local.emulators.gcp import create_app as gcp_app
from billing_local.emulators.gcp_procurement import Procurement, PushSigner
from billing_local.emulators.server import BackgroundServer
from testkit import add_rates, add_usage

pytestmark = pytest.mark.e2e

T10 = datetime(2026, 11, 26, 10, tzinfo=UTC)
END = T10 + timedelta(hours=1, minutes=30)
TOKEN = "emulated-token"
SERVICE = "billing-demo.gcpmarketplace.example.com"
PROVIDER = "emulated-provider"
AUDIENCE = "https://billing.example.com/gcp/pubsub"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0b5c5ac4-5d24-4c2a-9c1a-7d0f6f3e1c11"
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
def clock() -> Clock:
    return Clock(T10)


async def bill_queue(subs: Subscriptions, sqs: Any, url: str) -> list[str]:
    biller = await subs.runtime.biller()
    billed = []
    while got := (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)).get("Messages", []):
        for m in got:
            message = parse_message(m["Body"])
            await biller.bill(message)
            billed.append(f"{message.customer_id}@{message.billing_period.start:%H}")
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return billed


async def dispatch_hour_after(subs: Subscriptions, clock: Clock, hour: datetime) -> None:
    clock.now = hour + timedelta(hours=1, minutes=20)
    await subs.runtime.dispatch({"source": "aws.events", "time": clock.now.strftime("%Y-%m-%dT%H:%M:%SZ")})


@pytest.fixture
async def functions(stack: Any, clock: Clock) -> AsyncIterator[tuple[Subscriptions, Any]]:
    runtime = Runtime(load_settings())
    runtime.clock = clock
    subs = Subscriptions(runtime)
    async with aioboto3.Session().client("sqs") as sqs:
        yield subs, sqs
    await subs.close()
    await runtime.close()


# -- Google ------------------------------------------------------------------------------------------


@pytest.fixture
def google(clock: Clock, monkeypatch: pytest.MonkeyPatch, stack: Any) -> Iterator[GcpEmulator]:
    emulator = GcpEmulator(
        services={SERVICE: None},
        fixed_tokens={TOKEN},
        clock=clock,
        procurement=Procurement(provider=PROVIDER, clock=clock),
        push_signer=PushSigner(audience=AUDIENCE),
    )
    with BackgroundServer(gcp_app(emulator)) as server:
        assert emulator.push_signer is not None
        for key, value in {
            "BILLING_GCP_SERVICE_CONTROL_URL": server.url,
            "BILLING_GCP_ACCESS_TOKEN": TOKEN,
            "BILLING_GCP_PUSH_AUDIENCE": AUDIENCE,
            "BILLING_GCP_PUSH_SERVICE_ACCOUNT": emulator.push_signer.email,
            "BILLING_GCP_PUSH_CERTS_URL": f"{server.url}/oauth2/v1/certs",
            "BILLING_GCP_PROVIDER_ID": PROVIDER,
            "BILLING_GCP_PROCUREMENT_URL": server.url,
            "BILLING_GCP_APPROVE_ACCOUNTS": "true",
            "BILLING_GCP_APPROVE_ENTITLEMENTS": "true",
        }.items():
            monkeypatch.setenv(key, value)
        yield emulator


async def push_published(subs: Subscriptions, google: GcpEmulator, start: int) -> int:
    """Deliver every notification published since ``start`` as Pub/Sub push does; the next start."""
    assert google.procurement is not None and google.push_signer is not None
    published = google.procurement.published
    while start < len(published):  # an approval publishes the next notification
        answer = await handle(subs, google.push_signer.http_api_event(published[start]))
        assert answer["statusCode"] in (200, 204), answer
        start += 1
    return start


async def test_google_entitlement_billed_cancelled_mid_hour_final_hour_then_nothing(
    functions: tuple[Subscriptions, Any], google: GcpEmulator, clock: Clock, stack: Any, pool: asyncpg.Pool
) -> None:
    subs, sqs = functions
    procurement = google.procurement
    assert procurement is not None
    await add_rates(pool, (("gcp", "capacity_gb_hours", "capacity_gb_hours", Decimal(1)),))
    # Given a Google account that signs up and orders the product: Google's own notifications
    procurement.sign_up("acct-1")
    procurement.purchase("ent-1", "acct-1", SERVICE, "basic")
    pushed = await push_published(subs, google, 0)
    assert procurement.entitlements["ent-1"].state == "ENTITLEMENT_ACTIVE"  # approved by the handler
    tenant = await pool.fetchval("SELECT customer_id FROM subscription_state WHERE subject_id = 'ent-1'")
    assert tenant == "gcp-ent-1"
    await add_usage(pool, tenant, T10 + timedelta(minutes=20), "capacity_gb_hours", "3")
    await add_usage(pool, tenant, END - timedelta(minutes=10), "capacity_gb_hours", "4")
    await add_usage(pool, tenant, END + timedelta(minutes=10), "capacity_gb_hours", "100")
    # When the hour is billed, then the entitlement is cancelled at 11:30
    await dispatch_hour_after(subs, clock, T10)
    assert await bill_queue(subs, sqs, stack.queues.url) == [f"{tenant}@10"]
    clock.now = END
    procurement.cancel("ent-1")
    clock.now = END + timedelta(minutes=2)
    pushed = await push_published(subs, google, pushed)
    # Then the partial 11:00 hour is reported at once, inside Google's hour, with the usage before 11:30
    assert await bill_queue(subs, sqs, stack.queues.url) == [f"{tenant}@11"]
    for hour in (T10 + timedelta(hours=h) for h in (1, 2, 3)):
        await dispatch_hour_after(subs, clock, hour)
        assert await bill_queue(subs, sqs, stack.queues.url) == []
    reports = sorted((r.start_time.hour, r.value, r.late) for r in google.records.values())
    assert reports == [(10, 3, False), (11, 4, False)]
    # When every notification is delivered again, newest first
    before = await pool.fetch(STATE)
    assert google.push_signer is not None
    for data in reversed(procurement.published):
        await handle(subs, google.push_signer.http_api_event(data))
    # Then nothing changes and nothing more is reported
    assert await pool.fetch(STATE) == before
    assert await bill_queue(subs, sqs, stack.queues.url) == []
    assert len(google.records) == 2


async def test_a_forged_google_push_is_refused_and_writes_nothing(
    functions: tuple[Subscriptions, Any], google: GcpEmulator, pool: asyncpg.Pool
) -> None:
    subs, _ = functions
    procurement, signer = google.procurement, google.push_signer
    assert procurement is not None and signer is not None
    data = procurement.purchase("ent-9", "acct-9", SERVICE, "basic")
    forged = signer.http_api_event(data)
    forged["headers"]["authorization"] = "Bearer " + signer.token(aud="https://attacker.example.com")
    answer = await handle(subs, forged)
    assert answer["statusCode"] in (401, 403)
    unsigned = signer.http_api_event(data)
    del unsigned["headers"]["authorization"]
    assert (await handle(subs, unsigned))["statusCode"] in (401, 403)
    assert await pool.fetchval("SELECT count(*) FROM subscription_events") == 0
    assert procurement.approvals == []


# -- Azure -------------------------------------------------------------------------------------------


@pytest.fixture
def azure(clock: Clock, monkeypatch: pytest.MonkeyPatch, stack: Any) -> Iterator[AzureEmulator]:
    resources: dict[str, AzureResource] = {}
    emulator = AzureEmulator(
        resources=resources,
        fixed_tokens={TOKEN},
        clock=clock,
        fulfillment=Fulfillment(clock=clock, resources=resources),
        webhook_signer=WebhookSigner(tenant_id=TENANT, audience=CLIENT_ID),
    )
    with BackgroundServer(azure_app(emulator)) as server:
        for key, value in {
            "BILLING_AZURE_METERING_URL": server.url,
            "BILLING_AZURE_ACCESS_TOKEN": TOKEN,
            "BILLING_AZURE_WEBHOOK_TENANT_ID": TENANT,
            "BILLING_AZURE_WEBHOOK_AUDIENCE": CLIENT_ID,
            "BILLING_AZURE_WEBHOOK_JWKS_URL": f"{server.url}/{TENANT}/discovery/v2.0/keys",
            "BILLING_AZURE_FULFILLMENT_URL": server.url,
        }.items():
            monkeypatch.setenv(key, value)
        yield emulator


async def test_azure_subscription_billed_unsubscribed_mid_hour_final_hour_then_nothing(
    functions: tuple[Subscriptions, Any], azure: AzureEmulator, clock: Clock, stack: Any, pool: asyncpg.Pool
) -> None:
    subs, sqs = functions
    fulfillment, signer = azure.fulfillment, azure.webhook_signer
    assert fulfillment is not None and signer is not None
    await add_rates(pool, (("azure", "api_calls", "api_calls", Decimal(1)),))
    # Given a purchase on Azure, landed on the seller's page as tenant "contoso" (resolve + activate)
    token = fulfillment.purchase("offer-1", "silver", quantity=5)
    subscription_id = fulfillment.purchase_tokens[token]
    azure.resources[subscription_id] = AzureResource(
        plan_id="silver", dimensions=("api_calls",), status="Pending"
    )
    answer = await handle(subs, landing_page_event(token, "contoso"))
    assert answer["statusCode"] == 200, answer
    await add_usage(pool, "contoso", T10 + timedelta(minutes=20), "api_calls", "3")
    await add_usage(pool, "contoso", END - timedelta(minutes=10), "api_calls", "4")
    await add_usage(pool, "contoso", END + timedelta(minutes=10), "api_calls", "100")
    await dispatch_hour_after(subs, clock, T10)
    assert await bill_queue(subs, sqs, stack.queues.url) == ["contoso@10"]
    # When the customer unsubscribes at 11:30 (Azure's webhook, checked against the Operations API)
    clock.now = END
    unsubscribe = fulfillment.notify(subscription_id, "Unsubscribe")
    clock.now = END + timedelta(minutes=2)
    assert (await handle(subs, signer.http_api_event(unsubscribe)))["statusCode"] == 200
    # Then the partial 11:00 hour goes out at once, and no later hour is billed
    assert await bill_queue(subs, sqs, stack.queues.url) == ["contoso@11"]
    for hour in (T10 + timedelta(hours=h) for h in (1, 2, 3)):
        await dispatch_hour_after(subs, clock, hour)
        assert await bill_queue(subs, sqs, stack.queues.url) == []
    held = sorted((e.hour.hour, e.quantity) for e in azure.accepted.values())
    assert held == [(10, 3), (11, 4)]
    # and the webhook delivered again changes nothing
    before = await pool.fetch(STATE)
    assert (await handle(subs, signer.http_api_event(unsubscribe)))["statusCode"] == 200
    assert await pool.fetch(STATE) == before


async def test_a_forged_azure_webhook_is_refused_and_writes_nothing(
    functions: tuple[Subscriptions, Any], azure: AzureEmulator, pool: asyncpg.Pool
) -> None:
    subs, _ = functions
    fulfillment, signer = azure.fulfillment, azure.webhook_signer
    assert fulfillment is not None and signer is not None
    token = fulfillment.purchase("offer-1", "silver")
    subscription_id = fulfillment.purchase_tokens[token]
    payload = fulfillment.notify(subscription_id, "Suspend")
    forged = signer.http_api_event(payload)
    forged["headers"]["authorization"] = "Bearer " + signer.token(tid="00000000-0000-0000-0000-000000000bad")
    assert (await handle(subs, forged))["statusCode"] in (401, 403)
    # an operation Azure never issued, with a genuine token
    invented = dict(payload) | {"id": "11111111-2222-3333-4444-555555555555"}
    assert (await handle(subs, signer.http_api_event(invented)))["statusCode"] in (401, 403)
    # a landing page token Microsoft does not know
    assert (await handle(subs, landing_page_event("forged", "contoso")))["statusCode"] in (401, 403)
    assert await pool.fetchval("SELECT count(*) FROM subscription_events") == 0
    assert await pool.fetchval("SELECT count(*) FROM customers") == 0
    assert fulfillment.activations == []


EVENTS = Path(__file__).resolve().parents[2] / "events"


@pytest.mark.parametrize(
    "sample",
    sorted(p.name for p in EVENTS.glob("*.json") if p.name.startswith(("gcp-pubsub-", "azure-"))),
)
async def test_the_sample_requests_signed_by_another_key_are_refused_and_write_nothing(
    functions: tuple[Subscriptions, Any],
    google: GcpEmulator,
    azure: AzureEmulator,
    pool: asyncpg.Pool,
    sample: str,
) -> None:
    # events/ samples carry tokens of a throwaway key (and Azure ids this emulator never issued)
    subs, _ = functions
    answer = await handle(subs, json.loads((EVENTS / sample).read_text()))
    assert answer["statusCode"] in (401, 403), answer
    assert await pool.fetchval("SELECT count(*) FROM subscription_events") == 0
