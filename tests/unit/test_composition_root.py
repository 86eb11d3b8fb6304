"""The composition root takes its collaborators as parameters: what it is given, it uses (and wraps).

No database, no AWS, no socket: a Runtime given every port the biller and the dispatcher need builds
neither a pool nor a client. The collaborators here are small in-memory objects satisfying the ports.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from billing.bootstrap import Runtime, Wrappers
from billing.config import Settings
from billing.domain.model import Marketplace

NOW = datetime(2026, 11, 26, 14, 20, tzinfo=UTC)


class Ledger:
    """A BillingRepository that only answers the rate card (the wiring is tested, not billing)."""

    async def rate_card(self) -> Any:
        return {}


class Usage:
    async def hourly_usage(self, customer_id: str, start: datetime, end: datetime) -> list[Any]:
        return []


class Wrapped:
    def __init__(self, inner: Any) -> None:
        self.inner = inner


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("BILLING_DATABASE_SECRET_ARN", raising=False)
    return Settings()


async def test_the_biller_is_built_from_the_given_collaborators_and_clock(settings: Settings) -> None:
    # Given a runtime given its ledger, usage source, an AWS client and a clock, and no database at all
    ledger, usage, aws = Ledger(), Usage(), object()
    runtime = Runtime(
        settings,
        clock=lambda: NOW,
        repository=ledger,  # type: ignore[arg-type]
        usage_source=usage,
        marketplaces={Marketplace.AWS: aws},  # type: ignore[dict-item]
    )
    # When the biller is built
    biller = await runtime.biller()
    # Then it holds exactly those, and the runtime's clock
    assert (biller.repo, biller.usage, biller.clock()) == (ledger, usage, NOW)
    assert await biller.marketplace(Marketplace.AWS) is aws
    await runtime.close()
    assert await runtime.marketplace(Marketplace.AWS) is aws  # still given after close


async def test_wrappers_wrap_what_the_runtime_uses(settings: Settings) -> None:
    # Given wrappers around the ledger, the usage source and the marketplace clients
    ledger, usage, aws = Ledger(), Usage(), object()
    runtime = Runtime(
        settings,
        repository=ledger,  # type: ignore[arg-type]
        usage_source=usage,
        marketplaces={Marketplace.AWS: aws},  # type: ignore[dict-item]
        wrappers=Wrappers(repository=Wrapped, usage_source=Wrapped, marketplace=Wrapped),  # type: ignore[arg-type]
    )
    # When the biller is built
    biller = await runtime.biller()
    client = await biller.marketplace(Marketplace.AWS)
    # Then each is the wrapper around what was given
    assert isinstance(biller.repo, Wrapped) and biller.repo.inner is ledger
    assert isinstance(biller.usage, Wrapped) and biller.usage.inner is usage
    assert isinstance(client, Wrapped) and client.inner is aws
    await runtime.close()


def test_without_a_clock_the_runtime_reads_the_wall_clock(settings: Settings) -> None:
    before = datetime.now(UTC)
    assert before <= Runtime(settings).clock() <= datetime.now(UTC)
