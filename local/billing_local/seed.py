"""Deterministic synthetic customers, rate card and usage, for demos, tests and benchmarks."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import asyncpg

    from billing.domain.model import Period

METRICS = ("capacity_gb_hours", "data_transfer_gb", "snapshot_gb_hours")
AWS_PRODUCT_CODE = "billingdemo0001"
GCP_SERVICE_NAME = "billing-demo.endpoints.demo-project.cloud.goog"
AZURE_PLAN_ID = "standard"

# marketplace, metric, dimension, factor: dimension units per metric unit
RATE_CARD: tuple[tuple[str, str, str, Decimal], ...] = (
    ("aws", "capacity_gb_hours", "CapacityGbHours", Decimal(1)),
    ("aws", "data_transfer_gb", "DataTransferGb", Decimal(1)),
    ("aws", "snapshot_gb_hours", "SnapshotStorage100GbHours", Decimal("0.01")),
    ("gcp", "capacity_gb_hours", "capacity_gb_hours", Decimal(1)),
    ("gcp", "data_transfer_gb", "data_transfer_gb", Decimal(1)),
    ("gcp", "snapshot_gb_hours", "snapshot_100gb_hours", Decimal("0.01")),
    ("azure", "capacity_gb_hours", "capacity", Decimal(1)),
    ("azure", "data_transfer_gb", "transfer", Decimal(1)),
    ("azure", "snapshot_gb_hours", "snapshots", Decimal("0.01")),
)


@dataclass(frozen=True)
class SeedSummary:
    customers: int
    usage_rows: int
    hours: int


def customer_id(index: int) -> str:
    return f"cust-{index:06d}"


async def seed(
    pool: asyncpg.Pool,
    customers: int,
    hours: int,
    seed: int,
    last_period: Period,
    marketplaces: Sequence[str] = ("aws", "gcp", "azure"),
    clusters: tuple[int, int] = (1, 3),
    progress: Callable[[int], None] | None = None,
) -> SeedSummary:
    """Write the rate card, ``customers`` customers and ``hours`` hours of usage ending at ``last_period``.

    The same arguments always write the same data. About one customer in ten has no usage at all.
    """
    rng = random.Random(seed)
    first = last_period.shifted(-(hours - 1))
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO rate_card (marketplace, metric, dimension, factor) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (marketplace, plan, metric, dimension) DO UPDATE SET factor = excluded.factor",
            RATE_CARD,
        )
        rows = []
        for i in range(customers):
            mp = marketplaces[i % len(marketplaces)]
            cid = customer_id(i)
            rows.append(
                (
                    cid,
                    mp,
                    "active",
                    first.start - timedelta(days=30),
                    f"aws-{cid}" if mp == "aws" else None,
                    AWS_PRODUCT_CODE if mp == "aws" else None,
                    f"project_number:{100000 + i}" if mp == "gcp" else None,
                    GCP_SERVICE_NAME if mp == "gcp" else None,
                    f"00000000-0000-4000-8000-{i:012d}" if mp == "azure" else None,
                    AZURE_PLAN_ID if mp == "azure" else None,
                )
            )
        await conn.executemany(
            """
            INSERT INTO customers (id, marketplace, status, active_from, aws_customer_identifier,
                                   aws_product_code, gcp_usage_reporting_id, gcp_service_name,
                                   azure_resource_id, azure_plan_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING
            """,
            rows,
        )
        # seeding again replaces the range's usage rather than adding to it
        await conn.execute(
            "DELETE FROM usage WHERE customer_id = ANY($1::text[]) AND ts >= $2 AND ts < $3",
            [customer_id(i) for i in range(customers)],
            first.start,
            last_period.end,
        )
        usage = 0
        for i in range(customers):
            cid = customer_id(i)
            idle = rng.random() < 0.1
            n_clusters = rng.randint(*clusters)
            records = []
            for h in range(hours):
                hour = first.shifted(h).start
                if idle:
                    continue
                for c in range(n_clusters):
                    for metric in METRICS:
                        # a few readings an hour, with fractions so remainders carry
                        for minute in (5, 35):
                            qty = Decimal(rng.randint(0, 40_000)) / 1000
                            records.append(
                                (hour + timedelta(minutes=minute), cid, f"{cid}-c{c}", metric, qty)
                            )
            if records:
                await conn.copy_records_to_table(
                    "usage",
                    records=records,
                    columns=["ts", "customer_id", "cluster_id", "metric", "quantity"],
                )
                usage += len(records)
            if progress is not None:
                progress(1)
    return SeedSummary(customers=customers, usage_rows=usage, hours=hours)
