"""No secret reaches a log line or an APM event: an hour billed with known secret values, then failures.

The hour runs through the real handlers (Dispatcher, then the Biller once per message) with every
credential the billing code holds set to a known value: a database password in the DSN (the embedded
PostgreSQL trusts its socket, so it accepts and ignores the password), an Elasticsearch API key (usage
read from the Elasticsearch double, which enforces it), and the Google and Azure bearer tokens (their
emulators accept only those). Then the same handlers fail with those secrets in play: a database that
cannot be opened, Elasticsearch and Azure answering errors. Those failures are captured as APM error
events, whose stack frames may carry local variables.

Everything the run printed (stdout and stderr, every logging handler included) and every APM event
(the real agent with the in-memory transport, configured with the data-capture settings of
template.yaml) is searched for each secret, raw and in the encodings it travels in: URL-quoted,
base64, JSON-escaped, and an API key both encoded and decoded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

import asyncpg
import pytest
from pydantic import SecretStr

from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.entrypoints.loop import LOOP
from billing_local.apm_capture import CAPTURE
from billing_local.emulators import azure, gcp
from billing_local.emulators.server import BackgroundServer
from billing_local.lambda_shapes import LambdaContext
from billing_local.seed import seed
from billing_local.stack import LocalStack, QueueSettings
from billing_local.template import function_config
from es_double import EsState, api_key
from es_double import create_app as es_app
from testkit import HOUR, lambda_records, within_window

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        bool(os.environ.get("DATABASE_URL")),
        reason="a known password in the DSN needs the embedded server, which trusts its socket",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
DB_PASSWORD = "Pg-Leak/pa55:w@rd%+ü"  # every character class a DSN must escape
ES_KEY_ID, ES_KEY_SECRET = "usage-reader", "Es-Leak-k3y-9f8e7d6c"
ES_API_KEY = api_key(ES_KEY_ID, ES_KEY_SECRET)
GCP_TOKEN = "ya29.Gcp-Leak-t0ken-4c3b2a19"
AZURE_TOKEN = "eyJ0eXAi.Azure-Leak-t0ken-1a2b3c4d"
CUSTOMERS = 6  # two of each marketplace

# The agent settings that decide what an event may carry, as template.yaml deploys them
APM_DATA_SETTINGS = {
    "ELASTIC_APM_COLLECT_LOCAL_VARIABLES": "collect_local_variables",
    "ELASTIC_APM_LOCAL_VAR_MAX_LENGTH": "local_var_max_length",
    "ELASTIC_APM_SANITIZE_FIELD_NAMES": "sanitize_field_names",
    "ELASTIC_APM_CAPTURE_BODY": "capture_body",
    "ELASTIC_APM_CAPTURE_HEADERS": "capture_headers",
}


def forms(secret: str) -> set[str]:
    """The secret as it may travel: raw, URL-quoted, base64 (standard and URL-safe), JSON-escaped."""
    raw = secret.encode()
    return {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }


SECRETS = {
    "database password": forms(DB_PASSWORD),
    # the encoded credential (what the client sends), its decoded "id:key" and the key alone
    "Elasticsearch API key": forms(ES_API_KEY) | forms(f"{ES_KEY_ID}:{ES_KEY_SECRET}") | forms(ES_KEY_SECRET),
    "Google access token": forms(GCP_TOKEN),
    "Azure access token": forms(AZURE_TOKEN),
}


def leaks(text: str) -> dict[str, list[str]]:
    """Which secrets appear in ``text``, and in which forms."""
    found = {name: sorted(f for f in variants if f in text) for name, variants in SECRETS.items()}
    return {name: variants for name, variants in found.items() if variants}


def with_password(dsn: str, password: str = DB_PASSWORD, database: str | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username}:{quote(password, safe='')}@{parts.hostname or ''}"
    path = f"/{database}" if database else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


# --- what the run printed ---------------------------------------------------------------------------


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time (the test's capture while it runs)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@contextlib.contextmanager
def every_handler_writing_to_stderr() -> Iterator[None]:
    """Point every logging stream handler at the captured sys.stderr for the block.

    Powertools' handlers keep the stream they were created with, often a stream of an earlier test.
    """
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    handlers = {h for logger in loggers for h in logger.handlers if type(h) is logging.StreamHandler}
    moved = [(handler, handler.stream) for handler in handlers]
    for handler, _ in moved:
        handler.stream = _CurrentStderr()
    try:
        yield
    finally:
        for handler, stream in moved:
            handler.stream = stream


@dataclass
class Output:
    capfd: pytest.CaptureFixture[str]
    caplog: pytest.LogCaptureFixture

    def everything(self) -> str:
        """stdout, stderr, log records with their extras, and every APM event line."""
        out, err = self.capfd.readouterr()
        records = "\n".join(f"{r.getMessage()} {r.__dict__!r}" for r in self.caplog.records)
        events = "\n".join(json.dumps(line, ensure_ascii=False) for line in CAPTURE.events)
        return "\n".join((out, err, records, events))


@pytest.fixture
def output(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Iterator[Output]:
    caplog.set_level(logging.DEBUG)
    with every_handler_writing_to_stderr():
        yield Output(capfd, caplog)


# --- the agent, configured as template.yaml deploys it --------------------------------------------


def template_apm_settings() -> dict[str, str]:
    environment = function_config(ROOT / "template.yaml", "Biller").environment
    return {attr: value for var, attr in APM_DATA_SETTINGS.items() if (value := environment.get(var))}


@contextlib.contextmanager
def agent_settings(settings: dict[str, str]) -> Iterator[Any]:
    """The process's APM agent (built when a handler module was first imported) with these settings."""
    import elasticapm

    import biller  # noqa: F401  (importing a handler module builds the agent's client)

    client = elasticapm.get_client()
    assert client is not None
    assert not client.config.update("no-secrets-leak", **settings)
    try:
        yield client
    finally:
        client.config.reset()


# --- the stack: Postgres, SQS and AWS metering from the fixtures; ES, Google and Azure doubles here --


@dataclass
class Doubles:
    es: EsState
    gcp: gcp.GcpEmulator
    azure: azure.AzureEmulator


@pytest.fixture
def doubles(stack: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Doubles]:
    es_state = EsState(api_keys={ES_API_KEY})
    gcp_state = gcp.GcpEmulator(services={}, consumers={}, clock=within_window, fixed_tokens={GCP_TOKEN})
    azure_state = azure.AzureEmulator(resources={}, clock=within_window, fixed_tokens={AZURE_TOKEN})
    stack.metering.clock = within_window
    with (
        BackgroundServer(es_app(es_state)) as es_server,
        BackgroundServer(gcp.create_app(gcp_state)) as gcp_server,
        BackgroundServer(azure.create_app(azure_state)) as azure_server,
    ):
        for name, value in {
            "DATABASE_URL": with_password(stack.database_url),
            "BILLING_USAGE_SOURCE": "elasticsearch",
            "BILLING_ES_URL": es_server.url,
            "BILLING_ES_API_KEY": ES_API_KEY,
            "BILLING_GCP_SERVICE_CONTROL_URL": gcp_server.url,
            "BILLING_GCP_ACCESS_TOKEN": GCP_TOKEN,
            "BILLING_AZURE_METERING_URL": azure_server.url,
            "BILLING_AZURE_ACCESS_TOKEN": AZURE_TOKEN,
        }.items():
            monkeypatch.setenv(name, value)
        # the marketplaces as the local stack holds them, to subscribe the customers the same way
        local = LocalStack(
            database_url=stack.database_url,
            moto_url="",
            queue_url=stack.queues.url,
            dlq_url=stack.queues.dlq_url,
            metering=stack.metering,
            metering_url=stack.metering_url,
            gcp=gcp_state,
            azure=azure_state,
            queue=QueueSettings(),
        )
        LOOP.run_until_complete(_seed_customers(local, es_state))
        yield Doubles(es_state, gcp_state, azure_state)


async def _seed_customers(local: LocalStack, es: EsState) -> None:
    """The demo customers in Postgres, their usage in Elasticsearch, all subscribed."""
    from billing_local.local_run import subscribe_all

    pool = await asyncpg.create_pool(local.database_url, min_size=1, max_size=2)
    try:
        await seed(pool, CUSTOMERS, 1, 7, HOUR, ("aws", "gcp", "azure"))
        ids = [r["id"] for r in await pool.fetch("SELECT id FROM customers ORDER BY id")]
    finally:
        await pool.close()
    for customer in ids:
        es.index(
            "usage-2026.11.26",
            *(
                {"@timestamp": HOUR.start.isoformat(), "customer_id": customer, "metric": m, "quantity": 2.5}
                for m in ("capacity_gb_hours", "data_transfer_gb")
            ),
        )
    await subscribe_all(local)


@pytest.fixture
def handlers(doubles: Doubles, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, ModuleType]]:
    """The handler modules with runtimes built from this test's environment (as at a cold start)."""
    import biller
    import dispatcher

    runtimes = []
    for module in (biller, dispatcher):
        runtime = Runtime(load_settings(), clock=within_window if module is biller else None)
        monkeypatch.setattr(module, "runtime", runtime)
        runtimes.append(runtime)
    CAPTURE.reset()
    yield biller, dispatcher
    for runtime in runtimes:
        LOOP.run_until_complete(runtime.close())


def _bill_the_hour(biller: ModuleType, dispatcher: ModuleType, queue_url: str) -> list[dict[str, Any]]:
    dispatcher.lambda_handler({"period": HOUR.isoformat()}, LambdaContext.of())
    records = lambda_records(queue_url)
    return [biller.lambda_handler({"Records": [record]}, LambdaContext.of()) for record in records]


# --- the tests ------------------------------------------------------------------------------------


async def test_the_embedded_server_accepts_and_ignores_a_dsn_password(database_url: str) -> None:
    # Given the embedded server, which trusts connections on its socket (pg_hba: trust)
    # When the DSN carries the known password, or another one
    for password in (DB_PASSWORD, "not-the-password"):
        conn = await asyncpg.connect(with_password(database_url, password))
        try:
            methods = {
                r["auth_method"] for r in await conn.fetch("SELECT auth_method FROM pg_hba_file_rules")
            }
            database = await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()
        # Then both connect: the password travels in the DSN without mattering to the server
        assert methods == {"trust"}
        assert database == urlsplit(database_url).path.lstrip("/")


def test_a_billed_hour_leaks_no_secret(
    handlers: tuple[ModuleType, ModuleType], doubles: Doubles, stack: Any, output: Output
) -> None:
    biller, dispatcher = handlers
    with agent_settings(template_apm_settings()):
        # Given an hour of two customers per marketplace, every credential a known value
        # When the hour is dispatched and billed through the handlers
        responses = _bill_the_hour(biller, dispatcher, stack.queues.url)
    # Then every customer was billed, each secret having been used
    assert responses == [{"batchItemFailures": []}] * CUSTOMERS
    assert doubles.es.searches and doubles.gcp.records and doubles.azure.accepted
    assert stack.metering.accepted()
    # and no secret appears in anything printed, logged or sent to APM
    assert CAPTURE.of_type("transaction")
    assert leaks(output.everything()) == {}


def test_failures_with_the_secrets_in_play_leak_no_secret(
    handlers: tuple[ModuleType, ModuleType], doubles: Doubles, stack: Any, output: Output
) -> None:
    with agent_settings(template_apm_settings()):
        _fail_with_every_secret_in_play(handlers, doubles, stack)
    # Then the failures were captured as APM errors with their stack frames
    errors = CAPTURE.of_type("error")
    Path("/tmp/types.txt").write_text(
        repr([(e["exception"]["type"], e["exception"].get("message")) for e in errors])
    )
    assert {e["exception"]["type"] for e in errors} >= {"InvalidCatalogNameError", "TransientError"}
    assert all(e["exception"]["stacktrace"] for e in errors)
    # and no secret appears in anything printed, logged or sent to APM
    assert leaks(output.everything()) == {}


def test_the_check_finds_secrets_in_frame_locals_when_the_agent_collects_them(
    handlers: tuple[ModuleType, ModuleType], doubles: Doubles, stack: Any, output: Output
) -> None:
    # Given the agent's default: local variables of every frame of an error are captured
    with agent_settings({**template_apm_settings(), "collect_local_variables": "errors"}):
        # When the same failures happen
        _fail_with_every_secret_in_play(handlers, doubles, stack)
    # Then the search finds the DSN's password in the error events' frames: it can see a leak
    assert "database password" in leaks(output.everything())


def _fail_with_every_secret_in_play(
    handlers: tuple[ModuleType, ModuleType], doubles: Doubles, stack: Any
) -> None:
    biller, dispatcher = handlers
    # Given the hour dispatched; Azure, then Elasticsearch answering 503 to every call from then on
    dispatcher.lambda_handler({"period": HOUR.isoformat()}, LambdaContext.of())
    records = lambda_records(stack.queues.url)
    by_marketplace = _records_by_marketplace(records, stack.database_url)
    doubles.azure.fail_next(*[503] * 50)
    failed = biller.lambda_handler({"Records": [by_marketplace["azure"]]}, LambdaContext.of())
    assert len(failed["batchItemFailures"]) == 1
    doubles.es.fail_next(503, times=50)
    failed = biller.lambda_handler({"Records": [by_marketplace["aws"]]}, LambdaContext.of())
    assert len(failed["batchItemFailures"]) == 1
    # and a new execution environment whose DSN (with the password) names a database that does not exist
    missing = with_password(stack.database_url, database="no_such_database")
    settings = load_settings().model_copy(update={"database_url": SecretStr(missing)})
    fresh = [Runtime(settings), Runtime(settings)]
    for module, runtime in zip((biller, dispatcher), fresh, strict=True):
        LOOP.run_until_complete(module.runtime.close())
        module.runtime = runtime
    try:
        failed = biller.lambda_handler({"Records": [by_marketplace["gcp"]]}, LambdaContext.of())
        assert len(failed["batchItemFailures"]) == 1
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            dispatcher.lambda_handler({"period": HOUR.shifted(-1).isoformat()}, LambdaContext.of())
    finally:
        for runtime in fresh:
            LOOP.run_until_complete(runtime.close())


def _records_by_marketplace(records: list[dict[str, Any]], database_url: str) -> dict[str, dict[str, Any]]:
    async def marketplaces() -> dict[str, str]:
        conn = await asyncpg.connect(database_url)
        try:
            return {
                r["id"]: r["marketplace"] for r in await conn.fetch("SELECT id, marketplace FROM customers")
            }
        finally:
            await conn.close()

    of = LOOP.run_until_complete(marketplaces())
    return {of[json.loads(r["body"])["customer_id"]]: r for r in records}
