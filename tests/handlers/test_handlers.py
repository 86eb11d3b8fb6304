"""The real Lambda handlers on the sample events in events/, against the local stack.

Each test calls ``lambda_handler`` exactly as Lambda does (event dict, context object) and asserts
the exact response, including the exact ``batchItemFailures``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest

from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.domain.errors import BadMessageError
from billing.entrypoints.loop import LOOP
from billing_local.faults import Clock
from billing_local.lambda_shapes import LambdaContext
from testkit import HOUR, PRODUCT, RATES, within_window

EVENTS = Path(__file__).resolve().parents[2] / "events"


def event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text())


DISPATCHER = LambdaContext.of("dispatcher")


def run(coro: Any) -> Any:
    return LOOP.run_until_complete(coro)


async def _seed(dsn: str, customers: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO rate_card (marketplace, metric, dimension, factor) VALUES ($1, $2, $3, $4)", RATES
        )
        for c in customers:
            await conn.execute(
                "INSERT INTO customers (id, marketplace, active_from, aws_customer_identifier,"
                " aws_product_code)"
                " VALUES ($1, 'aws', '2026-01-01Z', $2, $3)",
                c,
                f"aws-{c}",
                PRODUCT,
            )
            await conn.execute(
                "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity)"
                " VALUES ($1, $2, 'c1', $3, 3)",
                HOUR.start,
                c,
                "capacity_gb_hours",
            )
    finally:
        await conn.close()


def _fresh_runtime(
    module: ModuleType, monkeypatch: pytest.MonkeyPatch, clock: Clock | None = None
) -> Iterator[ModuleType]:
    """The module as imported once by Lambda, with a runtime built for this test's environment (and
    clock: its ``now`` is what the test says it is)."""
    runtime = Runtime(load_settings(), clock=clock or Clock(within_window()))
    monkeypatch.setattr(module, "runtime", runtime)
    yield module
    run(runtime.close())


@pytest.fixture
def biller_handler(stack: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    import biller

    stack.metering.clock = within_window
    stack.metering.add_product(PRODUCT)
    run(_seed(stack.database_url, ["cust-000000", "cust-000001"]))
    for c in ("cust-000000", "cust-000001"):
        stack.metering.subscribe(PRODUCT, f"aws-{c}")
    yield from _fresh_runtime(biller, monkeypatch)


def test_biller_bills_the_customer_of_a_one_record_event(biller_handler: ModuleType, stack: Any) -> None:
    response = biller_handler.lambda_handler(event("sqs-one-customer.json"), LambdaContext.of())
    assert response == {"batchItemFailures": []}
    assert sorted((r.customer, r.dimension, r.quantity) for r in stack.metering.accepted()) == [
        ("aws-cust-000000", "CapacityGbHours", 3),
        ("aws-cust-000000", "DataTransferGb", 0),
    ]


def test_biller_reports_a_malformed_body_as_the_failed_item(biller_handler: ModuleType, stack: Any) -> None:
    response = biller_handler.lambda_handler(event("sqs-malformed.json"), LambdaContext.of())
    assert response == {"batchItemFailures": [{"itemIdentifier": "0f8d3a5e-1c7b-4e8e-9a64-000000000001"}]}
    assert stack.metering.calls == 0


def test_a_poison_message_fails_alone_and_its_batch_is_billed(biller_handler: ModuleType, stack: Any) -> None:
    response = biller_handler.lambda_handler(event("sqs-several.json"), LambdaContext.of())
    assert response == {"batchItemFailures": [{"itemIdentifier": "0f8d3a5e-1c7b-4e8e-9a64-000000000002"}]}
    assert {r.customer for r in stack.metering.accepted()} == {"aws-cust-000000", "aws-cust-000001"}


def test_the_same_event_delivered_twice_submits_nothing_new(biller_handler: ModuleType, stack: Any) -> None:
    biller_handler.lambda_handler(event("sqs-one-customer.json"), LambdaContext.of())
    calls = stack.metering.calls
    assert biller_handler.lambda_handler(event("sqs-one-customer.json"), LambdaContext.of()) == {
        "batchItemFailures": []
    }
    assert stack.metering.calls == calls


def test_warm_invocations_reuse_the_database_pool(biller_handler: ModuleType) -> None:
    biller_handler.lambda_handler(event("sqs-one-customer.json"), LambdaContext.of())
    pool = run(biller_handler.runtime.pool())
    biller_handler.lambda_handler(event("sqs-several.json"), LambdaContext.of())
    assert run(biller_handler.runtime.pool()) is pool


@pytest.fixture
def dispatcher_handler(stack: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    import dispatcher

    run(_seed(stack.database_url, [f"cust-{i:06d}" for i in range(25)]))
    yield from _fresh_runtime(dispatcher, monkeypatch, Clock(datetime.now(UTC)))


def _queued(stack: Any) -> list[dict[str, Any]]:
    import boto3

    sqs = boto3.client("sqs")
    bodies = []
    while True:
        got = sqs.receive_message(QueueUrl=stack.queues.url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            return bodies
        bodies += [json.loads(m["Body"]) for m in got]


def test_scheduled_event_dispatches_the_hour_before_it(dispatcher_handler: ModuleType, stack: Any) -> None:
    response = dispatcher_handler.lambda_handler(event("scheduled.json"), DISPATCHER)
    # the 14:05 event with a 15-minute settle delay bills 12:00-13:00
    assert response["period"] == "2026-11-26T12:00:00Z"
    assert response["dispatched"] == 25 and response["already_dispatched"] is False
    assert sorted(b["customer_id"] for b in _queued(stack)) == [f"cust-{i:06d}" for i in range(25)]


def test_scheduler_input_dispatches_like_the_scheduled_event(dispatcher_handler: ModuleType) -> None:
    response = dispatcher_handler.lambda_handler(event("scheduler.json"), DISPATCHER)
    assert response["period"] == "2026-11-26T12:00:00Z"


def test_backfill_event_dispatches_the_named_hour_once(dispatcher_handler: ModuleType, stack: Any) -> None:
    first = dispatcher_handler.lambda_handler(event("backfill.json"), DISPATCHER)
    second = dispatcher_handler.lambda_handler(event("backfill.json"), DISPATCHER)
    assert (first["period"], first["dispatched"]) == ("2026-11-26T13:00:00Z", 25)
    assert second == {**first, "already_dispatched": True}
    bodies = _queued(stack)
    assert len(bodies) == 25
    assert {b["period"] for b in bodies} == {"2026-11-26T13:00:00Z"}
    assert {b["run_id"] for b in bodies} == {first["run_id"]}


def test_the_biller_fails_the_item_of_an_hour_not_yet_ended(biller_handler: ModuleType, stack: Any) -> None:
    # Given the biller's clock half way through the message's hour
    biller_handler.runtime.clock.now = HOUR.start + timedelta(minutes=30)
    # Then the item fails (SQS redelivers it until the dead-letter queue holds it) and nothing is sent
    response = biller_handler.lambda_handler(event("sqs-one-customer.json"), LambdaContext.of())
    assert response == {"batchItemFailures": [{"itemIdentifier": "0f8d3a5e-1c7b-4e8e-9a64-000000000001"}]}
    assert stack.metering.calls == 0


@pytest.mark.parametrize(
    ("name", "now"),
    [
        ("backfill.json", datetime(2026, 11, 26, 13, 30, tzinfo=UTC)),  # asks for 13:00-14:00
        ("scheduler.json", datetime(2026, 11, 26, 12, 30, tzinfo=UTC)),  # its 14:05 bills 12:00-13:00
    ],
)
def test_the_dispatcher_refuses_an_hour_not_yet_ended_by_its_clock(
    dispatcher_handler: ModuleType, stack: Any, name: str, now: datetime
) -> None:
    dispatcher_handler.runtime.clock.now = now
    with pytest.raises(BadMessageError, match="has not ended yet"):
        dispatcher_handler.lambda_handler(event(name), DISPATCHER)
    assert _queued(stack) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"time": "2099-11-26T14:05:00Z"},
        {"time": 12345},
        {"period": "2026-11-26T13:00:00Z", "resend_unbilled": "yes"},
        {"period": 10**400},
        [],
    ],
)
def test_the_dispatcher_refuses_absurd_events_as_bad_messages(
    dispatcher_handler: ModuleType, stack: Any, bad: Any
) -> None:
    with pytest.raises(BadMessageError):
        dispatcher_handler.lambda_handler(bad, DISPATCHER)
    assert _queued(stack) == []


def _emf_documents(text: str) -> list[dict[str, Any]]:
    docs = []
    for line in text.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            docs.append(json.loads(line))
    return docs


def test_biller_emits_metrics_per_marketplace_in_embedded_metric_format(
    biller_handler: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given one good message and one malformed message
    biller_handler.lambda_handler(event("sqs-one-customer.json"), LambdaContext.of())
    biller_handler.lambda_handler(event("sqs-malformed.json"), LambdaContext.of())
    good, bad = _emf_documents(capsys.readouterr().out)
    # Then the billed one counts its records per marketplace, with the message's age
    (directive,) = good["_aws"]["CloudWatchMetrics"]
    assert ["marketplace", "service"] in directive["Dimensions"]
    assert good["marketplace"] == "aws"
    assert (good["RecordsAccepted"], good["RecordsRejected"], good["BillingFailures"]) == (
        [2.0],
        [0.0],
        [0.0],
    )
    assert good["MessageAgeMs"][0] > 0
    # and the malformed one counts as a failure
    assert bad["BillingFailures"] == [1.0]
    assert "marketplace" not in bad


def test_logs_carry_the_bill_and_its_apm_ids(
    biller_handler: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the Logger's handler keeps the stream it was created with: read what it writes directly
    from billing.entrypoints import biller as entrypoint
    from testkit import captured_logs

    stream = captured_logs(monkeypatch, entrypoint.logger)
    biller_handler.lambda_handler(event("sqs-one-customer.json"), LambdaContext.of())
    logs = [json.loads(line) for line in stream.getvalue().splitlines()]
    (billed,) = [entry for entry in logs if entry["message"] == "billed"]
    assert billed["customer_id"] == "cust-000000"
    assert billed["billing_hour"] == "2026-11-26T13:00:00Z"
    assert billed["run_id"] == "4d1c3a1e-5b7e-4f51-9c2a-0f5d6a8e2b10"
    assert billed["message_id"] == "0f8d3a5e-1c7b-4e8e-9a64-000000000001"
    assert len(billed["trace.id"]) == 32 and len(billed["transaction.id"]) == 16


# --- the daily auditor ----------------------------------------------------------------------------------

AUDITOR = LambdaContext.of("auditor")


@pytest.fixture
def auditor_handler(stack: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    import auditor

    stack.metering.clock = within_window
    stack.metering.add_product(PRODUCT)
    run(_seed(stack.database_url, ["cust-000000"]))
    yield from _fresh_runtime(auditor, monkeypatch)


def _bill(module: ModuleType, customer_id: str) -> None:
    """The customer's hour (2026-11-26T13:00) billed by the real biller, as its message would be."""
    from testkit import message

    biller = run(module.runtime.biller())  # its clock: 20 minutes after the hour (_fresh_runtime)
    run(biller.bill(message(customer_id)))


def _audit_logs(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    from billing.entrypoints import auditor as entrypoint
    from testkit import captured_logs

    stream = captured_logs(monkeypatch, entrypoint.logger)
    return stream


def test_auditor_reconciles_the_day_before_its_schedule_and_counts_zero_when_clean(
    auditor_handler: ModuleType, stack: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from billing.entrypoints.biller import METRICS_NAMESPACE

    # Given a subscribed customer's hour billed on 2026-11-26
    stack.metering.subscribe(PRODUCT, "aws-cust-000000")
    _bill(auditor_handler, "cust-000000")
    capsys.readouterr()
    # When the daily audit scheduled for 2026-11-27T06:00 runs
    response = auditor_handler.lambda_handler(event("auditor-scheduled.json"), AUDITOR)
    # Then it reconciled 2026-11-26, found nothing unexplained, and says so in its metric
    assert response == {
        "from": "2026-11-26T00:00:00Z",
        "to": "2026-11-26T23:00:00Z",
        "customers": 1,
        "lines": 2,
        "unexplained": 0,
        "clean": True,
    }
    (doc,) = _emf_documents(capsys.readouterr().out)
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == METRICS_NAMESPACE
    assert directive["Metrics"] == [{"Name": "ReconcileUnexplained", "Unit": "Count"}]
    assert doc["ReconcileUnexplained"] == [0.0]


def test_auditor_counts_and_logs_each_unexplained_difference(
    auditor_handler: ModuleType,
    stack: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a customer AWS does not know as subscribed: its 3 GB-hours of 2026-11-26T13:00 were rejected
    _bill(auditor_handler, "cust-000000")
    capsys.readouterr()
    logs = _audit_logs(monkeypatch)
    # When the daily audit runs
    response = auditor_handler.lambda_handler(event("auditor-scheduled.json"), AUDITOR)
    # Then the rejected quantity is counted in the metric the stack alarms on
    assert (response["unexplained"], response["clean"]) == (1, False)
    (doc,) = _emf_documents(capsys.readouterr().out)
    assert doc["ReconcileUnexplained"] == [1.0]
    # and logged with the customer, dimension, hour and reason
    (line,) = [
        json.loads(entry)
        for entry in logs.getvalue().splitlines()
        if json.loads(entry)["message"] == "reconcile: unexplained difference"
    ]
    assert {
        k: line[k] for k in ("customer_id", "marketplace", "dimension", "billing_hour", "kind", "amount")
    } == {
        "customer_id": "cust-000000",
        "marketplace": "aws",
        "dimension": "CapacityGbHours",
        "billing_hour": "2026-11-26T13:00:00Z",
        "kind": "rejected",
        "amount": "3",
    }
    assert "CustomerNotSubscribed" in line["reason"]


def test_auditor_refuses_a_day_that_has_not_ended(auditor_handler: ModuleType) -> None:
    from billing.domain.errors import BadMessageError
    from billing.entrypoints.auditor import audit_request

    # the clock is only consulted for an operator's {"day": ...}
    with pytest.raises(BadMessageError, match="has not ended"):
        audit_request({"day": "2026-11-27"}, clock=lambda: within_window())
    assert audit_request({"day": "2026-11-25"}, clock=lambda: within_window()).first.isoformat() == (
        "2026-11-25T00:00:00Z"
    )
