"""The GCP adapter speaking real HTTP to the Service Control emulator.

The emulator (billing_local.emulators.gcp) is an HTTP double that follows Google's documented API: the OAuth2
JWT bearer grant at the key file's ``token_uri`` (signature verified), bearer tokens required,
``services.check`` verdicts, ``services.report`` with per-operation ``reportErrors``, deduplication by
``operationId``. Requests and answers are validated against Google's discovery document
(tests/fixtures/specs/gcp-servicecontrol-v1.json).
"""

from __future__ import annotations

import contextlib
import json
import socket
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from billing.adapters import gcp_service_control as gcp
from billing.domain.errors import ConfigurationError, PermanentError
from billing.domain.model import Customer, CustomerStatus, LedgerEntry, LedgerState, Marketplace, Period
from billing_local.emulators.gcp import GcpEmulator, create_app, make_service_account_key
from billing_local.emulators.server import BackgroundServer
from marketplace_specs import documented_gcp_report, gcp_method, validate_gcp

PERIOD = Period(datetime(2026, 11, 26, 13, tzinfo=UTC))
NOW = PERIOD.end + timedelta(minutes=20)
SERVICE = "saas-example.gcpmarketplace.example.com"
CONSUMER = "project_number:731942518844"
CUSTOMER = Customer(
    id="cust-gcp-1",
    marketplace=Marketplace.GCP,
    status=CustomerStatus.ACTIVE,
    active_from=datetime(2026, 1, 1, tzinfo=UTC),
    active_until=None,
    gcp_usage_reporting_id=CONSUMER,
    gcp_service_name=SERVICE,
)
_ENV = (
    "BILLING_GCP_SERVICE_CONTROL_URL",
    "BILLING_GCP_ACCESS_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "BILLING_GCP_CREDENTIALS_SECRET_ARN",
)


def entry(dimension: str = "api_calls", quantity: int = 42) -> LedgerEntry:
    return LedgerEntry(CUSTOMER.id, dimension, PERIOD, quantity, LedgerState.SUBMITTED, attempts=1)


def no_secret(arn: str) -> str:
    raise AssertionError(f"no secret expected, asked for {arn}")


@pytest.fixture
def emulator() -> GcpEmulator:
    return GcpEmulator(
        services={SERVICE: {"api_calls", "storage_gib"}}, consumers={CONSUMER: []}, clock=lambda: NOW
    )


@pytest.fixture
def server(emulator):
    with BackgroundServer(create_app(emulator)) as running:
        yield running


@pytest.fixture
def key_file(tmp_path, server, emulator):
    key = make_service_account_key(f"{server.url}/token")
    emulator.trust(key)
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(key))
    return path


@pytest.fixture
def env(monkeypatch, server, key_file):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BILLING_GCP_SERVICE_CONTROL_URL", server.url)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    return monkeypatch


@pytest.fixture
async def client(env):
    async with contextlib.AsyncExitStack() as stack:
        yield await gcp.create(stack, no_secret, attempts=3)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def direct_client(server, key_file, *, read_timeout: float = 10.0, monotonic=None, endpoint=None):
    """The adapter built by hand: a short timeout or a controllable clock for the check cache."""
    tokens = gcp.ServiceAccountTokens(json.loads(key_file.read_text()), timeout=10.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=read_timeout)) as session:
        options = {"monotonic": monotonic} if monotonic else {}
        yield gcp.GcpServiceControlClient(
            session, tokens, endpoint=endpoint or server.url, attempts=3, **options
        )
    tokens.close()


async def test_report_request_is_valid_against_the_discovery_document(client, emulator):
    # Given two dimensions to report
    # When the hour is submitted
    await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 42), entry("storage_gib", 7)])
    # Then the check and report bodies are a CheckRequest and a ReportRequest, with Google's required fields
    (check,) = emulator.calls("check")
    (report,) = emulator.calls("report")
    validate_gcp(gcp_method("check")["request"]["$ref"], check.body)
    validate_gcp(gcp_method("report")["request"]["$ref"], report.body)
    documented_gcp_report(report.body)


async def test_emulator_answers_are_valid_against_the_discovery_document(client, emulator):
    # Given one operation Google will refuse and one it takes
    emulator.fail_operation("storage_gib", "INVALID_ARGUMENT")
    # When the hour is submitted
    await client.submit(CUSTOMER, PERIOD, [entry("api_calls"), entry("storage_gib")])
    # Then the answers are a CheckResponse and a ReportResponse with a reportError
    validate_gcp(gcp_method("check")["response"]["$ref"], emulator.calls("check")[0].response)
    report = emulator.calls("report")[0].response
    validate_gcp(gcp_method("report")["response"]["$ref"], report)
    assert len(report["reportErrors"]) == 1


async def test_requests_go_to_the_documented_paths(client, emulator):
    # Given the discovery document's paths for check and report
    paths = {gcp_method(m)["flatPath"] for m in ("check", "report")}
    # When the hour is submitted
    await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then the emulator (routing v1/services/{service}:method) saw both, for the customer's service
    assert paths == {"v1/services/{serviceName}:check", "v1/services/{serviceName}:report"}
    assert [(e.method, e.service_name) for e in emulator.exchanges] == [
        ("check", SERVICE),
        ("report", SERVICE),
    ]


async def test_operation_carries_the_fields_google_documents(client, emulator):
    # Given one dimension
    # When the hour is submitted
    await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 42)])
    # Then the operation is the hourly usage report of the usageReportingId, named <service>/<metric>
    (operation,) = emulator.calls("report")[0].body["operations"]
    assert operation == {
        "operationId": gcp.operation_id(CUSTOMER.id, "api_calls", PERIOD),
        "operationName": "Hourly Usage Report",
        "consumerId": CONSUMER,
        "startTime": "2026-11-26T13:00:00Z",
        "endTime": "2026-11-26T14:00:00Z",
        "metricValueSets": [{"metricName": f"{SERVICE}/api_calls", "metricValues": [{"int64Value": "42"}]}],
        "userLabels": {"cloudmarketplace.googleapis.com/container_name": "cust-gcp-1"},
    }


async def test_accepted_operation_is_recorded_under_its_operation_id(client, emulator):
    # Given one dimension
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 42)])
    # Then it is accepted, its record id the operationId Google holds it under
    op_id = gcp.operation_id(CUSTOMER.id, "api_calls", PERIOD)
    assert (result.state, result.record_id) == (LedgerState.ACCEPTED, op_id)
    assert emulator.records[op_id].value == 42


async def test_resubmitted_hour_is_recorded_as_billed_with_the_original_id(client, emulator):
    # Given an hour Google already holds
    (first,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 42)])
    # When the same hour is submitted again (a redelivered message)
    (again,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 42)])
    # Then Google deduplicates it by operationId and it is recorded as billed under the same id, once
    assert again.state.billed and again.record_id == first.record_id
    assert len(emulator.records) == 1 and emulator.resubmissions == [first.record_id]


async def test_zero_quantity_is_reported_to_google(client, emulator):
    # Given an hour without usage
    # When it is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls", 0)])
    # Then a zero is reported, keeping the reports contiguous as Google asks
    assert result.state is LedgerState.ACCEPTED
    assert emulator.records[result.record_id].value == 0


async def test_check_runs_before_report_with_the_same_operation_id(client, emulator):
    # Given one dimension
    # When the hour is submitted
    await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then services.check came first and carried the report's operationId
    check, report = emulator.exchanges
    assert (check.method, report.method) == ("check", "report")
    assert check.body["operation"]["operationId"] == report.body["operations"][0]["operationId"]


async def test_check_verdict_is_cached_for_the_next_hour_of_the_consumer(client, emulator):
    # Given a consumer checked a moment ago
    await client.submit(CUSTOMER, PERIOD, [entry()])
    # When its next hour is submitted within Google's 60 seconds
    await client.submit(CUSTOMER, PERIOD.shifted(1), [entry()])
    # Then the cached verdict is reused
    assert len(emulator.calls("check")) == 1 and len(emulator.calls("report")) == 2


async def test_check_error_rejects_the_hour_without_reporting(client, emulator):
    # Given a consumer whose billing Google reports disabled
    emulator.consumers = {CONSUMER: ["BILLING_DISABLED"]}
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is rejected with Google's reason and nothing is reported
    assert result.state is LedgerState.REJECTED and "BILLING_DISABLED" in (result.reason or "")
    assert emulator.calls("report") == []


async def test_check_outage_falls_back_to_the_last_verdict(server, key_file, emulator):
    # Given a consumer checked two minutes ago, and services.check now failing
    clock = FakeMonotonic()
    async with direct_client(server, key_file, monotonic=clock) as client:
        await client.submit(CUSTOMER, PERIOD, [entry()])
        clock.now += 120
        emulator.fail_next("check", 503, 503, 503)
        # When the next hour is submitted
        (result,) = await client.submit(CUSTOMER, PERIOD.shifted(1), [entry()])
    # Then Google's advice holds: the cached verdict stands in, and the hour is reported
    assert result.state is LedgerState.ACCEPTED


async def test_check_outage_without_a_verdict_fails_the_hour_unreported(client, emulator):
    # Given services.check failing and no verdict yet
    emulator.fail_next("check", 503, 503, 503)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is FAILED (certainly not taken) and nothing is reported
    assert result.state is LedgerState.FAILED
    assert emulator.calls("report") == []


async def test_report_errors_are_handled_one_operation_at_a_time(client, emulator):
    # Given one operation Google refuses
    emulator.fail_operation("storage_gib", "INVALID_ARGUMENT")
    # When both dimensions are submitted
    calls, storage = await client.submit(CUSTOMER, PERIOD, [entry("api_calls"), entry("storage_gib")])
    # Then only that one is rejected, with Google's code; the other is accepted
    assert calls.state is LedgerState.ACCEPTED
    assert storage.state is LedgerState.REJECTED and (storage.reason or "").startswith("INVALID_ARGUMENT")


async def test_transient_report_error_is_retried_until_accepted(client, emulator):
    # Given one UNAVAILABLE reportError, then Google recovers
    emulator.fail_operation("api_calls", "UNAVAILABLE")
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls")])
    # Then the operation was sent again and accepted
    assert result.state is LedgerState.ACCEPTED and len(emulator.calls("report")) == 2


async def test_transient_report_error_that_persists_is_failed(client, emulator):
    # Given UNAVAILABLE on every attempt
    emulator.fail_operation("api_calls", "UNAVAILABLE", "UNAVAILABLE", "UNAVAILABLE")
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry("api_calls")])
    # Then it is FAILED: a reportError means the operation was not processed
    assert result.state is LedgerState.FAILED and result.retryable


async def test_server_error_on_report_is_submitted_because_its_outcome_is_unknown(client, emulator):
    # Given HTTP 503 on every report attempt
    emulator.fail_next("report", 503, 503, 503)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is SUBMITTED: Google calls a failed report RPC non-deterministic
    assert result.state is LedgerState.SUBMITTED and "503" in (result.reason or "")


async def test_throttled_report_is_retried_until_accepted(client, emulator):
    # Given one HTTP 429
    emulator.fail_next("report", 429)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then the retry is accepted
    assert result.state is LedgerState.ACCEPTED and len(emulator.calls("report")) == 2


async def test_bad_request_is_rejected(client, emulator):
    # Given Google refusing the whole report as INVALID_ARGUMENT
    emulator.fail_next("report", 400)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is rejected, with the reason kept, and not retried
    assert result.state is LedgerState.REJECTED and "INVALID_ARGUMENT" in (result.reason or "")
    assert len(emulator.calls("report")) == 1


async def test_revoked_token_is_refreshed_once_on_401(client, emulator):
    # Given a token Google no longer honours
    await client.submit(CUSTOMER, PERIOD, [entry()])
    emulator.revoke_tokens()
    # When the next hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD.shifted(1), [entry()])
    # Then the 401 made the adapter fetch a new token and repeat the call
    assert result.state is LedgerState.ACCEPTED and emulator.token_requests == 2
    assert [e.status for e in emulator.calls("report")] == [200, 401, 200]


async def test_token_is_refreshed_before_it_expires(client, emulator):
    # Given tokens that expire within the refresh margin
    emulator.advertised_lifetime = 60
    # When two hours are submitted
    await client.submit(CUSTOMER, PERIOD, [entry()])
    await client.submit(CUSTOMER, PERIOD.shifted(1), [entry()])
    # Then every call (a check and two reports) had a fresh token, and none was refused
    assert emulator.token_requests == len(emulator.exchanges) == 3
    assert all(e.status == 200 for e in emulator.exchanges)


async def test_valid_token_is_reused(client, emulator):
    # Given an hour-long token
    # When two hours are submitted
    await client.submit(CUSTOMER, PERIOD, [entry()])
    await client.submit(CUSTOMER, PERIOD.shifted(1), [entry()])
    # Then one token served both
    assert emulator.token_requests == 1


async def test_token_endpoint_refuses_a_key_it_does_not_know(env, tmp_path, server, emulator):
    # Given a key file whose signature the token endpoint cannot verify
    stranger = tmp_path / "stranger.json"
    unknown_key = make_service_account_key(f"{server.url}/token", email="x@y.iam.gserviceaccount.com")
    stranger.write_text(json.dumps(unknown_key))
    env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(stranger))
    async with contextlib.AsyncExitStack() as stack:
        client = await gcp.create(stack, no_secret, attempts=3)
        # When an hour is submitted
        (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then no token is had, nothing is sent, and the hour is FAILED
    assert result.state is LedgerState.FAILED and "no access token" in (result.reason or "")
    assert emulator.exchanges == []


async def test_timeout_after_sending_is_submitted_and_its_resubmission_billed(server, key_file, emulator):
    async with direct_client(server, key_file, read_timeout=0.3) as client:
        await client.submit(CUSTOMER, PERIOD.shifted(-1), [entry()])  # a check verdict in the cache
        # Given Google recording the report but answering too late
        emulator.delay("report", 1.0)
        # When the hour is submitted
        (first,) = await client.submit(CUSTOMER, PERIOD, [entry()])
        emulator.delay("report", 0)
        (again,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then the first answer is unknown (SUBMITTED) and the resubmission is billed under the same operationId
    assert first.state is LedgerState.SUBMITTED
    op_id = gcp.operation_id(CUSTOMER.id, "api_calls", PERIOD)
    assert (again.state, again.record_id) == (LedgerState.ACCEPTED, op_id)
    assert list(emulator.records) == [gcp.operation_id(CUSTOMER.id, "api_calls", PERIOD.shifted(-1)), op_id]


async def test_connection_refused_is_failed(server, key_file):
    # Given nothing listening where Service Control should be
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    async with direct_client(server, key_file, endpoint=endpoint) as client:
        # When the hour is submitted
        (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is FAILED: the request never left
    assert result.state is LedgerState.FAILED and "ClientConnectorError" in (result.reason or "")


async def test_late_hour_is_still_reported(client, emulator):
    # Given an hour that ended three hours ago
    emulator.clock = lambda: PERIOD.end + timedelta(hours=3)
    # When it is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then Google takes it (it rejects no late report) and marks it late
    assert result.state is LedgerState.ACCEPTED and emulator.records[result.record_id].late


async def test_final_hour_of_a_cancelled_entitlement_ends_at_the_cancellation(client, emulator):
    # Given an entitlement cancelled mid-hour, which services.check now refuses
    emulator.consumers = {CONSUMER: ["SERVICE_NOT_ACTIVATED"]}
    cancelled = Customer(**{**CUSTOMER.__dict__, "active_until": PERIOD.start + timedelta(minutes=30)})
    # When the hour is submitted
    (result,) = await client.submit(cancelled, PERIOD, [entry()])
    # Then the usage up to the cancellation is reported, ending at it, without a check
    assert result.state is LedgerState.ACCEPTED and emulator.calls("check") == []
    assert emulator.records[result.record_id].end_time == PERIOD.start + timedelta(minutes=30)


async def test_an_hour_before_a_cancellation_billed_after_it_is_reported_without_a_check(client, emulator):
    # Given an entitlement cancelled in the hour after PERIOD, which services.check now refuses (its final
    # bills go out at once, or the cancellation arrived while PERIOD's bill was in flight)
    emulator.consumers = {CONSUMER: ["SERVICE_NOT_ACTIVATED"]}
    cancelled = Customer(**{**CUSTOMER.__dict__, "active_until": PERIOD.end + timedelta(minutes=20)})
    # When the whole hour before the cancellation is submitted
    (result,) = await client.submit(cancelled, PERIOD, [entry()])
    # Then its usage is reported, for the whole hour, without a check the cancellation would fail
    assert result.state is LedgerState.ACCEPTED and emulator.calls("check") == []
    assert emulator.records[result.record_id].end_time == PERIOD.end


async def test_reports_hold_at_most_the_batch_limit(client, emulator):
    # Given more dimensions than one report holds
    emulator.services = {SERVICE: None}
    entries = [entry(f"metric_{i}") for i in range(gcp.RULES.batch_limit + 1)]
    # When the hour is submitted
    results = await client.submit(CUSTOMER, PERIOD, entries)
    # Then they went in two reports and all were accepted
    assert [len(e.body["operations"]) for e in emulator.calls("report")] == [gcp.RULES.batch_limit, 1]
    assert all(r.state is LedgerState.ACCEPTED for r in results)


async def test_fixed_access_token_skips_token_acquisition(env, emulator):
    # Given a fixed token for the local emulator
    env.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    env.setenv("BILLING_GCP_ACCESS_TOKEN", "local-token")
    emulator.fixed_tokens.add("local-token")
    async with contextlib.AsyncExitStack() as stack:
        client = await gcp.create(stack, no_secret, attempts=3)
        # When an hour is submitted
        (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is accepted and no token was requested
    assert result.state is LedgerState.ACCEPTED and emulator.token_requests == 0


async def test_key_file_can_come_from_secrets_manager(env, key_file, emulator):
    # Given the key file's content in a secret, not on disk
    env.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    env.setenv("BILLING_GCP_CREDENTIALS_SECRET_ARN", "arn:aws:secretsmanager:eu-west-1:1:secret:gcp")
    secrets = {"arn:aws:secretsmanager:eu-west-1:1:secret:gcp": key_file.read_text()}
    async with contextlib.AsyncExitStack() as stack:
        client = await gcp.create(stack, secrets.__getitem__, attempts=3)
        # When an hour is submitted
        (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then the secret's key was used
    assert result.state is LedgerState.ACCEPTED and emulator.token_requests == 1


async def test_missing_credentials_is_a_configuration_error(env):
    # Given no token, key file or secret
    env.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    # When the adapter is built
    # Then it fails loudly
    with pytest.raises(ConfigurationError):
        async with contextlib.AsyncExitStack() as stack:
            await gcp.create(stack, no_secret, attempts=3)


async def test_customer_without_a_usage_reporting_id_is_a_permanent_error(client):
    # Given a customer lacking Google's identifiers
    # When it is submitted
    # Then nothing can ever be reported for it
    with pytest.raises(PermanentError):
        await client.submit(
            Customer(**{**CUSTOMER.__dict__, "gcp_usage_reporting_id": None}), PERIOD, [entry()]
        )


@pytest.mark.parametrize("method", ["check", "report"])
async def test_permission_denied_is_a_refusal_recorded_not_retried(client, emulator, method):
    # Given Google answering 403 PERMISSION_DENIED to every call of one method: the caller lacks the
    # permission (google.rpc.Code; cloud.google.com/service-usage/docs/troubleshooting), which retrying
    # cannot change (AIP-194 retries only UNAVAILABLE)
    emulator.fail_next(method, *[403] * 20)
    # When the hour is submitted
    (result,) = await client.submit(CUSTOMER, PERIOD, [entry()])
    # Then it is REJECTED with Google's reason (not FAILED, which SQS would retry into the dead-letter queue)
    assert result.state is LedgerState.REJECTED and "PERMISSION_DENIED" in (result.reason or "")
    assert len(emulator.calls(method)) == 1
