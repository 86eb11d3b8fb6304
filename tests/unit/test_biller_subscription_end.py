"""The Biller when a subscription ends while its bill is in flight (#13), on in-memory fakes.

Google's services.check answers for the consumer as it is now: from a cancellation on it refuses the
consumer, yet usage up to the cancellation is still to be reported, so the Google adapter skips the check
for a customer whose end is recorded and marks a check refusal ``refused_now`` (nothing was sent). A bill
that loaded its customer before the cancellation was recorded still meets the refusal; the Biller then
submits once more with the customer as recorded now. The fault-injection suite proves the same end to end
(tests/e2e/test_fault_injection.py, a cancellation arriving while the run bills that customer's hour).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

import pytest
import stamina

from billing.domain.messages import BillMessageV1
from billing.domain.model import LedgerState, Marketplace, Period, Rate, SubmitResult
from billing.services.bill import Biller
from fakes import (
    Clock,
    FakeBillingRepository,
    FakeMarketplace,
    FakeUsageSource,
    aws_customer,
    biller_on_fakes,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from billing.domain.model import Customer, LedgerEntry

HOUR = Period(datetime(2026, 11, 26, 13, tzinfo=UTC))
END = HOUR.end + timedelta(minutes=20)  # the cancellation: 20 minutes after the hour billed
RATES = [Rate(Marketplace.AWS, "capacity_gb_hours", "CapacityGbHours", Decimal(1))]


@pytest.fixture(autouse=True)
def _no_retry_waits() -> None:
    stamina.set_testing(True, attempts=3)


@dataclass
class CheckingMarketplace(FakeMarketplace):
    """A marketplace whose pre-check refuses a consumer whose subscription has ended (``ended``), unless
    the customer carries its end (the adapter then skips the check), as Google's services.check does."""

    ended: bool = False
    refusals: int = 0

    async def submit(
        self, customer: Customer, period: Period, entries: Sequence[LedgerEntry]
    ) -> list[SubmitResult]:
        hook, self.during_call = self.during_call, None
        if hook is not None:
            await hook()
        if self.ended and customer.active_until is None:
            self.refusals += 1
            reason = "services.check: SERVICE_NOT_ACTIVATED"
            return [
                SubmitResult(e.dimension, LedgerState.REJECTED, reason=reason, refused_now=True)
                for e in entries
            ]
        return await super().submit(customer, period, entries)


def biller(market: CheckingMarketplace) -> tuple[Biller, FakeBillingRepository]:
    clock = Clock(END + timedelta(minutes=1))
    repo = FakeBillingRepository(clock=clock, rates=list(RATES))
    usage = FakeUsageSource()
    usage.add("c1", HOUR.start + timedelta(minutes=5), "capacity_gb_hours", "3")
    repo.add_customer(aws_customer("c1"))

    built = biller_on_fakes(clock, repo, usage, market)
    return built, repo


def bill_message() -> BillMessageV1:
    return BillMessageV1(customer_id="c1", period=HOUR.start, run_id=uuid.uuid4())


async def test_a_cancellation_recorded_while_the_hour_is_in_flight_still_bills_the_hour() -> None:
    # Given a bill that loaded its customer (no end yet), and the subscription ending at END while the
    # bill is in flight: the end recorded on the customer, the marketplace now refusing the consumer
    market = CheckingMarketplace()
    built, repo = biller(market)

    async def cancellation() -> None:
        repo.customers["c1"] = replace(repo.customers["c1"], active_until=END)
        market.ended = True

    market.during_call = cancellation
    # When the hour is billed
    outcome = await built.bill(bill_message())
    # Then the refusal for the consumer as it is now was met once, and the hour before the end was
    # submitted again with the recorded end and billed
    assert market.refusals == 1 and len(market.calls) == 1
    assert {e.dimension: (e.state, e.quantity) for e in outcome.entries} == {
        "CapacityGbHours": (LedgerState.ACCEPTED, 3)
    }
    assert market.quantities() == {("c1", "CapacityGbHours", HOUR.start): 3}


async def test_a_refusal_without_a_recorded_end_stands() -> None:
    # Given a consumer the marketplace refuses while no end is recorded for it (not a cancellation)
    market = CheckingMarketplace(ended=True)
    built, _ = biller(market)
    # When the hour is billed
    outcome = await built.bill(bill_message())
    # Then the refusal is recorded as it came, and nothing is submitted again
    assert market.refusals == 1
    assert {e.dimension: e.state for e in outcome.entries} == {"CapacityGbHours": LedgerState.REJECTED}
    assert market.quantities() == {}
