"""Secrets come from Secrets Manager (moto's server) through Powertools Parameters, read once and cached.

``Runtime`` is the composition root the handlers build at import: these tests build it (or import a
handler module afresh, as a new execution environment does) with ``BILLING_*_SECRET_ARN`` variables
instead of the values themselves, and count every GetSecretValue request sent to moto's server.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.domain.errors import ConfigurationError
from billing.domain.model import Marketplace
from billing.entrypoints.loop import LOOP
from billing_local.emulators.gcp import make_service_account_key
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
