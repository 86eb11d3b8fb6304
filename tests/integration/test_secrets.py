"""Secrets come from Secrets Manager (moto's server) through Powertools Parameters, read once and cached.

``Runtime`` is the composition root the handlers build at import: these tests build it (or import a
handler module afresh, as a new execution environment does) with ``BILLING_*_SECRET_ARN`` variables
instead of the values themselves, and count every GetSecretValue request sent to moto's server.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from billing.adapters import azure_metering
from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.domain.errors import ConfigurationError
from billing.domain.model import Customer, CustomerStatus, LedgerEntry, LedgerState, Marketplace, Period
from billing.entrypoints.loop import LOOP
from billing_local.emulators.azure import (
    AzureEmulator,
    AzureResource,
    HttpsServer,
    create_token_app,
    self_signed_certificate,
)
from billing_local.emulators.azure import create_app as create_azure_app
from billing_local.emulators.gcp import GcpEmulator, make_service_account_key
from billing_local.emulators.gcp import create_app as create_gcp_app
from billing_local.emulators.server import BackgroundServer
from billing_local.lambda_shapes import LambdaContext
from es_double import EsState, api_key, create_app
from testkit import HOUR, Secrets, add_aws_customer

FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"
MISSING_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:billing/missing-AbCdEf"


def cold_start(function: str) -> ModuleType:
    """Import a handler module afresh, as a new execution environment does: its init code runs again."""
    path = FUNCTIONS / function / f"{function}.py"
    spec = importlib.util.spec_from_file_location(f"{function}_cold_start_{uuid.uuid4().hex[:6]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rds_secret(database_url: str, password: str) -> str:
    """RDS's JSON secret for the test database.

    The embedded server's host is its socket directory, and it trusts the socket: ``password`` is
    accepted and ignored. A server named by DATABASE_URL gets its own password instead.
    """
    parts = urlsplit(database_url)
    return json.dumps(
        {
            "engine": "postgres",
            "host": parts.hostname or parse_qs(parts.query)["host"][0],
            "port": parts.port or 5432,
            "username": parts.username,
            "password": parts.password or password,
            "dbname": parts.path.lstrip("/"),
            "dbInstanceIdentifier": "billing",
        }
    )


async def _database_of(runtime: Runtime) -> str:
    try:
        pool = await runtime.pool()
        name: str = await pool.fetchval("SELECT current_database()")
        return name
    finally:
        await runtime.close()


async def test_a_dsn_secret_gives_a_working_pool(
    secrets: Secrets, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the DSN stored as a plain-text secret
    monkeypatch.setenv("BILLING_DATABASE_SECRET_ARN", secrets.create(database_url))
    # When the runtime opens its pool
    database = await _database_of(Runtime(load_settings()))
    # Then it is connected to the secret's database
    assert database == urlsplit(database_url).path.lstrip("/")


async def test_an_rds_json_secret_gives_a_working_pool(
    secrets: Secrets, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given RDS's JSON secret, with a password that needs escaping in a URL (the embedded server
    # trusts its socket: it accepts and ignores the password)
    arn = secrets.create(rds_secret(database_url, "p@ss word/with:odd%chars"))
    monkeypatch.setenv("BILLING_DATABASE_SECRET_ARN", arn)
    # When the runtime opens its pool
    database = await _database_of(Runtime(load_settings()))
    # Then it is connected to the database the secret names
    assert database == urlsplit(database_url).path.lstrip("/")


def test_the_database_secret_is_read_once_across_warm_invocations(
    secrets: Secrets, database_url: str, moto_url: str, queues: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a Dispatcher whose database DSN is in a secret, and customers to dispatch
    async def seed() -> None:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
        for i in range(3):
            await add_aws_customer(pool, f"cust-{i:06d}")
        await pool.close()

    LOOP.run_until_complete(seed())
    arn = secrets.create(database_url)
    monkeypatch.setenv("BILLING_DATABASE_SECRET_ARN", arn)
    monkeypatch.setenv("BILLING_QUEUE_URL", queues.url)
    # When a new execution environment starts and is invoked twice
    dispatcher = cold_start("dispatcher")
    try:
        context = LambdaContext.of("billing-dispatcher")
        first = dispatcher.lambda_handler({"period": HOUR.isoformat()}, context)
        second = dispatcher.lambda_handler({"period": HOUR.isoformat()}, context)
    finally:
        LOOP.run_until_complete(dispatcher.runtime.close())
    # Then both invocations worked and Secrets Manager was asked once
    assert (first["dispatched"], second["already_dispatched"]) == (3, True)
    assert secrets.reads == [arn]


def test_a_missing_database_secret_fails_the_cold_start_with_a_configuration_error(
    secrets: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a database secret ARN that names no secret
    monkeypatch.setenv("BILLING_DATABASE_SECRET_ARN", MISSING_ARN)
    # When a new execution environment imports the Biller
    with pytest.raises(ConfigurationError) as failed:
        cold_start("biller")
    # Then its init fails, saying which secret and why
    assert MISSING_ARN in str(failed.value)
    assert "ResourceNotFoundException" in str(failed.value)
    assert secrets.reads == [MISSING_ARN]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ('{"username": "billing", "password": "Leak-Me-1"', "neither a DSN nor RDS's JSON secret"),
        ('{"username": "billing", "password": "Leak-Me-1"}', "lacks host"),
    ],
    ids=["not-json", "no-host"],
)
def test_an_unusable_database_secret_is_a_configuration_error_that_hides_its_value(
    secrets: Secrets, monkeypatch: pytest.MonkeyPatch, stored: str, expected: str
) -> None:
    # Given a database secret that is not a DSN and not a complete RDS secret
    monkeypatch.setenv("BILLING_DATABASE_SECRET_ARN", secrets.create(stored))
    # When the runtime is built
    with pytest.raises(ConfigurationError) as failed:
        Runtime(load_settings())
    # Then the error says what is wrong without the password, and chains no error that holds the text
    error = failed.value
    assert expected in str(error)
    assert "Leak-Me-1" not in str(error)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


async def test_an_elasticsearch_api_key_secret_authenticates_the_usage_source(
    secrets: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an Elasticsearch that only accepts one API key, and that key in a secret
    key = api_key("usage-reader", "s3cret-from-secrets-manager")
    state = EsState(api_keys={key})
    state.index(
        "usage-1", {"@timestamp": "2026-11-26T13:05:00Z", "customer_id": "c1", "metric": "m", "quantity": 2}
    )
    arn = secrets.create(key)
    with BackgroundServer(create_app(state)) as es:
        for name, value in {
            "BILLING_USAGE_SOURCE": "elasticsearch",
            "BILLING_ES_URL": es.url,
            "BILLING_ES_API_KEY_SECRET_ARN": arn,
        }.items():
            monkeypatch.setenv(name, value)
        runtime = Runtime(load_settings())
        try:
            # When the usage source reads an hour
            totals = await (await runtime.usage_source()).hourly_usage("c1", HOUR.start, HOUR.end)
        finally:
            await runtime.close()
    # Then the secret's key was accepted
    assert [(t.metric, t.quantity) for t in totals] == [("m", Decimal(2))]
    assert secrets.reads == [arn]


async def test_marketplace_credentials_are_read_once_however_many_environments_build_them(
    secrets: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given Google's service-account key and Azure's app credentials in secrets
    gcp_arn = secrets.create(json.dumps(make_service_account_key("http://127.0.0.1:9/token")))
    azure_arn = secrets.create(
        json.dumps({"tenant_id": "t-1", "client_id": "c-1", "client_secret": "Azure-Leak-1"})
    )
    monkeypatch.setenv("BILLING_GCP_CREDENTIALS_SECRET_ARN", gcp_arn)
    monkeypatch.setenv("BILLING_AZURE_CREDENTIALS_SECRET_ARN", azure_arn)
    # When two runtimes in one process (Powertools' cache lives for the process) build both adapters
    for _ in range(2):
        runtime = Runtime(load_settings())
        try:
            await runtime.marketplace(Marketplace.GCP)
            await runtime.marketplace(Marketplace.AZURE)
        finally:
            await runtime.close()
    # Then each secret was fetched once (max_age), and no token was asked for yet
    assert sorted(secrets.reads) == sorted([gcp_arn, azure_arn])


async def test_a_missing_marketplace_secret_is_a_configuration_error(
    secrets: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a Google credentials ARN that names no secret
    monkeypatch.setenv("BILLING_GCP_CREDENTIALS_SECRET_ARN", MISSING_ARN)
    runtime = Runtime(load_settings())
    # When the Google adapter is built (the first time a Google customer is billed)
    with pytest.raises(ConfigurationError) as failed:
        await runtime.marketplace(Marketplace.GCP)
    await runtime.close()
    # Then the error names the secret
    assert MISSING_ARN in str(failed.value)


# --- rotated marketplace credentials ------------------------------------------------------------------
# The marketplace emulators (billing_local.emulators.gcp and .azure) follow the documented token flows:
# Google's JWT bearer grant verified against the service account's current public key, and Entra's client
# credentials checked against the app's current client secret; a revoked or expired token is refused with
# 401 (Service Control) or 403 (Azure metering).

GCP_SERVICE = "saas-example.gcpmarketplace.example.com"
GCP_CUSTOMER = Customer(
    id="cust-gcp-1",
    marketplace=Marketplace.GCP,
    status=CustomerStatus.ACTIVE,
    active_from=datetime(2026, 1, 1, tzinfo=UTC),
    active_until=None,
    gcp_usage_reporting_id="project_number:731942518844",
    gcp_service_name=GCP_SERVICE,
)
AZURE_RESOURCE = "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"
AZURE_TENANT = "00000000-0000-0000-0000-0000000000aa"
AZURE_CLIENT = "11111111-2222-3333-4444-555555555555"
AZURE_CUSTOMER = Customer(
    id="cust-az-1",
    marketplace=Marketplace.AZURE,
    status=CustomerStatus.ACTIVE,
    active_from=datetime(2026, 1, 1, tzinfo=UTC),
    active_until=None,
    azure_resource_id=AZURE_RESOURCE,
    azure_plan_id="gold",
)
WITHIN_WINDOW = HOUR.end + timedelta(minutes=20)


def api_calls(customer: Customer, period: Period) -> LedgerEntry:
    return LedgerEntry(customer.id, "api_calls", period, 5, LedgerState.SUBMITTED, attempts=1)


@contextlib.contextmanager
def google(secrets: Secrets, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[GcpEmulator, str, str]]:
    """Service Control's emulator trusting one service-account key, that key in a secret; (emulator, its
    token URL, the secret's ARN)."""
    emulator = GcpEmulator(
        services={GCP_SERVICE: {"api_calls"}},
        consumers={GCP_CUSTOMER.gcp_usage_reporting_id or "": []},
        clock=lambda: WITHIN_WINDOW,
    )
    with BackgroundServer(create_gcp_app(emulator)) as server:
        key = make_service_account_key(f"{server.url}/token")
        emulator.trust(key)
        arn = secrets.create(json.dumps(key))
        monkeypatch.setenv("BILLING_GCP_CREDENTIALS_SECRET_ARN", arn)
        monkeypatch.setenv("BILLING_GCP_SERVICE_CONTROL_URL", server.url)
        yield emulator, f"{server.url}/token", arn


async def test_a_rotated_google_key_is_read_again_when_the_old_one_is_refused(
    secrets: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    with google(secrets, monkeypatch) as (emulator, token_url, arn):
        runtime = Runtime(load_settings())
        try:
            client = await runtime.marketplace(Marketplace.GCP)
            await client.submit(GCP_CUSTOMER, HOUR, [api_calls(GCP_CUSTOMER, HOUR)])
            # Given the service account's key rotated: Google honours only the new key and no token of
            # the old one, and the secret holds the new key
            new_key = make_service_account_key(token_url)
            emulator.trust(new_key)
            emulator.revoke_tokens()
            secrets.client.put_secret_value(SecretId=arn, SecretString=json.dumps(new_key))
            # When the warm adapter reports the next hour
            (result,) = await client.submit(
                GCP_CUSTOMER, HOUR.shifted(1), [api_calls(GCP_CUSTOMER, HOUR.shifted(1))]
            )
        finally:
            await runtime.close()
    # Then the 401, and the old key's refused grant, made it read the secret again, and the hour is accepted
    assert result.state is LedgerState.ACCEPTED
    assert [e.status for e in emulator.calls("report")] == [200, 401, 200]
    assert secrets.reads == [arn, arn]


async def test_a_google_401_that_persists_after_one_reading_of_the_secret_rejects_the_hour(
    secrets: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    with google(secrets, monkeypatch) as (emulator, _, arn):
        runtime = Runtime(load_settings())
        try:
            client = await runtime.marketplace(Marketplace.GCP)
            await client.submit(GCP_CUSTOMER, HOUR, [api_calls(GCP_CUSTOMER, HOUR)])
            # Given Google refusing every report (401), with the key still valid and unchanged
            emulator.fail_next("report", *[401] * 20)
            # When the adapter reports the next hour (three attempts)
            (result,) = await client.submit(
                GCP_CUSTOMER, HOUR.shifted(1), [api_calls(GCP_CUSTOMER, HOUR.shifted(1))]
            )
        finally:
            await runtime.close()
    # Then the hour is REJECTED with Google's answer (nothing was taken, and retrying cannot change it: SQS
    # would only retry it into the dead-letter queue), and the unchanged secret was read again once
    assert result.state is LedgerState.REJECTED and "401" in (result.reason or "")
    assert secrets.reads == [arn, arn]


@contextlib.contextmanager
def azure(
    secrets: Secrets, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[AzureEmulator, str]]:
    """The metering emulator and Entra's token endpoint (over TLS, as azure-identity requires), the app's
    client secret in a Secrets Manager secret; (emulator, the secret's ARN)."""
    emulator = AzureEmulator(
        resources={AZURE_RESOURCE: AzureResource(plan_id="gold", dimensions={"api_calls"})},
        tenant_id=AZURE_TENANT,
        clients={AZURE_CLIENT: "client-secret-A"},
        clock=lambda: WITHIN_WINDOW,
    )
    certificate = self_signed_certificate(tmp_path)
    verify = str(certificate[0])
    trusted = functools.partial(azure_metering.client_secret_credential, connection_verify=verify)
    monkeypatch.setattr(azure_metering, "client_secret_credential", trusted)
    with (
        BackgroundServer(create_azure_app(emulator)) as metering,
        HttpsServer(create_token_app(emulator), *certificate) as entra,
    ):
        arn = secrets.create(azure_credentials("client-secret-A"))
        monkeypatch.setenv("BILLING_AZURE_CREDENTIALS_SECRET_ARN", arn)
        monkeypatch.setenv("BILLING_AZURE_METERING_URL", metering.url)
        monkeypatch.setenv("AZURE_AUTHORITY_HOST", entra.url)
        yield emulator, arn


def azure_credentials(client_secret: str) -> str:
    return json.dumps({"tenant_id": AZURE_TENANT, "client_id": AZURE_CLIENT, "client_secret": client_secret})


async def test_a_rotated_azure_client_secret_is_read_again_when_the_old_one_is_refused(
    secrets: Secrets, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with azure(secrets, monkeypatch, tmp_path) as (emulator, arn):
        runtime = Runtime(load_settings())
        try:
            client = await runtime.marketplace(Marketplace.AZURE)
            await client.submit(AZURE_CUSTOMER, HOUR, [api_calls(AZURE_CUSTOMER, HOUR)])
            # Given the app's client secret rotated in Entra (the old one deleted, its token gone) and in
            # the secret
            emulator.clients = {AZURE_CLIENT: "client-secret-B"}
            emulator.revoke_tokens()
            secrets.client.put_secret_value(SecretId=arn, SecretString=azure_credentials("client-secret-B"))
            # When the warm adapter submits the next hour
            (result,) = await client.submit(
                AZURE_CUSTOMER, HOUR.shifted(1), [api_calls(AZURE_CUSTOMER, HOUR.shifted(1))]
            )
        finally:
            await runtime.close()
    # Then the 403, and Entra's refusal of the old client secret, made it read the secret again, and the
    # hour is accepted
    assert result.state is LedgerState.ACCEPTED
    assert [e.status for e in emulator.exchanges if e.path == "/api/batchUsageEvent"] == [200, 403, 200]
    assert secrets.reads == [arn, arn]
