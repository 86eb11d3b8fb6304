"""The project's lean agent (billing.tracing): the same spans and metadata, less work per bill.

Real PostgreSQL through asyncpg, the real elastic-apm agent with its asyncpg instrumentation, and the
in-memory transport (billing_local.apm_capture), which runs every event through the agent's processors
and serializer as it would be posted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import elasticapm
import pytest
from elasticapm.instrumentation.packages import dbapi2
from elasticapm.instrumentation.packages.asyncio import asyncpg as instrumented_asyncpg

from billing.tracing import LeanClient
from billing_local.apm_capture import CAPTURE

STATEMENTS = (
    "SELECT count(*) FROM customers WHERE id = $1",
    "UPDATE ledger SET attempts = attempts + 1 WHERE customer_id = $1",
)


@pytest.fixture
def client() -> Iterator[Any]:
    previous = elasticapm.get_client()
    client = LeanClient(
        service_name="lean-agent-test",
        transport_class="billing_local.apm_capture.CaptureTransport",
        metrics_interval="0ms",
        central_config=False,
        cloud_provider="none",
        span_compression_enabled=False,
        span_stack_trace_min_duration="-1ms",
    )
    elasticapm.instrument()
    CAPTURE.reset()
    try:
        yield client
    finally:
        client.close()
        CAPTURE.reset()
        if previous is not None:
            elasticapm.base.set_client(previous)


async def test_each_sql_statement_is_a_span_named_from_a_memo_of_its_signature(
    client: Any, pool: Any
) -> None:
    # Given the memo of signatures as the bills so far left it
    memo = instrumented_asyncpg.extract_signature
    before = memo.cache_info()
    # When two transactions run the same two statements (on one connection: the test pool's release
    # would add its reset statements)
    async with pool.acquire() as conn:
        for _ in range(2):
            client.begin_transaction("messaging")
            for sql in STATEMENTS:
                await conn.execute(sql, "c1")
            client.end_transaction("RECEIVE billing", "success")
    client._transport.flush()
    # Then each statement is one span per transaction, named as the agent names it, with its text
    spans = CAPTURE.of_type("span")
    assert [(s["name"], s["context"]["db"]["statement"]) for s in spans] == [
        (dbapi2.extract_signature(sql), sql) for sql in STATEMENTS * 2
    ]
    assert {s["name"] for s in spans} == {"SELECT FROM customers", "UPDATE ledger"}
    # and the second transaction's names came from the memo, without tokenizing the statements again
    after = memo.cache_info()
    assert after.hits - before.hits >= len(STATEMENTS)


def test_system_metadata_is_read_once_and_handed_out_as_a_copy(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the agent's own reading of the system metadata, counted
    reads: list[int] = []
    original = elasticapm.Client.get_system_info

    def counted(self: Any) -> dict[str, Any]:
        reads.append(1)
        return dict(original(self))

    monkeypatch.setattr(elasticapm.Client, "get_system_info", counted)
    # When the metadata is built as every Lambda invocation builds it (twice), and a caller merges into it
    first = client.build_metadata()
    first["system"]["merged"] = "by a caller"
    second = client.build_metadata()
    # Then the system was read once, and the second metadata is the first's without the caller's merge
    assert len(reads) <= 1
    assert "merged" not in second["system"]
    assert second["system"]["architecture"] == first["system"]["architecture"]
