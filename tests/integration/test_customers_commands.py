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
