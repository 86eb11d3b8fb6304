"""The subscription lifecycle, shown by `billing demo` (#13): one customer per marketplace subscribes
through the emulated marketplace's own events, is billed for an hour, then unsubscribes mid-hour and
gets its final partial hour billed at once, through the real Subscriptions handler code, Dispatcher and
Biller.

Google's and Azure's lifecycle emulators (Procurement API + a Pub/Sub push signer; SaaS fulfillment +
a webhook signer) run here beside the local stack's metering emulators; the AWS metering emulator of
the stack also answers ResolveCustomer and knows licenses. One clock drives the functions and every
emulator: it starts at the beginning of the hour before ``now`` and is moved step by step.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rich.console import Console

from billing.domain.model import hour_floor

if TYPE_CHECKING:
    from collections.abc import Iterator

    from billing_local.stack import LocalStack

console = Console(soft_wrap=True)  # a line is whole at any width: it is read and grepped

ACCOUNT = "845735284135"
LICENSE = "arn:aws:license-manager::794222239362:license:l-0d5a7e1c9b2f4e6a8c0b1d3f5e7a9c1b"
PRODUCT = "demoproduct0001"
SERVICE = "billing-demo.gcpmarketplace.example.com"
AUDIENCE = "https://billing.example.com/gcp/pubsub"
PROVIDER = "demo-provider"
ENTRA_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
ENTRA_APP = "0b5c5ac4-5d24-4c2a-9c1a-7d0f6f3e1c11"
# the demo's own rate card rows for capacity (billing_local.seed.RATE_CARD), added when missing
RATES = (
    ("aws", "capacity_gb_hours", "CapacityGbHours", Decimal(1)),
    ("gcp", "capacity_gb_hours", "capacity_gb_hours", Decimal(1)),
    ("azure", "capacity_gb_hours", "capacity", Decimal(1)),
)
AWS_DIMENSIONS = {"CapacityGbHours", "DataTransferGb", "SnapshotStorage100GbHours"}
AZURE_DIMENSIONS = ("capacity", "transfer", "snapshots")


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Lifecycle:
    """What the lifecycle run did, for the summary and for tests."""

    billed: list[str] = field(default_factory=list)
    final: list[str] = field(default_factory=list)
    held: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


@contextlib.contextmanager
def lifecycle_emulators(stack: LocalStack, clock: Clock) -> Iterator[tuple[Any, Any, dict[str, str]]]:
    """Google's and Azure's emulators with their lifecycle APIs; the environment that points at them."""
    import secrets

    from billing_local.emulators import azure, gcp
    from billing_local.emulators.azure_fulfillment import Fulfillment, WebhookSigner
    from billing_local.emulators.gcp_procurement import Procurement, PushSigner
    from billing_local.emulators.server import BackgroundServer

    token = secrets.token_urlsafe(24)
    google = gcp.GcpEmulator(
        services={SERVICE: None},
        fixed_tokens={token},
        clock=clock,
        procurement=Procurement(provider=PROVIDER, clock=clock),
        push_signer=PushSigner(audience=AUDIENCE),
    )
    resources: dict[str, Any] = {}
    microsoft = azure.AzureEmulator(
        resources=resources,
        fixed_tokens={token},
        clock=clock,
        fulfillment=Fulfillment(clock=clock, resources=resources),
        webhook_signer=WebhookSigner(tenant_id=ENTRA_TENANT, audience=ENTRA_APP),
    )
    with (
        BackgroundServer(gcp.create_app(google)) as g,
        BackgroundServer(azure.create_app(microsoft)) as a,
    ):
        assert google.push_signer is not None
        env = {
            "BILLING_GCP_SERVICE_CONTROL_URL": g.url,
            "BILLING_GCP_ACCESS_TOKEN": token,
            "BILLING_GCP_PUSH_AUDIENCE": AUDIENCE,
            "BILLING_GCP_PUSH_SERVICE_ACCOUNT": google.push_signer.email,
            "BILLING_GCP_PUSH_CERTS_URL": f"{g.url}/oauth2/v1/certs",
            "BILLING_GCP_PROVIDER_ID": PROVIDER,
            "BILLING_GCP_PROCUREMENT_URL": g.url,
            "BILLING_GCP_APPROVE_ACCOUNTS": "true",
            "BILLING_GCP_APPROVE_ENTITLEMENTS": "true",
            "BILLING_AZURE_METERING_URL": a.url,
            "BILLING_AZURE_ACCESS_TOKEN": token,
            "BILLING_AZURE_WEBHOOK_TENANT_ID": ENTRA_TENANT,
            "BILLING_AZURE_WEBHOOK_AUDIENCE": ENTRA_APP,
            "BILLING_AZURE_WEBHOOK_JWKS_URL": f"{a.url}/{ENTRA_TENANT}/discovery/v2.0/keys",
            "BILLING_AZURE_FULFILLMENT_URL": a.url,
        }
        stack.metering.clock = clock
        yield google, microsoft, env


async def _bill_queue(subs: Any, sqs: Any, url: str) -> list[str]:
    """Drain the billing queue and every lane's (final bills go to the subject's lane) through the real
    Biller, as the Biller function does per record."""
    from billing.domain.messages import parse_message
    from billing.domain.model import Marketplace

    biller = await subs.runtime.biller()
    billed = []
    urls = {url} | {u for m in Marketplace if (u := subs.runtime.settings.lane_queue_url(m.value))}
    for queue_url in sorted(urls):
        billed += await _drain(biller, sqs, queue_url, parse_message)
    return billed


async def _drain(biller: Any, sqs: Any, url: str, parse_message: Any) -> list[str]:
    billed = []
    while got := (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)).get("Messages", []):
        for m in got:
            message = parse_message(m["Body"])
            await biller.bill(message)
            final = " (final, up to the end instant)" if message.final_until else ""
            billed.append(f"{message.customer_id} {message.billing_period.start:%H:%M}{final}")
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return billed


async def run_lifecycle(stack: LocalStack, google: Any, microsoft: Any, clock: Clock) -> Lifecycle:
    """Subscribe one customer per marketplace, bill an hour, unsubscribe each mid-hour: final bills."""
    import aioboto3
    import asyncpg

    from billing.adapters.sqs import SqsQueue
    from billing.bootstrap import Runtime
    from billing.config import load_settings
    from billing.domain.messages import BillMessageV1
    from billing.entrypoints.subscriptions import Subscriptions, handle
    from billing_local.emulators.aws_events import agreement_event, registration_request
    from billing_local.emulators.azure_fulfillment import landing_page_event

    done = Lifecycle()
    previous = clock.now  # the start of the hour before the current one
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.executemany(
            "INSERT INTO rate_card (marketplace, metric, dimension, factor) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT DO NOTHING",
            RATES,
        )
    finally:
        await conn.close()
    runtime = Runtime(load_settings())
    runtime.clock = clock
    subs = Subscriptions(runtime)
    try:
        async with aioboto3.Session().client("sqs") as sqs:
            # subscribe: AWS's License Updated event + the buyer's registration; Google's account and
            # entitlement notifications (approved by the handler); Azure's landing page
            clock.now = previous + timedelta(minutes=2)
            stack.metering.add_product(PRODUCT, AWS_DIMENSIONS)
            stack.metering.add_license(PRODUCT, ACCOUNT, LICENSE, "agmt-demo")
            license_event = agreement_event(
                "License Updated - Manufacturer",
                agreement_id="agmt-demo",
                account_id=ACCOUNT,
                at=clock.now,
                license_arn=LICENSE,
                product_code=PRODUCT,
            )
            await handle(subs, license_event)
            token = stack.metering.issue_token(PRODUCT, ACCOUNT, license_arn=LICENSE)
            await handle(subs, registration_request(token, "demo-aws-tenant", at=clock.now))
            google.procurement.sign_up("demo-account")
            google.procurement.purchase("demo-entitlement", "demo-account", SERVICE, "standard")
            pushed = 0
            while pushed < len(google.procurement.published):
                await handle(subs, google.push_signer.http_api_event(google.procurement.published[pushed]))
                pushed += 1
            purchase = microsoft.fulfillment.purchase("demo-offer", "standard", quantity=1)
            subscription_id = microsoft.fulfillment.purchase_tokens[purchase]
            from billing_local.emulators.azure import AzureResource

            microsoft.resources[subscription_id] = AzureResource(
                plan_id="standard", dimensions=AZURE_DIMENSIONS, status="Pending"
            )
            await handle(subs, landing_page_event(purchase, "demo-azure-tenant"))
            tenants = {"aws": "demo-aws-tenant", "gcp": "gcp-demo-entitlement", "azure": "demo-azure-tenant"}
            console.print(f"subscribed through the marketplaces' own events: {', '.join(tenants.values())}")
            # usage: in the hour before, in the current hour before the end, and after the end
            current = previous + timedelta(hours=1)
            end = current + timedelta(minutes=25)
            conn = await asyncpg.connect(stack.database_url)
            try:
                for tenant in tenants.values():
                    for at, quantity in (
                        (previous + timedelta(minutes=30), 7),
                        (end - timedelta(minutes=5), 3),
                    ):
                        await conn.execute(
                            "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity)"
                            " VALUES ($1, $2, 'demo', 'capacity_gb_hours', $3)",
                            at,
                            tenant,
                            quantity,
                        )
                    await conn.execute(
                        "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity)"
                        " VALUES ($1, $2, 'demo', 'capacity_gb_hours', 1000)",
                        end + timedelta(minutes=10),
                        tenant,
                    )
            finally:
                await conn.close()
            # the previous hour is billed as the hourly run would (one message per subject; the demo's
            # synthetic customers are left out: their marketplaces are the other emulators)
            clock.now = current + timedelta(minutes=20)
            run = uuid.uuid4()
            await SqsQueue(sqs, stack.queue_url).send(
                [BillMessageV1(customer_id=t, period=previous, run_id=run) for t in tenants.values()]
            )
            done.billed = await _bill_queue(subs, sqs, stack.queue_url)
            console.print(f"billed {previous:%H:%M}: {', '.join(done.billed)}")
            # every one unsubscribes at the same instant, mid-hour
            clock.now = end
            stack.metering.deprovision(LICENSE, end)
            deprovisioned = agreement_event(
                "License Deprovisioned - Manufacturer",
                agreement_id="agmt-demo",
                account_id=ACCOUNT,
                at=end,
                license_arn=LICENSE,
                product_code=PRODUCT,
            )
            google.procurement.cancel("demo-entitlement")
            unsubscribe = microsoft.fulfillment.notify(subscription_id, "Unsubscribe")
            clock.now = end + timedelta(minutes=1)
            await handle(subs, deprovisioned)
            while pushed < len(google.procurement.published):
                await handle(subs, google.push_signer.http_api_event(google.procurement.published[pushed]))
                pushed += 1
            await handle(subs, microsoft.webhook_signer.http_api_event(unsubscribe))
            done.final = await _bill_queue(subs, sqs, stack.queue_url)
            console.print(
                f"unsubscribed at {end:%H:%M}, final bills sent at {clock.now:%H:%M}: {', '.join(done.final)}"
            )
    finally:
        await subs.close()
        await runtime.close()
    done.held = {
        "aws": sorted(
            (r.timestamp.hour, r.quantity)
            for r in stack.metering.accepted()
            if r.license_arn == LICENSE and r.quantity
        ),
        "gcp": sorted((r.start_time.hour, r.value) for r in google.records.values() if r.value),
        "azure": sorted((e.hour.hour, int(e.quantity)) for e in microsoft.accepted.values() if e.quantity),
    }
    console.print("what each marketplace now holds for them, per hour (the final partial hour last):")
    for market, records in done.held.items():
        shown = ", ".join(f"{q} unit(s) for {h:02d}:00" for h, q in records)
        console.print(f"  {market}: {shown}; the 1,000 units recorded after the end were never sent")
    return done


async def lifecycle_demo(stack: LocalStack, now: datetime) -> Lifecycle:
    """The lifecycle on the local stack, its clock starting three hours before ``now``'s hour: clear of
    the hour the demo's synthetic customers were just billed for (its run is finished)."""
    from billing_local.stack import environment

    clock = Clock(hour_floor(now) - timedelta(hours=3))
    with lifecycle_emulators(stack, clock) as (google, microsoft, env), environment(env):
        return await run_lifecycle(stack, google, microsoft, clock)
