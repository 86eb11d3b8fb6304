"""The Azure adapter speaking real HTTP to the metering emulator, with azure-identity against a local Entra.

The emulator (billing_local.emulators.azure) is an HTTP double that follows Microsoft's documented API:
bearer tokens required (403 otherwise), 1 to 25 events a batch, one event per resource, dimension and hour
(``Duplicate`` with the original event), a 24-hour window (``Expired``), every item status. Its token
endpoint is served over TLS with a certificate made here, because azure-identity accepts only https
authorities. Requests and answers are validated against Microsoft's OpenAPI description
(tests/fixtures/specs/azure-marketplace-metering.json).
"""

from __future__ import annotations

import contextlib
import functools
import json
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from billing.adapters import azure_metering as azure
from billing.domain.errors import ConfigurationError, PermanentError, WindowExpiredError
from billing.domain.model import Customer, CustomerStatus, LedgerEntry, LedgerState, Marketplace, Period
from billing_local.emulators.azure import (
    AzureEmulator,
    AzureResource,
    HttpsServer,
    create_app,
    create_token_app,
    self_signed_certificate,
)
from billing_local.emulators.server import BackgroundServer
from marketplace_specs import azure_api_versions, azure_operation, documented_azure_event, validate_azure

PERIOD = Period(datetime(2026, 11, 26, 13, tzinfo=UTC))
NOW = PERIOD.end + timedelta(minutes=20)
RESOURCE = "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"
TENANT = "00000000-0000-0000-0000-0000000000aa"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "emulated-client-secret"
DIMENSIONS = {"api_calls", "storage_gib", *(f"metric_{i}" for i in range(30))}
CUSTOMER = Customer(
    id="cust-az-1",
    marketplace=Marketplace.AZURE,
    status=CustomerStatus.ACTIVE,
    active_from=datetime(2026, 1, 1, tzinfo=UTC),
    active_until=None,
    azure_resource_id=RESOURCE,
    azure_plan_id="gold",
)
_ENV = (
    "BILLING_AZURE_METERING_URL",
    "BILLING_AZURE_ACCESS_TOKEN",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_AUTHORITY_HOST",
    "BILLING_AZURE_CREDENTIALS_SECRET_ARN",
)


def entry(dimension: str = "api_calls", quantity: int = 5) -> LedgerEntry:
    return LedgerEntry(CUSTOMER.id, dimension, PERIOD, quantity, LedgerState.SUBMITTED, attempts=1)


def customer(**changes) -> Customer:
    return Customer(**{**CUSTOMER.__dict__, **changes})


def no_secret(arn: str) -> str:
    raise AssertionError(f"no secret expected, asked for {arn}")


@pytest.fixture
def emulator() -> AzureEmulator:
    return AzureEmulator(
        resources={RESOURCE: AzureResource(plan_id="gold", dimensions=DIMENSIONS)},
        tenant_id=TENANT,
        clients={CLIENT_ID: CLIENT_SECRET},
        clock=lambda: NOW,
    )


@pytest.fixture
def server(emulator):
    with BackgroundServer(create_app(emulator)) as running:
        yield running


@pytest.fixture
def certificate(tmp_path):
    return self_signed_certificate(tmp_path)


@pytest.fixture
def entra(emulator, certificate):
    with HttpsServer(create_token_app(emulator), *certificate) as running:
        yield running


@pytest.fixture
def env(monkeypatch, server, entra, certificate):
    """The standard variables, and trust in the emulator's certificate for azure-identity's transport."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BILLING_AZURE_METERING_URL", server.url)
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", entra.url)
    trusted = functools.partial(azure.client_secret_credential, connection_verify=str(certificate[0]))
    monkeypatch.setattr(azure, "client_secret_credential", trusted)
    return monkeypatch


@pytest.fixture
async def client(env):
    async with contextlib.AsyncExitStack() as stack:
        yield await azure.create(stack, no_secret, attempts=3)


def batches(emulator: AzureEmulator):
    return [e for e in emulator.exchanges if e.path == "/api/batchUsageEvent"]


async def test_batch_request_is_valid_against_the_openapi_description(client, emulator):
    # Given two dimensions to bill
    # When the hour is submitted
    await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 5), entry("storage_gib", 7)])
    # Then the body is a BatchUsageEvent whose events follow Microsoft's documented rules
    (call,) = batches(emulator)
    request_body = azure_operation("/batchUsageEvent")["requestBody"]["content"]["application/json"]
    validate_azure(request_body["schema"]["$ref"].rsplit("/", 1)[1], call.body)
    for event in call.body["request"]:
        documented_azure_event(event)


async def test_batch_request_goes_to_the_documented_path_and_version(client, emulator):
    # Given the server URL and path of the OpenAPI description
    operation = azure_operation("/batchUsageEvent")
    # When the hour is submitted
    await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then the call went to <server>/batchUsageEvent with the only valid api-version
    (call,) = batches(emulator)
    assert operation["server"].endswith("/api") and call.path == "/api/batchUsageEvent"
    assert call.query["api-version"] in azure_api_versions()


async def test_emulator_answers_are_valid_against_the_openapi_description(client, emulator):
    # Given an accepted, a duplicate and a refused event in one batch
    await client.submit(CUSTOMER, PERIOD, [entry("storage_gib")])
    emulator.force_status("metric_1", "InvalidDimension")
    # When the hour is submitted
    await client.submit(CUSTOMER, PERIOD, [entry("api_calls"), entry("storage_gib"), entry("metric_1")])
    # Then the answer is a BatchUsageEventOkResponse with those three statuses
    answer = batches(emulator)[-1].response
    validate_azure("BatchUsageEventOkResponse", answer)
    assert [i["status"] for i in answer["result"]] == ["Accepted", "Duplicate", "InvalidDimension"]


async def test_event_carries_the_documented_fields(client, emulator):
    # Given one dimension of a SaaS subscription
    # When the hour is submitted
    await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 5)])
    # Then the event names the subscription, plan, dimension, quantity and the hour's start
    assert batches(emulator)[0].body == {
        "request": [
            {
                "resourceId": RESOURCE,
                "planId": "gold",
                "dimension": "api_calls",
                "quantity": 5,
                "effectiveStartTime": "2026-11-26T13:00:00Z",
            }
        ]
    }


async def test_managed_app_is_identified_by_its_resource_uri(client, emulator):
    # Given a managed application known by its resource URI only
    uri = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Solutions/applications/app"
    emulator.resources = {uri: AzureResource(plan_id="gold", dimensions=DIMENSIONS)}
    # When its hour is submitted
    (result,) = await client.submit(
        customer(azure_resource_id=None, azure_resource_uri=uri), PERIOD, [entry()]
    )
    # Then the event carries resourceUri, never both, and is accepted
    (event,) = batches(emulator)[0].body["request"]
    assert event["resourceUri"] == uri and "resourceId" not in event
    assert result.state is LedgerState.ACCEPTED


async def test_accepted_event_is_recorded_with_its_usage_event_id(client, emulator):
    # Given one dimension
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 5)])
    # Then it is accepted under the usageEventId Azure gave it
    (held,) = emulator.accepted.values()
    assert (result.state, result.record_id) == (LedgerState.ACCEPTED, held.usage_event_id)


async def test_resubmitted_hour_is_recorded_as_billed_with_the_original_id(client, emulator):
    # Given an hour Azure already holds
    (first,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 5)])
    # When the same hour is submitted again (a redelivered message)
    (again,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 5)])
    # Then Azure answers Duplicate and the record keeps the original usageEventId; it is billed once
    assert again.state is LedgerState.DUPLICATE and again.state.billed
    assert again.record_id == first.record_id and len(emulator.accepted) == 1


async def test_single_event_conflict_means_the_same_as_duplicate(client, emulator, server):
    # Given an hour already held, sent again through the single-event API
    (first,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 5)])
    emulator.fixed_tokens.add("local")
    event = batches(emulator)[0].body["request"][0]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.url}/api/usageEvent?api-version=2018-08-31",
            json=event,
            headers={"Authorization": "Bearer local"},
        ) as response,
    ):
        status, body = response.status, await response.json()
    # When its 409 Conflict is read
    result = azure.conflict_result("api_calls", body)
    # Then it is a documented conflict naming the original event: billed, under the original id
    assert status == 409 and "409" in azure_operation("/usageEvent")["responses"]
    validate_azure("UsageEventConflictResponse", body)
    assert (result.state, result.record_id) == (LedgerState.DUPLICATE, first.record_id)


async def test_zero_quantity_is_not_sent(client, emulator):
    # Given an hour with usage in one dimension only
    # When it is submitted
    calls, storage = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 0), entry("storage_gib", 3)])
    # Then the zero is skipped and only the other event went to Azure
    assert calls.state is LedgerState.SKIPPED and storage.state is LedgerState.ACCEPTED
    assert [e["dimension"] for e in batches(emulator)[0].body["request"]] == ["storage_gib"]


async def test_hour_without_usage_makes_no_call(client, emulator):
    # Given an hour without any usage
    # When it is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 0)])
    # Then nothing is sent at all
    assert result.state is LedgerState.SKIPPED and emulator.exchanges == []


async def test_batches_hold_at_most_25_events(client, emulator):
    # Given 30 dimensions with usage
    entries = [entry(f"metric_{i}", 1) for i in range(30)]
    # When the hour is submitted
    results = await client.submit(CUSTOMER, PERIOD, entries)
    # Then they went in batches of 25 and 5, all accepted
    assert [len(e.body["request"]) for e in batches(emulator)] == [25, 5]
    assert all(r.state is LedgerState.ACCEPTED for r in results)


def _unknown_resource(emulator: AzureEmulator) -> None:
    emulator.resources = {}


def _other_publisher(emulator: AzureEmulator) -> None:
    emulator.resources = {RESOURCE: AzureResource("gold", DIMENSIONS, authorized=False)}


def _suspended(emulator: AzureEmulator) -> None:
    emulator.resources = {RESOURCE: AzureResource("gold", DIMENSIONS, status="Suspended")}


def _dimension_not_in_plan(emulator: AzureEmulator) -> None:
    emulator.resources = {RESOURCE: AzureResource("gold", {"storage_gib"})}


def _other_plan(emulator: AzureEmulator) -> None:
    emulator.resources = {RESOURCE: AzureResource("silver", DIMENSIONS)}


def _refused_quantity(emulator: AzureEmulator) -> None:
    emulator.force_status("api_calls", "InvalidQuantity")


@pytest.mark.parametrize(
    ("status", "arrange"),
    [
        ("ResourceNotFound", _unknown_resource),
        ("ResourceNotAuthorized", _other_publisher),
        ("ResourceNotActive", _suspended),
        ("InvalidDimension", _dimension_not_in_plan),
        ("BadArgument", _other_plan),
        ("InvalidQuantity", _refused_quantity),
    ],
)
async def test_permanent_status_is_rejected_with_the_status_as_reason(client, emulator, status, arrange):
    # Given a resource or event Azure refuses for good
    arrange(emulator)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls")])
    # Then it is rejected once, with Azure's status kept as the reason
    assert result.state is LedgerState.REJECTED and (result.reason or "").startswith(status)
    assert len(batches(emulator)) == 1


async def test_error_status_is_retried_until_accepted(client, emulator):
    # Given one Error for the event, then Azure recovers
    emulator.force_status("api_calls", "Error")
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls")])
    # Then the event was sent again and accepted
    assert result.state is LedgerState.ACCEPTED and len(batches(emulator)) == 2


async def test_error_status_that_persists_is_failed(client, emulator):
    # Given Error on every attempt
    emulator.force_status("api_calls", "Error", "Error", "Error")
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls")])
    # Then it is FAILED, to be retried by a later delivery
    assert result.state is LedgerState.FAILED and result.retryable


async def test_hour_past_the_24_hour_window_raises_window_expired(client, emulator):
    # Given an hour that started more than 24 hours ago
    emulator.clock = lambda: PERIOD.start + timedelta(hours=24, minutes=1)
    # When it is submitted
    # Then every event is Expired and the biller is told the window closed
    with pytest.raises(WindowExpiredError):
        await client.submit(CUSTOMER, PERIOD, [entry("api_calls"), entry("storage_gib")])
    assert len(batches(emulator)) == 1


async def test_expired_event_beside_a_billed_one_is_failed_not_settled(client, emulator):
    # Given one event Azure calls Expired while it accepts the other
    emulator.force_status("api_calls", "Expired")
    # When the hour is submitted
    calls, storage = await client.submit(CUSTOMER, PERIOD, [entry("api_calls"), entry("storage_gib")])
    # Then the accepted one keeps its id and the expired one stays retryable (never carried while mixed)
    assert storage.state is LedgerState.ACCEPTED
    assert calls.state is LedgerState.FAILED and "Expired" in (calls.reason or "")


async def test_throttled_batch_is_retried_until_accepted(client, emulator):
    # Given one HTTP 429
    emulator.fail_next(429)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then the retry is accepted
    assert result.state is LedgerState.ACCEPTED and len(batches(emulator)) == 2


async def test_unavailable_that_persists_is_failed(client, emulator):
    # Given HTTP 503 on every attempt
    emulator.fail_next(503, 503, 503)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is FAILED: the service took nothing
    assert result.state is LedgerState.FAILED and "503" in (result.reason or "")


async def test_internal_error_that_persists_is_submitted(client, emulator):
    # Given HTTP 500 on every attempt
    emulator.fail_next(500, 500, 500)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is SUBMITTED: Azure may have recorded it, and a resubmission would say Duplicate
    assert result.state is LedgerState.SUBMITTED


async def test_bad_request_is_rejected(client, emulator):
    # Given Azure refusing the whole batch
    emulator.fail_next(400)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is rejected, not retried
    assert result.state is LedgerState.REJECTED and len(batches(emulator)) == 1


async def test_refused_token_is_replaced_once_on_403(client, emulator):
    # Given a token the metering service no longer honours
    await client.submit(CUSTOMER, PERIOD.shifted(-1), [entry()])
    emulator.revoke_tokens()
    # When the next hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then azure-identity fetched a new token over TLS and the call was repeated
    assert result.state is LedgerState.ACCEPTED and emulator.token_requests == 2
    assert [e.status for e in batches(emulator)] == [200, 403, 200]


async def test_expired_token_is_refreshed_before_use(client, emulator):
    # Given tokens that say they expire at once (the emulator still honours them)
    emulator.advertised_lifetime = 0
    # When two hours are submitted
    await client.submit(CUSTOMER, PERIOD.shifted(-1), [entry()])
    await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then a new token was fetched before the second call, which nobody refused
    assert emulator.token_requests == 2 and all(e.status == 200 for e in batches(emulator))


async def test_wrong_client_secret_fails_without_sending(env, emulator):
    # Given a client secret Entra refuses
    env.setenv("AZURE_CLIENT_SECRET", "wrong")
    async with contextlib.AsyncExitStack() as stack:
        client = await azure.create(stack, no_secret, attempts=3)
        # When an hour is submitted
        (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then no token is had, nothing is sent and the hour is FAILED
    assert result.state is LedgerState.FAILED and "no access token" in (result.reason or "")
    assert emulator.exchanges == []


async def test_timeout_after_sending_is_submitted_and_its_resubmission_billed(env, emulator):
    # Given Azure recording the event but answering after the client gave up
    env.setenv("BILLING_AZURE_TIMEOUT_SECONDS", "0.3")
    emulator.delay(1.0)
    async with contextlib.AsyncExitStack() as stack:
        client = await azure.create(stack, no_secret, attempts=2)
        # When the hour is submitted, then again once Azure is quick
        (first,) = await client.submit(CUSTOMER, PERIOD, [entry()])
        emulator.delay(0)
        (again,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then the first answer is unknown, and the resubmission is billed under the event Azure recorded
    (held,) = emulator.accepted.values()
    assert first.state is LedgerState.SUBMITTED
    assert (again.state, again.record_id) == (LedgerState.DUPLICATE, held.usage_event_id)


async def test_fixed_access_token_skips_token_acquisition(env, emulator):
    # Given a fixed token for the local emulator
    env.setenv("BILLING_AZURE_ACCESS_TOKEN", "local-token")
    emulator.fixed_tokens.add("local-token")
    async with contextlib.AsyncExitStack() as stack:
        client = await azure.create(stack, no_secret, attempts=3)
        # When an hour is submitted
        (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is accepted and no token was requested
    assert result.state is LedgerState.ACCEPTED and emulator.token_requests == 0


async def test_client_credentials_can_come_from_secrets_manager(env, emulator):
    # Given the app's credentials in a secret, not in the environment
    for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        env.delenv(name)
    arn = "arn:aws:secretsmanager:eu-west-1:1:secret:azure"
    env.setenv("BILLING_AZURE_CREDENTIALS_SECRET_ARN", arn)
    stored = {"tenant_id": TENANT, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    async with contextlib.AsyncExitStack() as stack:
        client = await azure.create(stack, {arn: json.dumps(stored)}.__getitem__, attempts=3)
        # When an hour is submitted
        (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then the secret's credentials got the token
    assert result.state is LedgerState.ACCEPTED and emulator.token_requests == 1


async def test_missing_credentials_is_a_configuration_error(env):
    # Given no token, no credentials and no secret
    env.delenv("AZURE_CLIENT_SECRET")
    # When the adapter is built
    # Then it fails loudly
    with pytest.raises(ConfigurationError):
        async with contextlib.AsyncExitStack() as stack:
            await azure.create(stack, no_secret, attempts=3)


async def test_customer_without_a_plan_is_a_permanent_error(client):
    # Given a customer lacking Azure's identifiers
    # When it is submitted
    # Then nothing can ever be billed for it
    with pytest.raises(PermanentError):
        await client.submit(customer(azure_plan_id=None), PERIOD, [entry()])


async def test_a_403_that_persists_after_a_fresh_token_is_a_refusal_recorded(client, emulator):
    # Given Microsoft refusing every batch with 403 (a token for another Entra app: the offer was published
    # with another app id), however fresh the token
    emulator.fail_next(*[403] * 20)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then after one fresh token it is REJECTED with Microsoft's answer (nothing was taken; retrying cannot
    # change it), not FAILED and retried into the dead-letter queue
    assert result.state is LedgerState.REJECTED and "403" in (result.reason or "")
    assert len(batches(emulator)) == 2
