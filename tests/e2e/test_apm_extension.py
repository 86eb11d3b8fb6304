"""The biller Lambda with the APM agent exactly as template.yaml deploys it, posting to the APM extension.

One fresh process is one execution environment: it imports the biller handler with the template's
agent settings (the serverless transport included) and invokes it once per SQS record, as the Lambda
runtime does. The APM extension is an HTTP double that follows elastic/apm-aws-lambda's receiver
(billing_local.emulators.apm_extension); the database, SQS (moto) and the AWS metering emulator are
the tests' local stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from bench.lambda_warm import template_agent_env

from billing.entrypoints.loop import LOOP
from billing_local.emulators.apm_extension import apm_extension
from billing_local.lambda_shapes import LambdaContext
from testkit import HOUR, PRODUCT, RATES, lambda_records, within_window

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = [f"cust-{i:06d}" for i in range(4)]

ENVIRONMENT = """
import json, sys, threading
sys.path[:0] = [{biller!r}, {tests!r}]
import elasticapm
import biller
from billing.bootstrap import Runtime
from billing.config import load_settings
from billing_local.lambda_shapes import LambdaContext
from testkit import within_window

biller.runtime = Runtime(load_settings(), clock=within_window)  # the hour is still billable
responses = [biller.lambda_handler({{"Records": [r]}}, LambdaContext.of()) for r in json.load(sys.stdin)]
print(json.dumps({{
    "responses": responses,
    "threads": sorted(t.name for t in threading.enumerate()),
    "transport": type(elasticapm.get_client()._transport).__qualname__,
}}))
"""


async def _seed(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany("INSERT INTO rate_card VALUES ($1, $2, $3, $4)", RATES)
        for c in CUSTOMERS:
            await conn.execute(
                "INSERT INTO customers (id, marketplace, active_from, aws_customer_identifier,"
                " aws_product_code) VALUES ($1, 'aws', '2026-01-01Z', $2, $3)",
                c,
                f"aws-{c}",
                PRODUCT,
            )
            await conn.execute(
                "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity)"
                " VALUES ($1, $2, 'k0', 'capacity_gb_hours', 2.5)",
                HOUR.start,
                c,
            )
    finally:
        await conn.close()


def _records(stack: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The hour dispatched by the dispatcher Lambda (in this process): one message per customer."""
    import dispatcher
    from billing.bootstrap import Runtime
    from billing.config import load_settings

    LOOP.run_until_complete(_seed(stack.database_url))
    stack.metering.clock = within_window
    stack.metering.add_product(PRODUCT)
    for c in CUSTOMERS:
        stack.metering.subscribe(PRODUCT, f"aws-{c}")
    runtime = Runtime(load_settings())
    monkeypatch.setattr(dispatcher, "runtime", runtime)
    try:
        dispatcher.lambda_handler({"period": HOUR.isoformat()}, LambdaContext.of())
    finally:
        LOOP.run_until_complete(runtime.close())
    return lambda_records(stack.queues.url)


def test_each_invocation_posts_its_transaction_and_spans_to_the_extension_as_deployed(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _records(stack, monkeypatch)
    assert len(records) == len(CUSTOMERS)
    env = {k: v for k, v in os.environ.items() if k != "ELASTIC_APM_TRANSPORT_CLASS"}  # the tests' own
    with apm_extension() as (url, extension):
        env |= {
            **template_agent_env(),
            "ELASTIC_APM_ENABLED": "true",  # as with the extension layer
            "ELASTIC_APM_SERVER_URL": url,  # the extension's localhost:8200
            "ELASTIC_APM_LAMBDA_APM_SERVER": "https://apm.invalid",  # where the extension would forward
        }
        # When one execution environment is invoked once per message (BatchSize 1)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                ENVIRONMENT.format(biller=str(ROOT / "functions" / "biller"), tests=str(ROOT / "tests")),
            ],
            input=json.dumps(records),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["responses"] == [{"batchItemFailures": []}] * len(records)
    # Then the agent ran the template's transport, with no sender thread of its own
    assert result["transport"] == "ServerlessTransport"
    assert "eapm event processor thread" not in result["threads"]
    # and each invocation registered its transaction, then posted one last request (flushed=true)
    # with the metadata first and the transaction with all its spans
    assert extension.counts["register"] == len(records)
    assert [r.flushed for r in extension.intake] == [True] * len(records)
    registered = [r.of_type("transaction")[0]["id"] for r in extension.registrations]
    for invocation, request in enumerate(extension.intake):
        assert list(request.events[0]) == ["metadata"]
        (transaction,) = request.of_type("transaction")
        assert transaction["id"] == registered[invocation]
        assert (transaction["type"], transaction["outcome"], transaction["result"]) == (
            "messaging",
            "success",
            "billed",
        )
        spans = request.of_type("span")
        assert {s["transaction_id"] for s in spans} == {transaction["id"]}
        if invocation:  # warm: the first also opened the pool and read the rate card
            kinds = sorted((s["type"], s["subtype"]) for s in spans)
            assert kinds.count(("db", "postgresql")) == 4
            assert kinds.count(("aws", "marketplace metering")) == 1
            assert {s["name"] for s in spans if s["type"] == "app"} == {
                "rate usage",
                "ledger write",
                "ledger record",
            }
    assert (
        sorted(r.of_type("transaction")[0]["context"]["tags"]["customer_id"] for r in extension.intake)
        == CUSTOMERS
    )
