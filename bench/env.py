"""The benchmarks' local stack: one embedded PostgreSQL, moto's server and the emulators for the whole run.

Every scenario gets a database of its own, cloned from a seeded template (``CREATE DATABASE ...
TEMPLATE``), and queues of its own, so no run sees another's ledger or messages. Seeding uses COPY:
100,000 customers take about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from bench.lambda_events import customer_id
from billing_local.stack import LocalStack

if TYPE_CHECKING:
    from collections.abc import Iterator

    from billing.domain.model import Period

PRODUCT = "benchproduct0001"
VISIBILITY_S = 60
# what the Lambda runtime sets; the APM agent and Powertools read some of it
LAMBDA_ENV = {
    "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
    "AWS_LAMBDA_FUNCTION_NAME": "billing-biller",
    "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
    "AWS_LAMBDA_LOG_STREAM_NAME": "2026/11/26/[$LATEST]0123456789abcdef",
    "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/billing-biller",
}
# the APM agent captures in memory (no server), one span per query and per call, no background threads
APM_ENV = {
    "ELASTIC_APM_SERVICE_NAME": "billing",
    "ELASTIC_APM_TRANSPORT_CLASS": "billing_local.apm_capture.CaptureTransport",
    "ELASTIC_APM_SPAN_COMPRESSION_ENABLED": "false",
    "ELASTIC_APM_CENTRAL_CONFIG": "false",
    "ELASTIC_APM_CLOUD_PROVIDER": "none",
    "ELASTIC_APM_METRICS_INTERVAL": "0ms",
    "ELASTIC_APM_ENVIRONMENT": "bench",
    "ELASTIC_APM_SPAN_STACK_TRACE_MIN_DURATION": "-1ms",  # as template.yaml
}
QUIET_ENV = {"POWERTOOLS_LOG_LEVEL": "WARNING", "POWERTOOLS_METRICS_DISABLED": "true"}
# Each lane paces its marketplace calls under the documented quota (billing.adapters.pacing: AWS 10 a
# second by default, so one environment waits ~111 ms between calls). The sections that measure what a
# bill costs (CPU, wall time, makespan against the latency and CPU bounds) bill with pacing off, against
# emulators that enforce no quota: else they would time the pace. Sections quota and lanes measure it.
UNPACED_ENV = {f"BILLING_{m}_QUOTA_PER_SECOND": "0" for m in ("AWS", "GCP", "AZURE")}


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def last_hour() -> Period:
    """The last complete hour: inside every marketplace's window for the next hour at least."""
    from billing.domain.model import Period

    return Period.last_complete_before(datetime.now(UTC), timedelta(0))


def rate_card(dims: int) -> list[tuple[str, str, str, Decimal]]:
    """``dims`` AWS dimensions, one per metric (3 is the demo's card)."""
    if dims == 3:
        from billing_local.seed import RATE_CARD

        return [r for r in RATE_CARD if r[0] == "aws"]
    return [("aws", f"metric_{i:02d}", f"Dim{i:02d}", Decimal(1)) for i in range(dims)]


# one customer of each other marketplace: billing them shows which SDKs get imported, and when
OTHER_CUSTOMERS = ("cust-gcp-000001", "cust-azure-000001")
OTHER_ROWS: dict[str, dict[str, Any]] = {
    "cust-gcp-000001": {
        "id": "cust-gcp-000001",
        "marketplace": "gcp",
        "gcp_usage_reporting_id": "project_number:900001",
        "gcp_service_name": "billing-demo.endpoints.demo-project.cloud.goog",
    },
    "cust-azure-000001": {
        "id": "cust-azure-000001",
        "marketplace": "azure",
        "azure_resource_id": "00000000-0000-4000-8000-000000900001",
        "azure_resource_uri": None,
        "azure_plan_id": "standard",
    },
}


async def _add_other_marketplaces(conn: Any, hour: Period, active_from: datetime) -> None:
    from billing_local.seed import RATE_CARD

    await conn.executemany(
        "INSERT INTO rate_card (marketplace, metric, dimension, factor) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        [r for r in RATE_CARD if r[0] != "aws"],
    )
    for row in OTHER_ROWS.values():
        cols = [k for k in row if row[k] is not None]
        await conn.execute(
            f"INSERT INTO customers ({', '.join(cols)}, active_from)"
            f" VALUES ({', '.join(f'${i + 1}' for i in range(len(cols)))}, ${len(cols) + 1})",
            *[row[k] for k in cols],
            active_from,
        )
        for metric in {r[1] for r in RATE_CARD}:
            await conn.execute(
                "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity) VALUES ($1, $2, 'k0', "
                "$3, 12.5)",
                hour.start + timedelta(minutes=5),
                row["id"],
                metric,
            )


@dataclass
class BenchStack:
    local: LocalStack
    admin_dsn: str
    databases: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return self.local.env

    # -- databases ---------------------------------------------------------------------------
    async def _admin(self, *statements: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    async def seeded_template(
        self,
        name: str,
        customers: int,
        clusters: int = 1,
        dims: int = 3,
        usage: bool = True,
        period: Period | None = None,
        others: bool = False,
    ) -> str:
        """A migrated database holding ``customers`` AWS customers with usage in ``period``; its name.

        ``others`` adds one Google Cloud and one Azure customer (``OTHER_CUSTOMERS``), subscribed.
        """
        import asyncpg

        from billing_local.migrate import migrate

        await self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
        self.databases.append(name)
        dsn = with_database(self.admin_dsn, name)
        await migrate(dsn)
        hour = period or last_hour()
        card = rate_card(dims)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.executemany(
                "INSERT INTO rate_card (marketplace, metric, dimension, factor) VALUES ($1, $2, $3, $4)", card
            )
            active_from = hour.start - timedelta(days=30)
            await conn.copy_records_to_table(
                "customers",
                records=(
                    (customer_id(i), "aws", "active", active_from, f"aws-{customer_id(i)}", PRODUCT)
                    for i in range(customers)
                ),
                columns=[
                    "id",
                    "marketplace",
                    "status",
                    "active_from",
                    "aws_customer_identifier",
                    "aws_product_code",
                ],
            )
            if usage:
                ts = hour.start + timedelta(minutes=5)
                await conn.copy_records_to_table(
                    "usage",
                    records=(
                        # quantities with fractions (remainders carry), different per customer
                        (
                            ts,
                            customer_id(i),
                            f"k{c}",
                            metric,
                            Decimal(10 + (i * 7 + c) % 30) + Decimal("0.25"),
                        )
                        for i in range(customers)
                        for c in range(clusters)
                        for (_mp, metric, _dim, _f) in card
                    ),
                    columns=["ts", "customer_id", "cluster_id", "metric", "quantity"],
                )
            if others:
                await _add_other_marketplaces(conn, hour, active_from)
                self._subscribe_others()
            await conn.execute("ANALYZE")
        finally:
            await conn.close()
        return name

    async def clone(self, template: str) -> str:
        """A fresh copy of a seeded template; its DSN."""
        name = f"b_{uuid.uuid4().hex[:10]}"
        await self._admin(f"CREATE DATABASE {name} TEMPLATE {template}")
        self.databases.append(name)
        return with_database(self.admin_dsn, name)

    async def drop(self, dsn: str) -> None:
        name = urlsplit(dsn).path.lstrip("/")
        await self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        with contextlib.suppress(ValueError):
            self.databases.remove(name)

    # -- queues and marketplaces ------------------------------------------------------------
    def new_queue(self, prefix: str = "bench") -> str:
        from billing_local.stack import create_queues

        url, _dlq = create_queues(
            self.local.moto_url, self.local.queue, name=f"{prefix}-{uuid.uuid4().hex[:8]}"
        )
        return url

    def delete_queue(self, url: str) -> None:
        import boto3

        sqs = boto3.client("sqs", endpoint_url=self.local.moto_url)
        with contextlib.suppress(Exception):
            sqs.delete_queue(QueueUrl=url)
            sqs.delete_queue(QueueUrl=url + "-dlq")

    def subscribe(self, customers: int, dims: int = 3) -> None:
        """The AWS emulator knows the product, its dimensions, and every customer as subscribed."""
        state = self.local.metering
        state.add_product(PRODUCT, {d for _m, _met, d, _f in rate_card(dims)})
        with state.lock:
            state.subscriptions[PRODUCT] = {f"aws-{customer_id(i)}" for i in range(customers)}

    def _subscribe_others(self) -> None:
        from billing_local.seed import RATE_CARD

        dimensions: dict[str, set[str]] = {}
        for mp, _metric, dim, _f in RATE_CARD:
            dimensions.setdefault(mp, set()).add(dim)
        self.local.subscribe([dict(OTHER_ROWS[c]) for c in OTHER_CUSTOMERS], dimensions)

    def marketplace_latency(self, mean_s: float, jitter_s: float) -> None:
        """Each BatchMeterUsage call takes ``mean_s`` on average, uniform in mean ± jitter/2."""
        state = self.local.metering
        state.latency_s = max(0.0, mean_s - jitter_s / 2)
        state.jitter_s = jitter_s

    @contextlib.contextmanager
    def linear_moto(self, module: str = "bench.moto_linear") -> Iterator[str]:
        """SQS calls go to a moto server of their own for the block; its URL. ``module`` serves it: by
        default with billing_local.moto_fixes' fixes; ``moto.server`` is moto as shipped."""
        from billing_local.stack import environment

        with moto_process(module) as url, environment({"AWS_ENDPOINT_URL_SQS": url}):
            old, self.local.moto_url = self.local.moto_url, url
            try:
                yield url
            finally:
                self.local.moto_url = old

    def forget_records(self) -> None:
        with self.local.metering.lock:
            self.local.metering.records.clear()
            self.local.metering.calls = 0


@contextlib.contextmanager
def bench_stack() -> Iterator[BenchStack]:
    """The local stack for a whole bench run, its variables set in this process's environment."""
    os.environ.setdefault("XDG_RUNTIME_DIR", _runtime_dir())
    from billing_local.stack import environment, local_stack

    with local_stack(os.environ.get("BENCH_DATABASE_URL")) as stack:
        bench = BenchStack(stack, stack.database_url)
        with environment({**stack.env, **QUIET_ENV}):
            try:
                yield bench
            finally:
                for name in list(bench.databases):
                    with contextlib.suppress(Exception):
                        asyncio.run(bench._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def moto_process(module: str = "bench.moto_linear") -> contextlib.AbstractContextManager[str]:
    """moto's server as a process of its own (by default with bench.moto_linear's fixes); its URL."""
    from billing_local.stack import moto_server_process

    return moto_server_process(module)


def _runtime_dir() -> str:
    path = Path.cwd() / ".run"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(path)


def bill_messages(period: Period, first: int, count: int, run_id: uuid.UUID | None = None) -> list[Any]:
    from billing.domain.messages import BillMessageV1

    run = run_id or uuid.uuid4()
    return [
        BillMessageV1(customer_id=customer_id(i), period=period.start, run_id=run)
        for i in range(first, first + count)
    ]
