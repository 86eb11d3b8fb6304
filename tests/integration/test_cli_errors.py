"""Every expected failure of the `billing` command line is one or two lines on stderr, with an exit code.

Each test runs the installed `billing` entry point in a subprocess against a real failure: no settings,
a closed port, a real PostgreSQL refusing a password, a role or a database, an unmigrated database,
moto's SQS without the queue, no AWS credentials or region, a DSN that is not one, a host that does not
resolve, a Unix socket that is gone, a server without TLS, a dead local-stack admin endpoint, an hour not
yet ended, a report folder that does not exist, a malformed BILLING_LOCAL_NOW, no local stack. Exit 2
is a usage or configuration error, exit 1 a runtime one; no traceback unless `--debug`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from tests.tls_postgres import server_binaries

from billing.domain.model import hour_floor
from billing_local.stack import aws_env

if TYPE_CHECKING:
    from tests.conftest import Queues

BILLING = str(Path(sys.executable).parent / "billing")
HOUR = "2026-11-26T13:00:00Z"


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without any billing, database or AWS settings of the caller's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BILLING_", "AWS_", "DATABASE_", "ELASTIC_APM", "POWERTOOLS_"))
    }
    # no credentials from files or the instance metadata service either
    env |= {
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
        "AWS_CONFIG_FILE": "/nonexistent/config",
        "AWS_EC2_METADATA_DISABLED": "true",
        "COLUMNS": "200",
    }
    return env | extra


def billing(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BILLING, *args], env=env, capture_output=True, text=True, timeout=180, check=False)


# what `billing run` prints on stderr before it meets an error: the log file's path, its progress labels
RUN_CONTEXT = ("log lines: ", "customers dispatched for ", "customer-hours settled")


def assert_one_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """Exit ``code``, no traceback, one or two lines on stderr starting "error:" that say ``fragments``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # before the error only what a run says as it starts (where its log lines go, its progress)
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    before, message = lines[: errors[0]], lines[errors[0] :]
    assert all(line.startswith(RUN_CONTEXT) for line in before), proc.stderr
    assert 1 <= len(message) <= 2, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    return proc.stderr


def _database(dsn: str, name: str, user: str | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.rsplit('@', 1)[-1]}"
    return urlunsplit(parts._replace(path=f"/{name}", netloc=netloc))


def test_settings_missing_names_the_variable() -> None:
    proc = billing("seed", "--customers", "1", env=_clean_env())
    assert_one_error(proc, 2, "DATABASE_URL")


def test_a_run_without_settings_says_what_to_set_first_and_how_to_get_a_stack() -> None:
    # a newcomer outside `make demo`: nothing configured; the database comes first, then the queues
    proc = billing("run", "--period", HOUR, env=_clean_env())
    stderr = assert_one_error(proc, 2, "DATABASE_URL", "billing local up", "billing local env")
    assert stderr.startswith("error: "), "the error comes before any run has started"
    # a database but no queue: the queue variable, and the same way to a whole stack
    proc = billing("run", "--period", HOUR, env=_clean_env(DATABASE_URL="postgresql://u@127.0.0.1:1/db"))
    stderr = assert_one_error(proc, 2, "BILLING_QUEUE_URL", "billing local up")
    assert stderr.startswith("error: ")


def test_debug_keeps_the_traceback() -> None:
    proc = billing("--debug", "seed", "--customers", "1", env=_clean_env())
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigurationError" in proc.stderr


def test_database_unreachable_names_host_and_port() -> None:
    # port 1 on loopback: nothing listens there, the connection is refused at once
    proc = billing("seed", "--customers", "1", env=_clean_env(DATABASE_URL="postgresql://u:p@127.0.0.1:1/db"))
    assert_one_error(proc, 1, "unreachable", "127.0.0.1:1")


@pytest.mark.parametrize("command", [("seed", "--customers", "1"), ("db", "migrate")])
def test_a_database_host_that_does_not_resolve_is_named(command: tuple[str, ...]) -> None:
    # .invalid never resolves (RFC 6761); `db migrate` connects without the pool, seed through it
    dsn = "postgresql://u:secret-pw@nonexistent.invalid:5432/db"
    proc = billing(*command, env=_clean_env(DATABASE_URL=dsn))
    stderr = assert_one_error(proc, 1, "'nonexistent.invalid'", "does not resolve", "DATABASE_URL")
    assert "secret-pw" not in stderr


@pytest.mark.parametrize(
    "command",
    [("seed", "--customers", "1"), ("reconcile", "--from", HOUR, "--to", HOUR), ("db", "migrate")],
)
def test_a_unix_socket_that_is_gone_names_its_path(command: tuple[str, ...], tmp_path: Path) -> None:
    # a folder with no server's socket in it
    dsn = f"postgresql://postgres@/postgres?host={tmp_path}&port=5432"
    proc = billing(*command, env=_clean_env(DATABASE_URL=dsn))
    assert_one_error(proc, 1, "unreachable", f"{tmp_path}/.s.PGSQL.5432")


def test_the_local_stacks_socket_after_local_down_says_billing_local_up(tmp_path: Path) -> None:
    # `billing local down` deletes the embedded server's folder; the exported DSN still names it
    gone = tmp_path / "billing-pg-gone" / "data"
    dsn = f"postgresql://postgres:@/postgres?host={gone}"
    proc = billing("seed", "--customers", "1", env=_clean_env(DATABASE_URL=dsn))
    assert_one_error(proc, 1, f"{gone}/.s.PGSQL.5432", "billing local up")


@pytest.mark.skipif(server_binaries() is None, reason="Debian's PostgreSQL server (make postgres-server)")
def test_a_database_without_tls_over_tcp_says_how_to_connect() -> None:
    # a developer's own PostgreSQL on 127.0.0.1 with ssl=off: the commands verify TLS over TCP by default
    from tests.tls_postgres import plain_postgres

    with plain_postgres() as server:
        env = _clean_env(DATABASE_URL=server.dsn("postgres", "secret-pw", "postgres"))
        proc = billing("seed", "--customers", "1", env=env)
        # the advice holds: without verification the same DSN connects (and finds no schema)
        advised = billing("seed", "--customers", "1", env=env | {"BILLING_DB_TLS_VERIFY": "false"})
    stderr = assert_one_error(
        proc, 2, f"127.0.0.1:{server.port}", "does not offer TLS", "BILLING_DB_TLS_VERIFY=false"
    )
    assert "secret-pw" not in stderr
    assert_one_error(advised, 1, "not migrated")


def test_a_dead_local_stack_admin_endpoint_is_named_not_the_database() -> None:
    # the stack's environment still exported after `billing local down`: its admin endpoint is the first
    # thing `billing run` calls (port 1 on loopback refuses at once)
    env = _clean_env(
        DATABASE_URL="postgresql://u:secret-pw@127.0.0.1:1/db",
        BILLING_QUEUE_URL="http://127.0.0.1:1/q",
        BILLING_LOCAL_ADMIN_URL="http://127.0.0.1:1",
    )
    proc = billing("run", "--period", HOUR, env=env)
    stderr = assert_one_error(proc, 1, "admin endpoint", "BILLING_LOCAL_ADMIN_URL", "billing local up")
    assert "database" not in stderr and "secret-pw" not in stderr


@pytest.mark.parametrize(
    "command",
    [
        ("run", "--period", HOUR),
        ("redrive", "--dlq-url", "http://127.0.0.1:1/q", "--queue-url", "http://127.0.0.1:1/q2"),
    ],
)
def test_no_aws_region_says_which_variable(command: tuple[str, ...]) -> None:
    env = _clean_env(DATABASE_URL="postgresql://u:p@127.0.0.1:1/db", BILLING_QUEUE_URL="http://127.0.0.1:1/q")
    proc = billing(*command, env=env)
    assert_one_error(proc, 2, "no AWS region", "AWS_DEFAULT_REGION")


def test_a_malformed_local_clock_is_one_error_line() -> None:
    for command in (("local", "hour"), ("run", "--period", HOUR)):
        proc = billing(*command, env=_clean_env(BILLING_LOCAL_NOW="garbage"))
        assert_one_error(proc, 2, "BILLING_LOCAL_NOW='garbage'", "ISO 8601")


def test_local_env_without_a_stack_is_one_error_line(tmp_path: Path) -> None:
    proc = billing("local", "env", env=_clean_env(BILLING_LOCAL_DIR=str(tmp_path)))
    assert_one_error(proc, 1, "no local stack is running", "billing local up")


@pytest.mark.parametrize(
    "command", [("status", "--period", HOUR), ("reconcile", "--from", HOUR, "--to", HOUR)]
)
def test_an_invalid_setting_of_the_operator_commands_is_one_error_line(command: tuple[str, ...]) -> None:
    env = _clean_env(DATABASE_URL="postgresql://u@127.0.0.1:1/db", BILLING_DB_POOL_MAX="many")
    proc = billing(*command, env=env)
    assert_one_error(proc, 2, "configuration error", "db_pool_max")


@pytest.mark.parametrize("command", ["show", "history"])
def test_an_unknown_customer_is_one_error_line(command: str, database_url: str) -> None:
    proc = billing("customers", command, "nobody", env=_clean_env(DATABASE_URL=database_url))
    assert_one_error(proc, 1, "no subject or customer 'nobody'", "billing customers list")


def test_a_dsn_that_is_not_a_dsn_is_a_configuration_error() -> None:
    proc = billing("seed", "--customers", "1", env=_clean_env(DATABASE_URL="localhost:5432/billing"))
    assert_one_error(proc, 2, "configuration error", "not a PostgreSQL DSN")


def test_a_database_that_does_not_exist(postgres_server: str) -> None:
    dsn = _database(postgres_server, f"missing_{uuid.uuid4().hex[:8]}")
    proc = billing("seed", "--customers", "1", env=_clean_env(DATABASE_URL=dsn))
    assert_one_error(proc, 1, "does not exist", "DATABASE_URL")


def test_a_role_that_does_not_exist(postgres_server: str) -> None:
    dsn = _database(postgres_server, "postgres", user="nobody_here")
    proc = billing("seed", "--customers", "1", env=_clean_env(DATABASE_URL=dsn))
    assert_one_error(proc, 1, "'nobody_here'", "DATABASE_URL's user")


@pytest.mark.skipif(server_binaries() is None, reason="Debian's PostgreSQL server (make postgres-server)")
def test_a_wrong_password() -> None:
    # the embedded server trusts every login; Debian's server checks scram passwords on its socket
    from tests.tls_postgres import CertificateAuthority, tls_postgres

    ca = CertificateAuthority.create("test CA")
    cert, key = ca.server_certificate(["localhost"])
    with tls_postgres(cert, key) as server:

        async def create_role() -> None:
            conn = await asyncpg.connect(server.admin_dsn())
            try:
                await conn.execute("CREATE ROLE billing LOGIN PASSWORD 'right-password'")
            finally:
                await conn.close()

        asyncio.run(create_role())
        dsn = f"postgresql://billing:wrong-password@/postgres?host={server.socket_dir}&port={server.port}"
        proc = billing("seed", "--customers", "1", env=_clean_env(DATABASE_URL=dsn))
    stderr = assert_one_error(proc, 1, "refused the password", "'billing'", str(server.port))
    assert "wrong-password" not in stderr


@pytest.mark.skipif(server_binaries() is None, reason="Debian's PostgreSQL server (make postgres-server)")
@pytest.mark.parametrize("command", [("seed", "--customers", "1"), ("customers", "list")])
def test_a_server_certificate_that_does_not_verify_is_one_configuration_line(
    command: tuple[str, ...],
) -> None:
    # a TLS server whose certificate no CA of the layer's bundle signed: the operator commands verify the
    # server as the functions do (they may point at the production database)
    from tests.tls_postgres import CertificateAuthority, tls_postgres

    ca = CertificateAuthority.create("not a shipped CA")
    cert, key = ca.server_certificate(["localhost"])
    with tls_postgres(cert, key, host="localhost") as server:
        dsn = f"postgresql://postgres:secret-password@localhost:{server.port}/postgres"
        proc = billing(*command, env=_clean_env(DATABASE_URL=dsn))
    stderr = assert_one_error(proc, 2, "configuration error", "certificate does not verify")
    assert "secret-password" not in stderr


def test_an_unmigrated_database_says_run_db_migrate(postgres_server: str) -> None:
    name = f"bare_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        proc = billing(
            "seed", "--customers", "1", env=_clean_env(DATABASE_URL=_database(postgres_server, name))
        )
    finally:
        asyncio.run(admin(f"DROP DATABASE {name} WITH (FORCE)"))
    assert_one_error(proc, 1, "not migrated", "billing db migrate")


def test_a_queue_that_does_not_exist(database_url: str, moto_url: str) -> None:
    missing = f"{moto_url}/123456789012/no-such-queue-{uuid.uuid4().hex[:8]}"
    env = _clean_env(**aws_env(moto_url), DATABASE_URL=database_url, BILLING_QUEUE_URL=missing)
    proc = billing("run", "--period", HOUR, "--concurrency", "1", env=env)
    assert_one_error(proc, 1, "queue does not exist", "BILLING_QUEUE_URL")


def test_no_aws_credentials(database_url: str, moto_url: str, queues: Queues) -> None:
    env = _clean_env(
        AWS_ENDPOINT_URL_SQS=moto_url,
        AWS_DEFAULT_REGION="us-east-1",
        DATABASE_URL=database_url,
        BILLING_QUEUE_URL=queues.url,
    )
    proc = billing("run", "--period", HOUR, "--concurrency", "1", env=env)
    assert_one_error(proc, 1, "no AWS credentials", "AWS_ACCESS_KEY_ID")


@pytest.mark.parametrize("hours_ahead", [1, 24 * 365])
def test_an_hour_not_yet_ended_is_a_usage_error(hours_ahead: int) -> None:
    # the next hour (or one a year away) cannot have ended by the time the command reads its clock
    hour = hour_floor(datetime.now(UTC)) + timedelta(hours=hours_ahead)
    proc = billing("run", "--period", hour.strftime("%Y-%m-%dT%H:%M:%SZ"), env=_clean_env())
    assert_one_error(proc, 2, "has not ended yet", "--period")


@pytest.mark.parametrize("command", [["run", "--period", HOUR], ["demo"]])
def test_a_report_folder_that_does_not_exist_fails_before_any_work(
    command: list[str], tmp_path: Path
) -> None:
    # no database is configured: had the command started work, it would fail on that (or start a stack)
    proc = billing(*command, "--report", str(tmp_path / "no-such-folder" / "r.json"), env=_clean_env())
    assert_one_error(proc, 2, "--report", "no-such-folder", "does not exist")


def test_a_timeline_folder_that_does_not_exist_fails_before_reading(tmp_path: Path) -> None:
    events = tmp_path / "events.ndjson"
    events.write_text("")  # had the command read it first, it would fail on "no transaction events"
    proc = billing(
        "timeline", str(events), "-o", str(tmp_path / "no-such-folder" / "t.html"), env=_clean_env()
    )
    assert_one_error(proc, 2, "--output", "no-such-folder", "does not exist")


def test_an_unknown_option_is_one_line_and_exit_2() -> None:
    proc = billing("seed", "--no-such-option", env=_clean_env())
    assert_one_error(proc, 2, "--no-such-option", "billing seed --help")


@pytest.mark.parametrize("dsn", ["localhost:5432/billing", "postgresql://u:p@127.0.0.1:notaport/db"])
async def test_the_pool_calls_a_dsn_that_is_not_one_a_configuration_error(dsn: str) -> None:
    # a Lambda cold start with such a DSN must fail as misconfigured, not as a database that may come back
    from billing.adapters.postgres import create_pool
    from billing.domain.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="not a PostgreSQL DSN") as raised:
        await create_pool(dsn, 1)
    assert "u:p@" not in str(raised.value)
