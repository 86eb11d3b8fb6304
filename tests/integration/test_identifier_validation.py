"""Marketplace identifiers that reach URLs and request bodies are refused by the database when unsafe.

Migration 0002 adds one named CHECK constraint per identifier column (``<table>_<column>_format``): a bad
row fails at INSERT with that name, never later when its bill is sent. Runs against real PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from billing_local.migrate import migrate, migration_files

# a valid row per marketplace; each case overrides the column under test (and clears its alternative)
VALID: dict[str, dict[str, Any]] = {
    "aws": {"aws_customer_identifier": "QaUxHCV7ETR", "aws_product_code": "1a2b3c4d5e6f7g8h9i0j1k2l3"},
    "gcp": {
        "gcp_service_name": "saas-example.gcpmarketplace.example.com",
        "gcp_usage_reporting_id": "project_number:731942518844",
    },
    "azure": {"azure_resource_id": "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f", "azure_plan_id": "gold"},
}
# (marketplace, column, the column it replaces, since exactly one of the pair may be set)
COLUMNS = {
    "aws_customer_identifier": ("aws", None),
    "aws_account_id": ("aws", "aws_customer_identifier"),
    "aws_product_code": ("aws", None),
    "gcp_service_name": ("gcp", None),
    "gcp_usage_reporting_id": ("gcp", None),
    "azure_resource_id": ("azure", None),
    "azure_resource_uri": ("azure", "azure_resource_id"),
    "azure_plan_id": ("azure", None),
}
ARM_URI = "/subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg-billing/providers"

GOOD = [
    ("aws_customer_identifier", "aws-cust-000000"),
    ("aws_customer_identifier", "x" * 255),
    ("aws_account_id", "123456789012"),
    ("aws_product_code", "billingdemo0001"),
    ("aws_product_code", "p" * 255),
    ("gcp_service_name", "billing-demo.endpoints.demo-project.cloud.goog"),
    ("gcp_service_name", ".".join(["a" * 63] * 3) + "." + "b" * 61),  # 253 characters
    ("gcp_usage_reporting_id", "project_number:1"),
    ("azure_resource_id", "00000000-0000-4000-8000-000000000000"),
    ("azure_resource_uri", f"{ARM_URI}/Microsoft.Solutions/applications/app"),
    (
        "azure_resource_uri",
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Solutions/applications/app",
    ),
    (
        "azure_resource_uri",
        "/subscriptions/s/resourcegroups/rg(prod).1/providers/Microsoft.SaaS/resources/my_saas-1",
    ),
    ("azure_plan_id", "standard-annual_2"),
    ("azure_plan_id", "p" * 50),
]

BAD = [
    ("aws_customer_identifier", ""),
    ("aws_customer_identifier", "x" * 256),
    ("aws_customer_identifier", "cust/../admin"),
    ("aws_customer_identifier", "cust 1"),
    ("aws_customer_identifier", "cust\n1"),
    ("aws_account_id", "12345678901"),
    ("aws_account_id", "1234567890123"),
    ("aws_account_id", "12345678901a"),
    ("aws_product_code", "p" * 256),
    ("aws_product_code", "code?x=1"),
    ("aws_product_code", "code%2F"),
    ("gcp_service_name", "a" * 64 + ".example.com"),  # a label over 63
    ("gcp_service_name", ".".join(["a" * 63] * 3) + "." + "b" * 62),  # 254 characters
    ("gcp_service_name", "evil.com/v1/services/other"),
    ("gcp_service_name", "svc.example.com:report?x="),
    ("gcp_service_name", "localhost"),  # not a dotted name
    ("gcp_service_name", "Upper.Example.com"),
    ("gcp_service_name", "-dash.example.com"),
    ("gcp_service_name", "a..b.example.com"),
    ("gcp_service_name", "ex%61mple.com"),
    ("gcp_usage_reporting_id", "project_number:1/../2"),
    ("gcp_usage_reporting_id", "p" * 129),
    ("gcp_usage_reporting_id", "project number:1"),
    ("azure_resource_id", "6f1c2d3e4b5a4c7d8e9f0a1b2c3d4e5f"),
    ("azure_resource_id", "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f/../x"),
    ("azure_resource_id", "zzzzzzzz-4b5a-4c7d-8e9f-0a1b2c3d4e5f"),
    ("azure_resource_uri", "subscriptions/s/resourceGroups/rg/providers/Microsoft.SaaS/resources/x"),
    ("azure_resource_uri", f"{ARM_URI}/../../../x"),
    ("azure_resource_uri", f"{ARM_URI}/Microsoft.SaaS/resources/x?api-version=1"),
    ("azure_resource_uri", f"{ARM_URI}/Microsoft.SaaS/resources/x y"),
    ("azure_resource_uri", f"{ARM_URI}/Microsoft.SaaS"),  # provider without a resource
    ("azure_resource_uri", f"{ARM_URI}/Microsoft.SaaS/resources/" + "x" * 1000),
    ("azure_resource_uri", "https://evil.example.com/subscriptions/s"),
    ("azure_plan_id", "p" * 51),
    ("azure_plan_id", "gold plan"),
    ("azure_plan_id", "gold/../silver"),
]


async def insert_customer(pool: asyncpg.Pool, column: str, value: str) -> None:
    marketplace, replaces = COLUMNS[column]
    row: dict[str, Any] = {**VALID[marketplace], column: value}
    if replaces is not None:
        row[replaces] = None
    names = ", ".join(row)
    placeholders = ", ".join(f"${i}" for i in range(4, 4 + len(row)))
    await pool.execute(
        f"INSERT INTO customers (id, marketplace, active_from, {names}) VALUES ($1, $2, $3, {placeholders})",
        "cust-000001",
        marketplace,
        datetime(2026, 1, 1, tzinfo=UTC),
        *row.values(),
    )


@pytest.mark.parametrize(("column", "value"), GOOD, ids=[f"{c}-{i}" for i, (c, _) in enumerate(GOOD)])
async def test_well_formed_identifiers_are_stored(pool: asyncpg.Pool, column: str, value: str) -> None:
    # Given a customer row whose identifier has the marketplace's real shape
    # When it is written
    await insert_customer(pool, column, value)
    # Then it is stored unchanged
    assert await pool.fetchval(f"SELECT {column} FROM customers") == value


@pytest.mark.parametrize(("column", "value"), BAD, ids=[f"{c}-{i}" for i, (c, _) in enumerate(BAD)])
async def test_unsafe_identifiers_are_refused_by_a_named_constraint(
    pool: asyncpg.Pool, column: str, value: str
) -> None:
    # Given an identifier with characters that would change a URL, or over its length limit
    # When a customer row carrying it is written
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await insert_customer(pool, column, value)
    # Then the database refuses it, naming the column's constraint
    assert refused.value.constraint_name == f"customers_{column}_format"
    assert f"customers_{column}_format" in str(refused.value)
    assert await pool.fetchval("SELECT count(*) FROM customers") == 0


async def test_an_update_to_an_unsafe_identifier_is_refused(pool: asyncpg.Pool) -> None:
    # Given a stored GCP customer
    await insert_customer(pool, "gcp_service_name", "svc.example.com")
    # When its service name is changed to one that escapes the URL path
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await pool.execute("UPDATE customers SET gcp_service_name = 'svc.example.com/../admin'")
    # Then the update is refused and the row keeps its name
    assert refused.value.constraint_name == "customers_gcp_service_name_format"
    assert await pool.fetchval("SELECT gcp_service_name FROM customers") == "svc.example.com"


@pytest.mark.parametrize("dimension", ["CapacityGbHours", "snapshot_100gb_hours", "api-calls", "d" * 100])
async def test_well_formed_dimensions_are_stored(pool: asyncpg.Pool, dimension: str) -> None:
    await pool.execute("INSERT INTO rate_card VALUES ('gcp', 'm', $1, 1)", dimension)
    assert await pool.fetchval("SELECT dimension FROM rate_card") == dimension


@pytest.mark.parametrize("dimension", ["", "d" * 101, "a/../b", "gb.hours", "gb hours", "gb%2Fhours", "gb?x"])
async def test_unsafe_dimensions_are_refused_by_a_named_constraint(
    pool: asyncpg.Pool, dimension: str
) -> None:
    # Given a dimension name that would change the Google metric name's path or is too long
    # When the rate card is written
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await pool.execute("INSERT INTO rate_card VALUES ('gcp', 'm', $1, 1)", dimension)
    # Then the database refuses it, naming the constraint
    assert refused.value.constraint_name == "rate_card_dimension_format"


async def test_the_migration_runner_applies_the_checks_once(database_url: str) -> None:
    # Given a database already migrated (the test database is a clone of a migrated template)
    # When the migrations run again
    applied = await migrate(database_url)
    # Then nothing is applied twice
    assert applied == []


async def test_the_checks_migration_can_run_again_by_hand(pool: asyncpg.Pool) -> None:
    # Given the migrated database and the identifier checks' SQL
    sql = dict(migration_files())["0002_identifier_checks"]
    # When the file is run again outside the runner
    await pool.execute(sql)
    # Then each constraint exists exactly once and still refuses bad rows
    names = await pool.fetch(
        "SELECT conname FROM pg_constraint WHERE conrelid IN ('customers'::regclass, 'rate_card'::regclass)"
        " AND conname LIKE '%\\_format' ORDER BY conname"
    )
    assert [r["conname"] for r in names] == sorted(
        # 0005 (#13) adds the license ARN's check, 0006 the rate card plan's
        [f"customers_{c}_format" for c in COLUMNS]
        + ["customers_aws_license_arn_format", "rate_card_dimension_format", "rate_card_plan_format"]
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_customer(pool, "azure_plan_id", "gold/../silver")
