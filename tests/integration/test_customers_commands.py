"""`billing customers list|show|history|import` against a real PostgreSQL (typer's CliRunner, in a thread:
each command runs its own event loop, as from a shell)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import typer
from typer.testing import CliRunner

from billing_local.cli_customers import CSV_COLUMNS, register

HEADER = ",".join(CSV_COLUMNS)
ARN = "arn:aws:license-manager::794222239362:license:l-e52ca6f38bf84d0fafb8802ca15ac11a"


def row(**values: str) -> str:
    return ",".join(values.get(c, "") for c in CSV_COLUMNS)


GOOD = [
    row(
        marketplace="aws",
        subject_id="l-e52ca6f38bf84d0fafb8802ca15ac11a",
        tenant_id="acme",
        active_from="2026-11-01T00:00:00Z",
        aws_account_id="845735284135",
        aws_license_arn=ARN,
    ),
    row(
        marketplace="gcp",
        subject_id="ent-1",
        tenant_id="globex",
        active_from="2026-11-02T00:00:00Z",
        ended_at="2026-11-20T10:30:00Z",
        gcp_usage_reporting_id="project_number:1234",
        gcp_service_name="billing-demo.gcpmarketplace.example.com",
    ),
    row(
        marketplace="azure",
        subject_id="0b5c5ac4-5d24-4c2a-9c1a-7d0f6f3e1c11",
        tenant_id="initech",
        active_from="2026-11-03T00:00:00Z",
        plan="silver",
        azure_subscription_id="0b5c5ac4-5d24-4c2a-9c1a-7d0f6f3e1c11",
    ),
]


def run_cli(*args: str) -> Any:
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, list(args))


async def cli(*args: str) -> Any:
    return await asyncio.to_thread(run_cli, *args)


@pytest.fixture
def env(stack: Any) -> Any:
    return stack


async def test_import_writes_every_valid_row_and_is_idempotent(
    env: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    csv = tmp_path / "subjects.csv"
    csv.write_text("\n".join([HEADER, *GOOD]) + "\n")
    first = await cli("customers", "import", str(csv), "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["imported"] == 3
    rows = await pool.fetch("SELECT id, marketplace, status, active_until FROM customers ORDER BY id")
    assert [(r["id"], r["marketplace"], r["status"]) for r in rows] == [
        ("acme", "aws", "active"),
        ("globex", "gcp", "cancelled"),
        ("initech", "azure", "active"),
    ]
    again = await cli("customers", "import", str(csv), "--json")
    assert again.exit_code == 0 and json.loads(again.output)["events_appended"] == 0


async def test_one_bad_row_rejects_the_import_and_writes_nothing(
    env: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    bad = [
        row(marketplace="aws", subject_id="x/y", tenant_id="t1", active_from="2026-11-01T00:00:00Z"),
        row(marketplace="gcp", subject_id="e", tenant_id="bad tenant!", active_from="2026-11-01T00:00:00Z"),
        row(marketplace="azure", subject_id="s", tenant_id="t3", active_from="2026-11-01"),
    ]
    csv = tmp_path / "subjects.csv"
    csv.write_text("\n".join([HEADER, *GOOD, *bad]) + "\n")
    result = await cli("customers", "import", str(csv), "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert [r["line"] for r in report["rejected"]] == [5, 6, 7]
    assert "AWS identity incomplete" in report["rejected"][0]["reason"]
    assert "tenant_id" in report["rejected"][1]["reason"]
    assert "timezone" in report["rejected"][2]["reason"]
    assert await pool.fetchval("SELECT count(*) FROM subscription_events") == 0
    assert await pool.fetchval("SELECT count(*) FROM customers") == 0


async def test_a_row_the_database_refuses_rolls_back_the_whole_import(
    env: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # an AWS license ARN the database's format check refuses (the CSV validation does not know it)
    refused = row(
        marketplace="aws",
        subject_id="l-bad",
        tenant_id="hooli",
        active_from="2026-11-01T00:00:00Z",
        aws_account_id="845735284135",
        aws_license_arn="arn:aws:license-manager::1:license:l bad",
    )
    csv = tmp_path / "subjects.csv"
    csv.write_text("\n".join([HEADER, *GOOD, refused]) + "\n")
    result = await cli("customers", "import", str(csv), "--json")
    assert result.exit_code == 1
    assert "refused the import" in json.loads(result.output)["rejected"][0]["reason"]
    assert await pool.fetchval("SELECT count(*) FROM subscription_events") == 0
    assert await pool.fetchval("SELECT count(*) FROM customers") == 0


async def test_list_show_and_history_tell_why_a_subject_is_billed(
    env: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    csv = tmp_path / "subjects.csv"
    csv.write_text("\n".join([HEADER, *GOOD]) + "\n")
    assert (await cli("customers", "import", str(csv))).exit_code == 0
    listed = json.loads((await cli("customers", "list", "--json")).output)
    assert [(s["marketplace"], s["customer_id"], s["status"]) for s in listed] == [
        ("aws", "acme", "active"),
        ("azure", "initech", "active"),
        ("gcp", "globex", "ended"),
    ]
    shown = json.loads((await cli("customers", "show", "globex", "--json")).output)
    assert shown["ends_at"] == "2026-11-20T10:30:00+00:00"
    history = json.loads((await cli("customers", "history", "ent-1", "--json")).output)
    assert [(e["kind"], e["source"]) for e in history] == [("active", "import"), ("ended", "import")]
    missing = await cli("customers", "show", "nobody")
    assert missing.exit_code == 1


async def test_list_show_and_history_cover_the_customers_billing_seed_writes(
    env: Any, pool: asyncpg.Pool
) -> None:
    from datetime import UTC, datetime, timedelta

    from billing.domain.model import Period
    from billing_local.seed import seed

    # Given the customers `billing seed` writes: customers rows, no subject, no history
    hour = Period.last_complete_before(datetime(2026, 11, 26, 14, tzinfo=UTC), timedelta(0))
    await seed(pool, 3, 1, 7, hour)
    # Then list shows them, marked as having no subject
    listed = json.loads((await cli("customers", "list", "--json")).output)
    assert [(c["marketplace"], c["customer_id"], c["subject_id"], c["status"]) for c in listed] == [
        ("aws", "cust-000000", None, "active"),
        ("azure", "cust-000002", None, "active"),
        ("gcp", "cust-000001", None, "active"),
    ]
    table = await cli("customers", "list", "--marketplace", "gcp")
    assert table.exit_code == 0 and "cust-000001" in table.output and "cust-000000" not in table.output
    assert "1 of 1: no subject" in table.output
    # show finds one by its id, with the marketplace identity it is billed by
    shown = await cli("customers", "show", "cust-000001", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["identity"]["gcp_usage_reporting_id"] == "project_number:100001"
    # and history says in one line why there is none
    history = await cli("customers", "history", "cust-000001")
    assert history.exit_code == 0, history.output
    assert history.output.strip().splitlines() == [
        "customer cust-000001 has no history: no subject: a customers row written directly"
        " (`billing seed`, SQL), no marketplace events"
    ]


async def test_a_list_cut_at_its_limit_says_so(env: Any, pool: asyncpg.Pool) -> None:
    from datetime import UTC, datetime, timedelta

    from billing.domain.model import Period
    from billing_local.seed import seed

    # Given three customers `billing seed` wrote
    hour = Period.last_complete_before(datetime(2026, 11, 26, 14, tzinfo=UTC), timedelta(0))
    await seed(pool, 3, 1, 7, hour)
    # When at most two are listed, Then two are, and the listing says it was cut (nothing hidden)
    cut = await cli("customers", "list", "--limit", "2")
    assert cut.exit_code == 0, cut.output
    assert sum(f"cust-00000{i}" in cut.output for i in range(3)) == 2
    assert "more than 2 subjects or customers without one" in cut.output
    # and a limit that holds them all says nothing of the kind
    whole = await cli("customers", "list", "--limit", "3")
    assert sum(f"cust-00000{i}" in whole.output for i in range(3)) == 3
    assert "more than" not in whole.output


async def test_an_empty_list_says_so_in_one_line(env: Any) -> None:
    listed = await cli("customers", "list")
    assert listed.exit_code == 0
    assert listed.output.strip().splitlines() == [
        "no subjects or customers: `billing seed` writes demo customers, marketplace events and"
        " `billing customers import` write subjects"
    ]


def test_an_unknown_marketplace_is_a_usage_error_naming_the_valid_ones() -> None:
    # through the installed `billing`, as from a shell: its one-line usage error, without pydantic's
    # "Value error, " (typer converts the option with pydantic)
    import subprocess
    import sys

    billing = str(Path(sys.executable).parent / "billing")
    result = subprocess.run(
        [billing, "customers", "list", "--marketplace", "oracle"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "error: Invalid value for '--marketplace': 'oracle' is not one of 'aws', 'gcp', 'azure'."
    )


def test_import_help_lists_the_columns() -> None:
    text = run_cli("customers", "import", "--help").output
    for column in CSV_COLUMNS:
        assert column in text
    assert "the columns below" not in run_cli("customers", "--help").output


async def test_a_bad_header_is_reported_once_on_line_1(env: Any, pool: asyncpg.Pool, tmp_path: Path) -> None:
    csv = tmp_path / "subjects.csv"
    csv.write_text("a,b\n1,2\n")
    result = await cli("customers", "import", str(csv))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("line 1: unknown columns: a, b (known: marketplace, subject_id,")
    assert lines[1:] == ["1 row, 1 rejected: nothing written"]
    assert await pool.fetchval("SELECT count(*) FROM customers") == 0
