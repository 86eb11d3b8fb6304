"""Azure SaaS subscriptions over real HTTP: the emulator's webhook sender signs an Entra-style JWT with a
local key (its JWK Set served by the emulator) and POSTs to an endpoint running
``AzureSubscriptions.receive``; the token is checked with PyJWT against that JWKS, the operation read back
from (and answered on) the emulator's SaaS fulfillment API; the landing page's resolve + activate run against
the same API.

The emulator (billing_local.emulators.azure + azure_fulfillment) is an HTTP double that follows Microsoft's
documented fulfillment API v2 and webhook (sources in its docstring). The endpoint here stands in for the API
Gateway route: it answers what ``receive`` decides and keeps the events in ``written`` (the database's place):
a refused call must leave ``written`` empty and change nothing on the emulator.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from billing.adapters.azure_fulfillment import (
    AzureSubscriptions,
    FulfillmentClient,
    FulfillmentUnavailableError,
    RequestRejectedError,
    WebhookSettings,
    WebhookTokenVerifier,
)
from billing.adapters.bearer_http import FixedToken
from billing.domain.model import Marketplace, Period
from billing.domain.subscriptions import LifecycleKind, SubjectKey, billable_during, fold
from billing_local.emulators.azure import AzureEmulator, AzureResource, create_app
from billing_local.emulators.azure_fulfillment import Fulfillment, WebhookSigner, landing_page_event
from billing_local.emulators.server import BackgroundServer

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT_ID = "66666666-7777-8888-9999-000000000000"
TOKEN = "eyJ.emulated.fulfillment"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 13, 10, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def signer() -> WebhookSigner:
    return WebhookSigner(tenant_id=TENANT, audience=CLIENT_ID)


@pytest.fixture
def emulator(clock, signer) -> AzureEmulator:
    resources: dict[str, AzureResource] = {}
    return AzureEmulator(
        resources=resources,
        fixed_tokens={TOKEN},
        clock=clock,
        fulfillment=Fulfillment(clock=clock, resources=resources),
        webhook_signer=signer,
    )


@pytest.fixture
def azure(emulator):
    with BackgroundServer(create_app(emulator)) as running:
        yield running


@pytest.fixture
def settings(azure) -> WebhookSettings:
    return WebhookSettings(
        BILLING_AZURE_WEBHOOK_TENANT_ID=TENANT,
        BILLING_AZURE_WEBHOOK_AUDIENCE=CLIENT_ID,
        BILLING_AZURE_WEBHOOK_JWKS_URL=f"{azure.url}/{TENANT}/discovery/v2.0/keys",
        BILLING_AZURE_FULFILLMENT_URL=azure.url,
    )


class Endpoint:
    """The webhook as API Gateway would route it: status from ``receive``, events kept."""

    def __init__(self) -> None:
        self.subscriptions: AzureSubscriptions | None = None
        self.written: list[Any] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        assert self.subscriptions is not None
        try:
            events = await self.subscriptions.receive(
                request.headers.get("Authorization"), await request.read()
            )
        except RequestRejectedError as exc:
            return web.Response(status=exc.status, text=exc.reason)
        except FulfillmentUnavailableError as exc:
            return web.Response(status=503, text=str(exc))
        self.written.extend(events)
        return web.Response(status=200)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as running:
        yield running


@pytest.fixture
async def endpoint(settings, azure, clock, session):
    target = Endpoint()
    client = FulfillmentClient(session, FixedToken(TOKEN), azure.url)
    target.subscriptions = AzureSubscriptions(settings, client, WebhookTokenVerifier(settings), clock=clock)
    app = web.Application()
    app.router.add_post("/azure/webhook", target.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    target.url = f"http://127.0.0.1:{runner.addresses[0][1]}/azure/webhook"
    yield target
    await runner.cleanup()


async def subscribed(emulator, endpoint, plan: str = "silver", quantity: int | None = 5) -> str:
    """A purchase registered through the landing page; the subscription id."""
    fulfillment = emulator.fulfillment
    token = fulfillment.purchase("offer-1", plan, quantity)
    subscription_id = fulfillment.purchase_tokens[token]
    emulator.resources[subscription_id] = AzureResource(
        plan_id=plan, dimensions=("api_calls",), status="Pending"
    )
    event = await endpoint.subscriptions.register(token, tenant_id="tenant-42")
    endpoint.written.append(event)
    return subscription_id


async def test_landing_page_resolves_activates_and_links_the_tenant(emulator, endpoint, clock):
    subscription_id = await subscribed(emulator, endpoint)
    event = endpoint.written[-1]
    assert emulator.fulfillment.activations == [subscription_id]
    assert emulator.fulfillment.subscriptions[subscription_id].status == "Subscribed"
    assert emulator.resources[subscription_id].status == "Subscribed"  # metering now accepts its usage
    assert event.key == SubjectKey(Marketplace.AZURE, subscription_id)
    assert (event.kind, event.tenant_id, event.plan, event.quantity) == (
        LifecycleKind.ACTIVE,
        "tenant-42",
        "silver",
        5,
    )
    assert event.effective_at == clock.now


async def test_an_unknown_landing_page_token_is_refused_and_activates_nothing(emulator, endpoint):
    emulator.fulfillment.purchase("offer-1", "silver")
    with pytest.raises(RequestRejectedError) as refused:
        await endpoint.subscriptions.register("forged-token", tenant_id="tenant-42")
    assert refused.value.status == 403
    assert emulator.fulfillment.activations == []


async def test_suspend_reinstate_and_unsubscribe_follow_the_operations(
    emulator, signer, session, endpoint, clock
):
    subscription_id = await subscribed(emulator, endpoint)
    fulfillment = emulator.fulfillment
    for action, minutes in (("Suspend", 50), ("Reinstate", 120), ("Unsubscribe", 90)):
        clock.advance(minutes=minutes)
        status, text = await signer.send(session, endpoint.url, fulfillment.notify(subscription_id, action))
        assert status == 200, text
    kinds = [e.kind for e in endpoint.written]
    assert kinds == [
        LifecycleKind.ACTIVE,
        LifecycleKind.SUSPENDED,
        LifecycleKind.REINSTATED,
        LifecycleKind.ENDED,
    ]
    state = fold(SubjectKey(Marketplace.AZURE, subscription_id), endpoint.written)
    assert state.ends_at == clock.now == datetime(2026, 11, 26, 17, 30, tzinfo=UTC)
    billable = {
        hour: billable_during(state, Period(datetime(2026, 11, 26, hour, tzinfo=UTC)))
        for hour in range(13, 19)
    }
    # suspended 14:00-16:00, ended 17:30 (its partial hour still billed)
    assert billable == {13: True, 14: False, 15: False, 16: True, 17: True, 18: False}


async def test_a_plan_change_is_answered_in_time_and_applies(emulator, signer, session, endpoint, clock):
    subscription_id = await subscribed(emulator, endpoint)
    fulfillment = emulator.fulfillment
    clock.advance(hours=1)
    payload = fulfillment.notify(subscription_id, "ChangePlan", plan="gold")
    status, text = await signer.send(session, endpoint.url, payload)
    assert status == 200, text
    assert [(op, result) for op, result, _ in fulfillment.patches] == [(payload["id"], "Success")]
    assert fulfillment.subscriptions[subscription_id].plan_id == "gold"
    changed = endpoint.written[-1]
    assert (changed.kind, changed.plan, changed.effective_at) == (
        LifecycleKind.PLAN_CHANGED,
        "gold",
        clock.now,
    )
    # Microsoft calls again (at least once delivery): the operation is no longer in progress, same event
    status, _ = await signer.send(session, endpoint.url, payload)
    assert status == 200
    assert endpoint.written[-1].event_id == changed.event_id


async def test_a_declined_quantity_change_is_patched_failure_and_writes_nothing(
    emulator, signer, session, endpoint
):
    subscription_id = await subscribed(emulator, endpoint)
    endpoint.subscriptions._decide = lambda operation: False
    payload = emulator.fulfillment.notify(subscription_id, "ChangeQuantity", quantity=50)
    status, _ = await signer.send(session, endpoint.url, payload)
    assert status == 400
    assert [result for _, result, _ in emulator.fulfillment.patches] == ["Failure"]
    assert emulator.fulfillment.subscriptions[subscription_id].quantity == 5
    assert [e.kind for e in endpoint.written] == [LifecycleKind.ACTIVE]


async def test_a_change_not_answered_within_the_window_is_taken_as_auto_accepted(
    emulator, signer, session, endpoint
):
    """Azure accepts a change nobody answered in 10 seconds: past our window the PATCH is not sent, and the
    change is recorded as accepted. The monotonic clock is the test's: 9 s pass between the call's arrival
    and the answer (window 8 s)."""
    subscription_id = await subscribed(emulator, endpoint)
    readings = iter([0.0, 9.0])
    endpoint.subscriptions._monotonic = lambda: next(readings)
    payload = emulator.fulfillment.notify(subscription_id, "ChangePlan", plan="gold")
    status, text = await signer.send(session, endpoint.url, payload)
    assert status == 200, text
    assert emulator.fulfillment.patches == []
    assert endpoint.written[-1].kind is LifecycleKind.PLAN_CHANGED
    emulator.fulfillment.auto_accept(payload["id"])
    assert emulator.fulfillment.subscriptions[subscription_id].plan_id == "gold"


def _other_key(signer: WebhookSigner) -> str:
    impostor = WebhookSigner(tenant_id=TENANT, audience=CLIENT_ID)
    impostor.kid = signer.kid
    return impostor.token()


@pytest.mark.parametrize(
    ("forge", "status"),
    [
        pytest.param(_other_key, 401, id="signed-by-another-key"),
        pytest.param(lambda s: WebhookSigner(TENANT, CLIENT_ID).token(), 401, id="unknown-key-id"),
        pytest.param(lambda s: s.token(aud="someone-else"), 401, id="other-audience"),
        pytest.param(lambda s: s.token(iss="https://sts.windows.net/evil-tenant/"), 401, id="other-issuer"),
        pytest.param(lambda s: s.token(exp=1_600_000_000), 401, id="expired"),
        pytest.param(lambda s: s.token(exp=None), 401, id="no-expiry"),
        pytest.param(lambda s: s.token(appid="00000000-0000-0000-0000-000000000bad"), 403, id="other-caller"),
        pytest.param(lambda s: s.token(tid="evil-tenant"), 403, id="other-tenant"),
        pytest.param(lambda s: s.token().rsplit(".", 1)[0] + ".", 401, id="signature-stripped"),
    ],
)
async def test_forged_webhook_tokens_are_refused_and_change_nothing(
    emulator, signer, session, endpoint, forge, status
):
    subscription_id = await subscribed(emulator, endpoint)
    payload = emulator.fulfillment.notify(subscription_id, "ChangePlan", plan="gold")
    answered, _ = await signer.send(session, endpoint.url, payload, token=forge(signer))
    assert answered == status
    assert emulator.fulfillment.patches == []
    assert [e.kind for e in endpoint.written] == [LifecycleKind.ACTIVE]


async def test_a_well_signed_call_the_operations_api_does_not_confirm_is_403(
    emulator, signer, session, endpoint
):
    subscription_id = await subscribed(emulator, endpoint)
    other = await subscribed(emulator, endpoint)
    genuine = emulator.fulfillment.notify(subscription_id, "Suspend")
    for forged in (
        {**genuine, "id": "00000000-0000-0000-0000-00000000dead"},  # no such operation
        {**genuine, "action": "Unsubscribe"},  # the operation was a Suspend
        {**genuine, "subscriptionId": other},  # the operation is another subscription's
    ):
        status, _ = await signer.send(session, endpoint.url, forged)
        assert status == 403
    assert [e.kind for e in endpoint.written] == [LifecycleKind.ACTIVE, LifecycleKind.ACTIVE]


async def test_no_token_is_401_and_a_malformed_body_400(emulator, signer, session, endpoint):
    async with session.post(endpoint.url, json={"id": "x"}) as response:
        assert response.status == 401
    headers = {"Authorization": f"Bearer {signer.token()}"}
    for body in (b"not json", b"[]", json.dumps({"id": "op", "action": "Suspend"}).encode()):
        async with session.post(endpoint.url, data=body, headers=headers) as response:
            assert response.status == 400
    assert endpoint.written == []


async def test_a_fulfillment_api_that_refuses_us_is_503(emulator, signer, session, endpoint):
    subscription_id = await subscribed(emulator, endpoint)
    emulator.fixed_tokens.clear()
    status, _ = await signer.send(
        session, endpoint.url, emulator.fulfillment.notify(subscription_id, "Suspend")
    )
    assert status == 503
    assert [e.kind for e in endpoint.written] == [LifecycleKind.ACTIVE]


async def test_visiting_the_landing_page_again_links_the_tenant_but_revives_nothing(
    emulator, signer, session, endpoint, clock
):
    fulfillment = emulator.fulfillment
    token = fulfillment.purchase("offer-1", "silver", 5)
    subscription_id = fulfillment.purchase_tokens[token]
    endpoint.written.append(await endpoint.subscriptions.register(token, tenant_id="tenant-42"))
    clock.advance(minutes=50)
    status, _ = await signer.send(session, endpoint.url, fulfillment.notify(subscription_id, "Suspend"))
    assert status == 200
    clock.advance(hours=2)
    again = await endpoint.subscriptions.register(token, tenant_id="tenant-43")
    endpoint.written.append(again)
    assert fulfillment.activations == [subscription_id]  # activated once
    state = fold(SubjectKey(Marketplace.AZURE, subscription_id), endpoint.written)
    assert state.tenant_id == "tenant-43"
    assert not billable_during(state, Period(datetime(2026, 11, 26, 16, tzinfo=UTC)))
    assert {span.plan for span in state.plans} == {"silver"}


async def test_the_api_gateway_events_of_the_landing_page_and_webhook_verify(emulator, signer, endpoint):
    """The emulator's API Gateway (payload 2.0) forms, as the Subscriptions function gets them."""
    from urllib.parse import parse_qs

    fulfillment = emulator.fulfillment
    token = fulfillment.purchase("offer-1", "silver", 5)
    landing = landing_page_event(token, "tenant-42")
    form = parse_qs(landing["body"])
    registered = await endpoint.subscriptions.register(form["token"][0], form["tenant_id"][0])
    assert (registered.kind, registered.tenant_id) == (LifecycleKind.ACTIVE, "tenant-42")
    webhook = signer.http_api_event(fulfillment.notify(fulfillment.purchase_tokens[token], "Suspend"))
    events = await endpoint.subscriptions.receive(webhook["headers"]["authorization"], webhook["body"])
    assert [e.kind for e in events] == [LifecycleKind.SUSPENDED]


async def test_an_auto_activated_subscription_is_subscribed_by_its_webhook(
    emulator, signer, session, endpoint
):
    fulfillment = emulator.fulfillment
    token = fulfillment.purchase("offer-1", "silver", 3)
    subscription_id = fulfillment.purchase_tokens[token]
    status, text = await signer.send(session, endpoint.url, fulfillment.notify(subscription_id, "Subscribe"))
    assert status == 200, text
    [event] = endpoint.written
    assert (event.kind, event.plan, event.quantity) == (LifecycleKind.ACTIVE, "silver", 3)
    # the landing page visited afterwards only links the tenant
    linked = await endpoint.subscriptions.register(token, tenant_id="tenant-7")
    assert linked.kind is not LifecycleKind.ACTIVE
    assert fulfillment.activations == []


async def test_after_unsubscribe_metering_takes_the_final_hour_and_nothing_later(
    emulator, signer, session, endpoint, azure, clock
):
    subscription_id = await subscribed(emulator, endpoint)
    clock.now = datetime(2026, 11, 26, 15, 30, tzinfo=UTC)
    status, _ = await signer.send(
        session, endpoint.url, emulator.fulfillment.notify(subscription_id, "Unsubscribe")
    )
    assert status == 200
    assert emulator.resources[subscription_id].ended_at == clock.now

    async def meter(hour: int) -> dict[str, Any]:
        event = {
            "resourceId": subscription_id,
            "quantity": 3,
            "dimension": "api_calls",
            "effectiveStartTime": f"2026-11-26T{hour:02}:00:00Z",
            "planId": "silver",
        }
        url = f"{azure.url}/api/batchUsageEvent?api-version=2018-08-31"
        async with session.post(
            url, json={"request": [event]}, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            assert r.status == 200
            return (await r.json())["result"][0]

    clock.now = datetime(2026, 11, 26, 16, 20, tzinfo=UTC)
    assert (await meter(15))["status"] == "Accepted"  # the final partial hour, begun before the end
    assert (await meter(16))["status"] == "ResourceNotActive"
