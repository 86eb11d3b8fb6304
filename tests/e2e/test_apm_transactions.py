"""Every billed customer-hour is one clean Elastic APM transaction, in Lambda and in the local runner.

The APM agent is the real elastic-apm with an in-memory transport (billing_local.apm_capture): every
event runs through the agent's processors and serializer exactly as it would be posted to an APM
Server, which cannot run here. The marketplace is the AWS metering emulator (an HTTP double).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import jsonschema
import pytest

from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.entrypoints.loop import LOOP
from billing_local.apm_capture import CAPTURE
from billing_local.lambda_shapes import LambdaContext
from testkit import HOUR, PRODUCT, RATES, lambda_records, within_window

pytestmark = pytest.mark.e2e
SCHEMAS = Path(__file__).resolve().parents[1] / "fixtures" / "apm-intake-v2"
CUSTOMERS = [f"cust-{i:06d}" for i in range(6)]


async def _seed(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany("INSERT INTO rate_card VALUES ($1, $2, $3, $4)", RATES)
        for i, c in enumerate(CUSTOMERS):
            await conn.execute(
                "INSERT INTO customers (id, marketplace, active_from, aws_customer_identifier,"
                " aws_product_code) VALUES ($1, 'aws', '2026-01-01Z', $2, $3)",
                c,
                f"aws-{c}",
                PRODUCT,
            )
            # 1 to 3 clusters: the number of spans must not depend on it
            for cluster in range(1 + i % 3):
                await conn.execute(
                    "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity)"
                    " VALUES ($1, $2, $3, 'capacity_gb_hours', 2.5)",
                    HOUR.start,
                    c,
                    f"k{cluster}",
                )
    finally:
        await conn.close()


@pytest.fixture
def handlers(stack: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, ModuleType]]:
    import biller
    import dispatcher

    LOOP.run_until_complete(_seed(stack.database_url))
    stack.metering.clock = within_window
    stack.metering.add_product(PRODUCT)
    for c in CUSTOMERS:
        stack.metering.subscribe(PRODUCT, f"aws-{c}")
    runtimes = []
    for module in (biller, dispatcher):
        runtime = Runtime(load_settings(), clock=within_window if module is biller else None)
        monkeypatch.setattr(module, "runtime", runtime)
        runtimes.append(runtime)
    CAPTURE.reset()
    yield biller, dispatcher
    for runtime in runtimes:
        LOOP.run_until_complete(runtime.close())


def _spans_of(transaction: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in CAPTURE.of_type("span") if s["transaction_id"] == transaction["id"]]


def _validate_against_intake_schemas() -> None:
    # Draft 7, not the agent's own Draft 4: the schemas' if/then rules are ignored by draft 4
    validators = {
        kind: jsonschema.Draft7Validator(json.loads((SCHEMAS / f"{kind}.json").read_text()))
        for kind in ("metadata", "transaction", "span", "error")
    }
    for line in CAPTURE.events:
        ((kind, body),) = line.items()
        validators[kind].validate(body)


def test_each_message_is_one_messaging_transaction_linked_to_the_send(
    handlers: tuple[ModuleType, ModuleType], stack: Any
) -> None:
    biller, dispatcher = handlers
    # Given the hour dispatched by the dispatcher Lambda
    dispatched = dispatcher.lambda_handler({"period": HOUR.isoformat()}, LambdaContext.of())
    records = lambda_records(stack.queues.url)
    # When the biller Lambda is invoked once per message (BatchSize 1)
    for record in records:
        assert biller.lambda_handler({"Records": [record]}, LambdaContext.of()) == {"batchItemFailures": []}
    # Then there is exactly one messaging transaction per message, named after the queue
    queue = stack.queues.url.rsplit("/", 1)[-1]
    bills = [t for t in CAPTURE.of_type("transaction") if t["type"] == "messaging"]
    assert len(bills) == len(records) == len(CUSTOMERS)
    assert {t["name"] for t in bills} == {f"RECEIVE {queue}"}
    # linked (a span link, not a parent) to the dispatcher's SendMessageBatch span
    (dispatch_tx,) = [t for t in CAPTURE.of_type("transaction") if t["type"] == "request"]
    send_spans = {s["id"] for s in _spans_of(dispatch_tx) if s["subtype"] == "sqs"}
    for t in bills:
        assert t["trace_id"] != dispatch_tx["trace_id"]
        assert [link["span_id"] for link in t["links"]] in [[s] for s in send_spans]
        assert {link["trace_id"] for link in t["links"]} == {dispatch_tx["trace_id"]}
    # with the labels, an explicit outcome and result, and the queue wait as message age
    assert sorted(t["context"]["tags"]["customer_id"] for t in bills) == CUSTOMERS
    for t in bills:
        assert t["context"]["tags"] | {"customer_id": "-"} == {
            "billing_hour": HOUR.isoformat(),
            "run_id": dispatched["run_id"],
            "marketplace": "aws",
            "customer_id": "-",
        }
        assert (t["outcome"], t["result"]) == ("success", "billed")
        assert t["context"]["message"]["queue"]["name"] == queue
        assert t["context"]["message"]["age"]["ms"] >= 0
    _validate_against_intake_schemas()


def test_each_transaction_has_a_span_per_query_and_marketplace_call(
    handlers: tuple[ModuleType, ModuleType], stack: Any
) -> None:
    biller, dispatcher = handlers
    dispatcher.lambda_handler({"period": HOUR.isoformat()}, LambdaContext.of())
    for record in lambda_records(stack.queues.url):
        biller.lambda_handler({"Records": [record]}, LambdaContext.of())
    bills = [t for t in CAPTURE.of_type("transaction") if t["type"] == "messaging"]
    # warm invocations (after the first, which also opened the pool and read the rate card)
    for t in bills[1:]:
        spans = _spans_of(t)
        kinds = sorted((s["type"], s["subtype"]) for s in spans)
        sql = [s for s in spans if s["subtype"] == "postgresql"]
        # load, usage (one query whatever the clusters), decision, answer: four SQL round trips
        assert len(sql) == 4, [(s["name"], s["context"]["db"].get("statement", "")[:120]) for s in sql]
        assert kinds.count(("aws", "marketplace metering")) == 1
        assert {s["name"] for s in spans if s["type"] == "app"} == {
            "rate usage",
            "ledger write",
            "ledger record",
        }
        assert t["span_count"]["dropped"] == 0


def test_a_bill_the_marketplace_rejected_says_so_in_its_result_and_labels(
    handlers: tuple[ModuleType, ModuleType], stack: Any
) -> None:
    biller, dispatcher = handlers
    # Given the hour dispatched, and AWS no longer knowing the first customer as subscribed
    stack.metering.subscriptions[PRODUCT].discard(f"aws-{CUSTOMERS[0]}")
    dispatcher.lambda_handler({"period": HOUR.isoformat()}, LambdaContext.of())
    # When every message is billed
    for record in lambda_records(stack.queues.url):
        assert biller.lambda_handler({"Records": [record]}, LambdaContext.of()) == {"batchItemFailures": []}
    # Then the invocation succeeded, but its result and a label say its records were rejected
    bills = {
        t["context"]["tags"]["customer_id"]: t
        for t in CAPTURE.of_type("transaction")
        if t["type"] == "messaging"
    }
    rejected = bills.pop(CUSTOMERS[0])
    assert (rejected["outcome"], rejected["result"]) == ("success", "rejected")
    assert rejected["context"]["tags"]["records_rejected"] >= 1
    assert {(t["result"], "records_rejected" in t["context"]["tags"]) for t in bills.values()} == {
        ("billed", False)
    }
    _validate_against_intake_schemas()


def test_a_failed_bill_is_a_failure_transaction_with_its_error(
    handlers: tuple[ModuleType, ModuleType], stack: Any
) -> None:
    biller, _ = handlers
    record = json.loads((Path(__file__).resolve().parents[2] / "events" / "sqs-malformed.json").read_text())
    response = biller.lambda_handler(record, LambdaContext.of())
    assert len(response["batchItemFailures"]) == 1
    (t,) = CAPTURE.of_type("transaction")
    assert (t["outcome"], t["result"]) == ("failure", "BadMessageError")
    (error,) = CAPTURE.of_type("error")
    assert error["transaction_id"] == t["id"]
    assert error["exception"]["type"] == "BadMessageError"
    _validate_against_intake_schemas()


def test_the_local_runner_produces_the_same_transactions_without_queue_wait(stack: Any) -> None:
    from billing_local.local_run import local_apm_client, run_hour

    LOOP.run_until_complete(_seed(stack.database_url))
    stack.metering.add_product(PRODUCT)
    for c in CUSTOMERS:
        stack.metering.subscribe(PRODUCT, f"aws-{c}")
    stack.metering.clock = within_window
    CAPTURE.reset()
    # one consumer: the last message waits for all the others in the queue
    result = asyncio.run(_run_within_window(run_hour, {"period": HOUR.isoformat()}, local_apm_client()))
    bills = sorted(
        (t for t in CAPTURE.of_type("transaction") if t["type"] == "messaging"), key=lambda t: t["timestamp"]
    )
    queue = stack.queues.url.rsplit("/", 1)[-1]
    assert len(bills) == result.stats.invocations == len(CUSTOMERS)
    assert {t["name"] for t in bills} == {f"RECEIVE {queue}"}
    assert all(t["links"] and t["outcome"] == "success" for t in bills)
    assert sorted(t["context"]["tags"]["customer_id"] for t in bills) == CUSTOMERS
    # one consumer never runs two bills at once: each transaction starts after the previous ended,
    # so no transaction contains another message's work or its own wait in the queue
    for before, after in itertools.pairwise(bills):
        assert after["timestamp"] >= before["timestamp"] + before["duration"] * 1000
    # the waiting shows as message age instead: the last message waited at least the others' work
    assert bills[-1]["context"]["message"]["age"]["ms"] >= sum(t["duration"] for t in bills[:-1]) * 0.9
    _validate_against_intake_schemas()


async def _run_within_window(run_hour: Any, event: dict[str, Any], client: Any) -> Any:
    """run_hour with the biller's clock inside the marketplace window of the fixed test hour."""
    return await run_hour(
        event, concurrency=1, apm_client=client, runtime=lambda s: Runtime(s, clock=within_window)
    )
