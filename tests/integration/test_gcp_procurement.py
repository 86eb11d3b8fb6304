"""Google Procurement notifications end to end over real HTTP: the emulator's Pub/Sub push sender signs an
OIDC token with a local key and POSTs to an endpoint running ``GcpSubscriptions.receive``; the token is
verified by google-auth against the emulator's certificate URL, and the entitlement is read from (and approved
on) the emulator's Partner Procurement API.

The emulator (billing_local.emulators.gcp + gcp_procurement) is an HTTP double that follows Google's
documented Procurement API and push format (sources in its docstring). The endpoint here stands in for the API
Gateway route: it answers what ``receive`` decides and keeps the events it returns in ``written`` (the
database's place): a refused request must leave ``written`` empty and call no Procurement method.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from billing.adapters.bearer_http import FixedToken
from billing.adapters.gcp_procurement import (
    CachedCerts,
    GcpSubscriptions,
    ProcurementClient,
    ProcurementSettings,
    ProcurementUnavailableError,
    PushRejectedError,
    PushSettings,
)
from billing.domain.model import Marketplace, Period
from billing.domain.subscriptions import LifecycleKind, SubjectKey, billable_during, fold
from billing_local.emulators.gcp import GcpEmulator, create_app
from billing_local.emulators.gcp_procurement import Procurement, PushSigner
from billing_local.emulators.server import BackgroundServer

AUDIENCE = "https://billing.example.com/gcp/push"
TOKEN = "ya29.emulated-procurement"
PROVIDER = "emulated-provider"


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
def signer() -> PushSigner:
    return PushSigner(audience=AUDIENCE)


@pytest.fixture
def emulator(clock, signer) -> GcpEmulator:
    return GcpEmulator(
        services={},
        fixed_tokens={TOKEN},
        procurement=Procurement(provider=PROVIDER, clock=clock),
        push_signer=signer,
    )


@pytest.fixture
def google(emulator):
    with BackgroundServer(create_app(emulator)) as running:
        yield running


@pytest.fixture
def settings(google, signer) -> tuple[PushSettings, ProcurementSettings]:
    push = PushSettings(
        BILLING_GCP_PUSH_AUDIENCE=AUDIENCE,
        BILLING_GCP_PUSH_SERVICE_ACCOUNT=signer.email,
        BILLING_GCP_PUSH_CERTS_URL=f"{google.url}/oauth2/v1/certs",
    )
    procurement = ProcurementSettings(
        BILLING_GCP_PROCUREMENT_URL=google.url,
        BILLING_GCP_PROVIDER_ID=PROVIDER,
        BILLING_GCP_APPROVE_ACCOUNTS=True,
        BILLING_GCP_APPROVE_ENTITLEMENTS=True,
        BILLING_GCP_APPROVE_PLAN_CHANGES=True,
    )
    return push, procurement


class Endpoint:
    """The HTTPS push endpoint as API Gateway would route it: status from ``receive``, events kept."""

    def __init__(self, subscriptions: GcpSubscriptions) -> None:
        self.subscriptions = subscriptions
        self.written: list[Any] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        try:
            events = await self.subscriptions.receive(
                request.headers.get("Authorization"), await request.read()
            )
        except PushRejectedError as exc:
            return web.Response(status=exc.status, text=exc.reason)
        except ProcurementUnavailableError as exc:
            return web.Response(status=503, text=str(exc))
        self.written.extend(events)
        return web.Response(status=204)


@pytest.fixture
async def endpoint(settings, google):
    push, procurement = settings
    async with aiohttp.ClientSession() as session:
        client = ProcurementClient(session, FixedToken(TOKEN), google.url, PROVIDER)
        target = Endpoint(GcpSubscriptions(push, procurement, client))
        app = web.Application()
        app.router.add_post("/gcp/push", target.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        target.url = f"http://127.0.0.1:{runner.addresses[0][1]}/gcp/push"
        yield target
        await runner.cleanup()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def deliver_all(emulator: GcpEmulator, signer: PushSigner, http, endpoint, start: int = 0) -> int:
    """Push every message published since ``start`` (approvals publish more on the way); the next start."""
    procurement = emulator.procurement
    assert procurement is not None
    while start < len(procurement.published):
        status, text = await signer.push(http, endpoint.url, procurement.published[start])
        assert status == 204, text
        start += 1
    return start


async def test_an_order_is_approved_billed_and_cancelled(emulator, signer, http, endpoint, clock):
    procurement = emulator.procurement
    procurement.sign_up("acct-1")
    procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    await deliver_all(emulator, signer, http, endpoint)

    assert ("accounts.approve", "acct-1") in procurement.approvals
    assert ("approve", "ent-1") in procurement.approvals
    kinds = [event.kind for event in endpoint.written]
    assert kinds == [LifecycleKind.REQUESTED, LifecycleKind.ACTIVE]
    active = endpoint.written[-1]
    assert active.key == SubjectKey(Marketplace.GCP, "ent-1")
    assert active.identity.gcp_usage_reporting_id == procurement.entitlements["ent-1"].usage_reporting_id
    assert active.identity.gcp_account_id == "acct-1"
    assert active.plan == "standard"

    clock.advance(hours=1, minutes=20)
    sent = len(procurement.published)
    procurement.cancel("ent-1")
    await deliver_all(emulator, signer, http, endpoint, sent)
    ended = endpoint.written[-1]
    assert ended.kind is LifecycleKind.ENDED
    assert ended.effective_at == clock.now
    state = fold(active.key, endpoint.written)
    assert billable_during(state, Period(datetime(2026, 11, 26, 14, tzinfo=UTC)))
    assert not billable_during(state, Period(datetime(2026, 11, 26, 15, tzinfo=UTC)))


async def test_two_orders_of_one_product_are_two_subjects(emulator, signer, http, endpoint):
    procurement = emulator.procurement
    procurement.purchase("ent-a", "acct-1", product="saas.example.com", plan="standard")
    procurement.purchase("ent-b", "acct-1", product="saas.example.com", plan="standard")
    await deliver_all(emulator, signer, http, endpoint)
    active = {e.key.subject_id: e for e in endpoint.written if e.kind is LifecycleKind.ACTIVE}
    assert set(active) == {"ent-a", "ent-b"}
    assert active["ent-a"].identity.gcp_usage_reporting_id != active["ent-b"].identity.gcp_usage_reporting_id


async def test_a_plan_change_is_approved_and_applies_when_google_says_it_changed(
    emulator, signer, http, endpoint, clock
):
    procurement = emulator.procurement
    procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    sent = await deliver_all(emulator, signer, http, endpoint)
    procurement.request_plan_change("ent-1", "premium")
    sent = await deliver_all(emulator, signer, http, endpoint, sent)
    assert ("approvePlanChange", "ent-1") in procurement.approvals
    assert endpoint.written[-1].kind is LifecycleKind.ACTIVE
    assert endpoint.written[-1].plan == "standard"  # not in force before Google says it changed

    clock.advance(hours=2)
    procurement.effect_plan_change("ent-1")
    await deliver_all(emulator, signer, http, endpoint, sent)
    changed = endpoint.written[-1]
    assert (changed.kind, changed.plan, changed.effective_at) == (
        LifecycleKind.PLAN_CHANGED,
        "premium",
        clock.now,
    )


async def test_a_pending_cancellation_ends_at_the_term_and_can_be_reverted(
    emulator, signer, http, endpoint, clock
):
    procurement = emulator.procurement
    procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    sent = await deliver_all(emulator, signer, http, endpoint)
    term_end = datetime(2026, 12, 1, tzinfo=UTC)
    procurement.cancel("ent-1", at_period_end=term_end)
    sent = await deliver_all(emulator, signer, http, endpoint, sent)
    ending = endpoint.written[-1]
    assert (ending.kind, ending.effective_at) == (LifecycleKind.ENDING, term_end)

    clock.advance(minutes=5)
    procurement.revert_cancellation("ent-1")
    await deliver_all(emulator, signer, http, endpoint, sent)
    state = fold(ending.key, endpoint.written)
    assert billable_during(state, Period(datetime(2026, 12, 1, 3, tzinfo=UTC)))


async def test_a_deleted_entitlement_ends_and_replays_change_nothing(emulator, signer, http, endpoint, clock):
    procurement = emulator.procurement
    procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    sent = await deliver_all(emulator, signer, http, endpoint)
    clock.advance(hours=1)
    cancelled_at = clock.now
    procurement.cancel("ent-1")
    sent = await deliver_all(emulator, signer, http, endpoint, sent)
    clock.advance(days=1)
    procurement.delete("ent-1")
    await deliver_all(emulator, signer, http, endpoint, sent)
    assert [e.kind for e in endpoint.written[-2:]] == [LifecycleKind.ENDED, LifecycleKind.ENDED]
    once = fold(endpoint.written[0].key, endpoint.written)
    assert once.ends_at == cancelled_at
    # every message delivered again, in reverse order, once the entitlement is gone: the older notices
    # yield nothing (their time is not an end), and the state is the same
    count = len(endpoint.written)
    for data in reversed(emulator.procurement.published):
        status, _ = await signer.push(http, endpoint.url, data)
        assert status == 204
    assert len(endpoint.written) == count + 1  # the deletion notice only
    replayed = fold(endpoint.written[0].key, reversed(endpoint.written))
    assert replayed.timeline == once.timeline
    assert replayed.identity == once.identity


def _forge_other_key(signer: PushSigner) -> str:
    impostor = PushSigner(audience=signer.audience, email=signer.email)
    impostor.kid = signer.kid  # claims Google's key id, signed with another key
    return impostor.token()


@pytest.mark.parametrize(
    ("forge", "status"),
    [
        pytest.param(lambda s: _forge_other_key(s), 401, id="signed-by-another-key"),
        pytest.param(
            lambda s: PushSigner(audience=s.audience, email=s.email).token(), 401, id="unknown-key-id"
        ),
        pytest.param(lambda s: s.token(aud="https://attacker.example.com/push"), 401, id="other-audience"),
        pytest.param(lambda s: s.token(iss="https://evil.example.com"), 401, id="other-issuer"),
        pytest.param(lambda s: s.token(exp=1_600_000_000, iat=1_599_996_400), 401, id="expired"),
        pytest.param(
            lambda s: s.token(email="someone@evil.iam.gserviceaccount.com"), 403, id="other-account"
        ),
        pytest.param(lambda s: s.token(email_verified=False), 403, id="email-unverified"),
        pytest.param(lambda s: s.token(email_verified=None), 403, id="email-verified-missing"),
        pytest.param(lambda s: s.token().rsplit(".", 1)[0] + ".", 401, id="signature-stripped"),
    ],
)
async def test_forged_or_unverifiable_pushes_are_refused_and_write_nothing(
    emulator, signer, http, endpoint, forge, status
):
    procurement = emulator.procurement
    data = procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    answered, _ = await signer.push(http, endpoint.url, data, token=forge(signer))
    assert answered == status
    assert endpoint.written == []
    assert procurement.approvals == []


async def test_no_token_is_401_and_a_malformed_body_400(emulator, signer, http, endpoint):
    async with http.post(endpoint.url, json={"message": {}}) as response:
        assert response.status == 401
    headers = {"Authorization": f"Bearer {signer.token()}"}
    for body in (
        b"not json",
        json.dumps({"message": {"data": "%%%"}}).encode(),
        json.dumps({"message": {"data": base64.b64encode(b"[1]").decode()}}).encode(),
    ):
        async with http.post(endpoint.url, data=body, headers=headers) as response:
            assert response.status == 400
    assert endpoint.written == []


async def test_a_procurement_api_that_refuses_us_is_503_so_pubsub_redelivers(
    emulator, signer, http, endpoint
):
    emulator.fixed_tokens.clear()
    data = emulator.procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    status, _ = await signer.push(http, endpoint.url, data)
    assert status == 503
    assert endpoint.written == []


async def test_a_late_notice_starts_billing_and_plans_when_they_started(
    emulator, signer, http, endpoint, clock
):
    """Pub/Sub may deliver a notice after the entitlement changed again: the activation and each plan change
    take effect at their own notice's time (and the plan the notice names), not at the later state's."""
    procurement = emulator.procurement
    procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    status, _ = await signer.push(http, endpoint.url, procurement.published[0])  # approved here
    assert status == 204
    activated_at = clock.now
    clock.advance(minutes=30)
    procurement.request_plan_change("ent-1", "premium")  # before the ENTITLEMENT_ACTIVE notice arrives
    sent = await deliver_all(emulator, signer, http, endpoint, 1)
    active = next(e for e in endpoint.written if e.kind is LifecycleKind.ACTIVE)
    assert (active.effective_at, active.plan) == (activated_at, "standard")

    clock.advance(hours=1)
    premium_at = clock.now
    procurement.effect_plan_change("ent-1")
    clock.advance(hours=1)
    procurement.request_plan_change("ent-1", "enterprise")
    procurement.approvals.clear()
    await signer.push(http, endpoint.url, procurement.published[-1])  # approved here
    procurement.effect_plan_change("ent-1")
    enterprise_at = clock.now
    await deliver_all(emulator, signer, http, endpoint, sent)
    changes = [(e.effective_at, e.plan) for e in endpoint.written if e.kind is LifecycleKind.PLAN_CHANGED]
    assert changes == [(premium_at, "premium"), (enterprise_at, "enterprise")]
    state = fold(active.key, endpoint.written)

    def plan_at(moment: datetime) -> str | None:
        return [span.plan for span in state.plans if span.start <= moment][-1]

    assert plan_at(premium_at - timedelta(seconds=1)) == "standard"
    assert plan_at(enterprise_at - timedelta(seconds=1)) == "premium"
    assert plan_at(enterprise_at) == "enterprise"


async def test_the_api_gateway_event_of_a_push_verifies(emulator, signer, endpoint):
    """The emulator's API Gateway (payload 2.0) form of a push, as the Subscriptions function gets it."""
    data = emulator.procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    event = signer.http_api_event(data)
    assert event["requestContext"]["http"]["path"] == "/gcp/pubsub"
    events = await endpoint.subscriptions.receive(event["headers"]["authorization"], event["body"])
    assert [e.kind for e in events] == [LifecycleKind.REQUESTED]


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_google_certificates_are_fetched_once_and_again_for_a_rotated_key(
    emulator, signer, http, endpoint
):
    monotonic = Monotonic()
    endpoint.subscriptions._certs = CachedCerts(monotonic=monotonic)
    procurement = emulator.procurement
    procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    procurement.purchase("ent-2", "acct-1", product="saas.example.com", plan="standard")
    sent = await deliver_all(emulator, signer, http, endpoint)
    assert sent == 4
    assert signer.certs_requests == 1

    signer.rotate()  # a token under a key the cached set does not hold
    data = procurement.cancel("ent-1")
    status, _ = await signer.push(http, endpoint.url, data)
    assert status == 401  # the set was fetched less than a minute ago: not again (forged key ids cost little)
    assert signer.certs_requests == 1
    monotonic.now += 61
    status, _ = await signer.push(http, endpoint.url, data)
    assert status == 204
    assert signer.certs_requests == 2
    assert endpoint.written[-1].kind is LifecycleKind.ENDED


@pytest.mark.parametrize("forged", ["another-key", "other-audience"])
async def test_with_a_jwk_set_forged_tokens_are_refused_too(emulator, signer, http, endpoint, google, forged):
    """Google also publishes its keys as a JWK Set (v3): google-auth then verifies with PyJWT, whose errors
    are not ValueErrors."""
    endpoint.subscriptions._push = endpoint.subscriptions._push.model_copy(
        update={"certs_url": f"{google.url}/oauth2/v3/certs"}
    )
    data = emulator.procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    token = _forge_other_key(signer) if forged == "another-key" else signer.token(aud="https://x.example.com")
    status, _ = await signer.push(http, endpoint.url, data, token=token)
    assert status == 401
    status, _ = await signer.push(http, endpoint.url, data)
    assert status == 204
    assert [e.kind for e in endpoint.written] == [LifecycleKind.REQUESTED]


async def test_service_control_knows_the_entitlements_usage_reporting_ids(
    emulator, signer, http, endpoint, google
):
    """The Service Control double beside the Procurement double: an entitlement's usageReportingId is a
    consumer, billable (empty checkErrors) while the entitlement is active."""
    procurement = emulator.procurement
    procurement.purchase("ent-1", "acct-1", product="saas.example.com", plan="standard")
    consumer = procurement.entitlements["ent-1"].usage_reporting_id

    async def check() -> list[str]:
        body = {"operation": {"operationId": "op-1", "consumerId": consumer, "operationName": "check"}}
        url = f"{google.url}/v1/services/saas.example.com:check"
        emulator.services = {"saas.example.com": None}
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
            return [e["code"] for e in (await response.json()).get("checkErrors", [])]

    assert await check() == ["SERVICE_NOT_ACTIVATED"]  # not approved yet
    await deliver_all(emulator, signer, http, endpoint)
    assert await check() == []
    procurement.cancel("ent-1")
    assert await check() == ["SERVICE_NOT_ACTIVATED"]
