"""A cold start whose database never answers fails the item within the invocation's budget.

The Biller builds its database pool on the first message of an environment, before the bill's own
budget used to start. asyncpg gives a connection attempt 60 s (and the pool's connector tries twice
after a refused password), as long as the function's whole Timeout, so a database host that accepts the
TCP connection and then says nothing (a hung server, a proxy with no backend) made the invocation time
out: no log line of ours, no metric, no APM outcome. The budget now counts from the invocation's start.

The database here is a real TCP listener that accepts and never answers; the Runtime, the handler's
``bill_body`` and asyncpg are the real ones.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from billing.bootstrap import Runtime
from billing.config import Settings
from billing.domain.errors import BudgetSpentError
from billing.entrypoints.biller import bill_body
from testkit import message, within_window


@pytest.fixture
async def silent_database() -> AsyncIterator[int]:
    """A port whose listener accepts connections and never writes a byte (connections held open)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for writer in held:
        writer.close()
    await server.wait_closed()


async def test_a_database_that_never_answers_at_cold_start_fails_the_item_within_the_budget(
    silent_database: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a cold environment whose database accepts connections and never answers, and a short budget
    monkeypatch.delenv("BILLING_DATABASE_SECRET_ARN", raising=False)
    settings = Settings(
        database_url=f"postgresql://billing@127.0.0.1:{silent_database}/billing",  # type: ignore[arg-type]
        db_tls_verify=False,
        invocation_budget_seconds=0.5,
    )
    now = within_window()
    runtime = Runtime(settings, clock=lambda: now)
    body = message("c-cold", run_id=uuid.uuid4()).model_dump_json()
    # When its first message arrives
    # Then the item fails as a spent budget (transient: SQS redelivers it), naming what was not ready,
    # not as asyncpg's connect timeout a minute later
    try:
        with pytest.raises(BudgetSpentError, match="not ready"):
            await bill_body(runtime, body, "m-cold")
    finally:
        await runtime.close()
