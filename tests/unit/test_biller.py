"""The Biller (billing.services.bill) on in-memory fakes of its ports: every way one bill can end.

How a bill ends, read from the code, and the test of each:

``Biller.bill``
- the hour has not ended by the clock: BadMessageError
  test_an_hour_that_has_not_ended_is_a_bad_message
- the budget runs out mid-call: BudgetSpentError
  test_a_bill_past_its_budget_fails_and_its_rows_stay_unconfirmed
- a permanent error: raised at once, not retried
  test_an_unknown_customer_is_a_bad_message_read_once
- a transient error, then success
  test_a_concurrent_decision_is_retried_and_the_hour_billed_once
- a transient error on every attempt
  test_a_redelivery_waits_while_another_delivery_holds_the_claim
- another delivery holds the claim and settles the hour meanwhile: already billed
  test_a_twin_delivery_waits_for_the_holder_and_ends_as_already_billed

``Biller._bill_once``
- unknown customer: test_an_unknown_customer_is_a_bad_message_read_once
- every row final, already billed: test_a_finished_hour_is_not_billed_again
- decided, every answer final: test_a_customer_hour_is_decided_submitted_and_recorded
- decided, nothing to send (a zero where the marketplace wants none)
  test_zero_quantities_are_skipped_where_the_marketplace_wants_none
- decided past the window, carried without a call
  test_an_hour_past_its_window_is_carried_without_a_call
- the balances moved while deciding (ConcurrentDecisionError)
  test_a_concurrent_decision_is_retried_and_the_hour_billed_once
- the window closes during the call
  test_the_window_closing_during_the_call_carries_the_hour
- an answer not final (MarketplaceUnavailableError); resumed and claimed, the recorded quantities again
  test_an_unavailable_marketplace_fails_the_bill_and_a_redelivery_resends_the_same
  test_a_lost_answer_is_resent_with_the_same_quantity_and_charged_once
- a refusal, recorded and final: test_a_refused_record_is_recorded_and_not_sent_again
- resumed, another delivery holds the claim (ClaimHeldError)
  test_a_redelivery_waits_while_another_delivery_holds_the_claim
- resumed past the window, every attempt refused: carried
  test_a_resumed_hour_past_its_window_is_carried_without_a_call
- resumed past the window, maybe received: never carried
  test_an_hour_the_marketplace_may_hold_is_never_carried_at_expiry
- resumed past the window, another delivery holds the lease (ClaimHeldError)
  test_an_expiry_waits_while_another_delivery_holds_the_lease

and the rating the decisions carry: remainders, late usage, credits.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import stamina

from billing.adapters import azure_metering
from billing.domain.errors import (
    BadMessageError,
    BudgetSpentError,
    ClaimHeldError,
    MarketplaceUnavailableError,
)
from billing.domain.messages import BillMessageV1
from billing.domain.model import (
    BillOutcome,
    Customer,
    CustomerStatus,
    LedgerState,
    Marketplace,
    Period,
    Rate,
    SubmitResult,
)
from billing.services.bill import Biller
from fakes import (
    Answer,
    Clock,
    FakeBillingRepository,
    FakeMarketplace,
    FakeUsageSource,
    LedgerRow,
    aws_customer,
    biller_on_fakes,
)

HOUR = Period(datetime(2026, 11, 26, 13, tzinfo=UTC))
WITHIN_WINDOW = HOUR.end + timedelta(minutes=20)
PAST_AWS_WINDOW = HOUR.start + timedelta(hours=7)  # AWS takes an hour for 6 hours
RATES = [
    Rate(Marketplace.AWS, "capacity_gb_hours", "CapacityGbHours", Decimal(1)),
    Rate(Marketplace.AWS, "data_transfer_gb", "DataTransferGb", Decimal("0.5")),
    Rate(Marketplace.AZURE, "capacity_gb_hours", "capacity", Decimal(1)),
    Rate(Marketplace.AZURE, "data_transfer_gb", "transfer", Decimal(1)),
]
ATTEMPTS = 3


@pytest.fixture(autouse=True)
def _no_retry_waits() -> None:
    """stamina counts the attempts but does not sleep between them (as tests/conftest.py sets it)."""
    stamina.set_testing(True, attempts=ATTEMPTS)


@dataclass
class World:
    clock: Clock
    repo: FakeBillingRepository
    usage: FakeUsageSource
    market: FakeMarketplace
    biller: Biller
    # what the Biller waited for a held claim; each wait moves the clock, and may let the holder act
    waits: list[float] = field(default_factory=list)
    while_waiting: Callable[[], Awaitable[None]] | None = None

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(timedelta(seconds=seconds))
        if self.while_waiting is not None:
            await self.while_waiting()

    def rows(self, customer_id: str = "c1", period: Period = HOUR) -> dict[str, LedgerRow]:
        return self.repo.rows(customer_id, period)

    def states(self, customer_id: str = "c1", period: Period = HOUR) -> dict[str, LedgerState]:
        return {d: r.state for d, r in self.rows(customer_id, period).items()}

    def charged(self, customer_id: str = "c1") -> dict[tuple[str, datetime], int]:
        """What the marketplace will charge the customer, per (dimension, hour)."""
        return {(d, h): q for (c, d, h), q in self.market.quantities().items() if c == customer_id}

    def carry(self, dimension: str, customer_id: str = "c1") -> Decimal:
        return self.repo.balances[(customer_id, dimension)]


def world(market: FakeMarketplace | None = None, budget_seconds: float = 45.0) -> World:
    clock = Clock(WITHIN_WINDOW)
    repo = FakeBillingRepository(clock=clock, rates=list(RATES))
    usage = FakeUsageSource()
    marketplace = market or FakeMarketplace()
    biller = biller_on_fakes(
        clock, repo, usage, marketplace, attempts=ATTEMPTS, budget_seconds=budget_seconds
    )
    repo.add_customer(aws_customer("c1"))
    w = World(clock, repo, usage, marketplace, biller)
    biller.sleep = w.sleep
    return w


def message(customer_id: str = "c1", period: Period = HOUR) -> BillMessageV1:
    return BillMessageV1(customer_id=customer_id, period=period.start, run_id=uuid.uuid4())


def quantities(outcome: BillOutcome) -> dict[str, tuple[LedgerState, int]]:
    return {e.dimension: (e.state, e.quantity) for e in outcome.entries}


def some_usage(w: World, period: Period = HOUR) -> None:
    """2.5 GB-hours and 3 GB of transfer (0.5 unit per GB): 2 and 1 units, 0.5 of each carried."""
    w.usage.add("c1", period.start + timedelta(minutes=5), "capacity_gb_hours", "1.25")
    w.usage.add("c1", period.start + timedelta(minutes=35), "capacity_gb_hours", "1.25")
    w.usage.add("c1", period.start + timedelta(minutes=10), "data_transfer_gb", "3")


# --- Biller.bill ---------------------------------------------------------------------------------------


async def test_an_hour_that_has_not_ended_is_a_bad_message() -> None:
    # Given an hour still running by the biller's clock
    w = world()
    w.clock.now = HOUR.start + timedelta(minutes=30)
    # When its message is billed
    with pytest.raises(BadMessageError, match="has not ended"):
        await w.biller.bill(message())
    # Then nothing was read, decided or sent
    assert w.repo.calls == [] and w.market.calls == []


async def test_an_unknown_customer_is_a_bad_message_read_once() -> None:
    # Given a message for a customer the database does not know
    w = world()
    # When it is billed
    with pytest.raises(BadMessageError, match="unknown customer"):
        await w.biller.bill(message("nobody"))
    # Then it failed on the first read, without a retry (a permanent error)
    assert w.repo.calls == ["load"]


async def test_a_bill_past_its_budget_fails_and_its_rows_stay_unconfirmed() -> None:
    # Given a marketplace call that never answers and a bill with a short budget
    w = world(FakeMarketplace(answers=[Answer.HANG]), budget_seconds=0.05)
    some_usage(w)
    # When the hour is billed
    with pytest.raises(BudgetSpentError):
        await w.biller.bill(message())
    # Then its rows stay submitted (the call may have reached the marketplace), so a redelivery after
    # the lease resends exactly those quantities, marked unconfirmed
    assert w.states() == {"CapacityGbHours": LedgerState.SUBMITTED, "DataTransferGb": LedgerState.SUBMITTED}
    w.clock.advance(timedelta(minutes=3))
    outcome = await w.biller.bill(message())
    assert quantities(outcome) == {
        "CapacityGbHours": (LedgerState.ACCEPTED, 2),
        "DataTransferGb": (LedgerState.ACCEPTED, 1),
    }
    assert all(r.unconfirmed for r in w.rows().values())


async def test_the_budget_counts_from_the_invocations_start_not_the_bills() -> None:
    # Given a bill with a 10 s budget whose invocation began 10.5 s ago (a cold start that slow)
    market = FakeMarketplace(answers=[Answer.HANG])
    w = world(market, budget_seconds=10.0)
    some_usage(w)
    started = asyncio.get_running_loop().time() - 10.5
    # When the hour is billed
    with pytest.raises(BudgetSpentError):
        await w.biller.bill(message(), started)
    # Then the spent budget stopped it before anything was sent (from the bill's own start, it would have
    # submitted and waited 10 s for an answer)
    assert market.calls == []


# --- decided now ---------------------------------------------------------------------------------------


async def test_a_customer_hour_is_decided_submitted_and_recorded() -> None:
    # Given a customer with 2.5 GB-hours and 3 GB of transfer in the hour
    w = world()
    some_usage(w)
    # When the hour is billed
    outcome = await w.biller.bill(message())
    # Then the marketplace charges 2 and 1 units in one call, the ledger holds its record ids
    assert w.charged() == {("CapacityGbHours", HOUR.start): 2, ("DataTransferGb", HOUR.start): 1}
    assert outcome.marketplace_calls == 1 and len(w.market.calls) == 1
    assert {d: (r.state, r.record_id) for d, r in w.rows().items()} == {
        d: (LedgerState.ACCEPTED, w.market.held[("c1", d, HOUR.start)][1]) for d in w.rows()
    }
    assert quantities(outcome) == {
        "CapacityGbHours": (LedgerState.ACCEPTED, 2),
        "DataTransferGb": (LedgerState.ACCEPTED, 1),
    }
    # and the fractions carry to the next hour
    assert (w.carry("CapacityGbHours"), w.carry("DataTransferGb")) == (Decimal("0.5"), Decimal("0.5"))


async def test_a_finished_hour_is_not_billed_again() -> None:
    # Given an hour billed once
    w = world()
    some_usage(w)
    await w.biller.bill(message())
    # When its message is delivered again
    again = await w.biller.bill(message())
    # Then nothing is decided or sent: the outcome is the ledger's
    assert again.already_billed and again.marketplace_calls == 0
    assert len(w.market.calls) == 1
    assert quantities(again) == {
        "CapacityGbHours": (LedgerState.ACCEPTED, 2),
        "DataTransferGb": (LedgerState.ACCEPTED, 1),
    }


async def test_zero_quantities_are_skipped_where_the_marketplace_wants_none() -> None:
    # Given an Azure customer (Azure rejects a zero quantity) with usage in one dimension only
    w = world(FakeMarketplace(marketplace=Marketplace.AZURE, rules=azure_metering.RULES))
    w.repo.add_customer(
        Customer(
            "az",
            Marketplace.AZURE,
            CustomerStatus.ACTIVE,
            datetime(2026, 1, 1, tzinfo=UTC),
            None,
            azure_resource_id="0b5e2c1e-0000-4000-8000-000000000001",
            azure_plan_id="basic",
        )
    )
    w.usage.add("az", HOUR.start, "capacity_gb_hours", "3")
    # When the hour is billed, and an idle hour after it
    outcome = await w.biller.bill(message("az"))
    w.clock.advance(timedelta(hours=1))
    idle = await w.biller.bill(message("az", HOUR.shifted(1)))
    # Then only the quantity is sent; the zero is skipped, and an idle hour makes no call at all
    assert [[(e.dimension, e.quantity) for e in call] for call in w.market.calls] == [[("capacity", 3)]]
    assert quantities(outcome) == {
        "capacity": (LedgerState.ACCEPTED, 3),
        "transfer": (LedgerState.SKIPPED, 0),
    }
    assert quantities(idle) == {"capacity": (LedgerState.SKIPPED, 0), "transfer": (LedgerState.SKIPPED, 0)}
    assert idle.marketplace_calls == 0


async def test_an_hour_past_its_window_is_carried_without_a_call() -> None:
    # Given an hour first billed after AWS's 6-hour window closed
    w = world()
    some_usage(w)
    w.clock.now = PAST_AWS_WINDOW
    # When it is billed
    outcome = await w.biller.bill(message())
    # Then nothing is sent, the rows are settled as expired, and the whole balance is carried
    assert w.market.calls == []
    assert quantities(outcome) == {
        "CapacityGbHours": (LedgerState.EXPIRED, 0),
        "DataTransferGb": (LedgerState.EXPIRED, 0),
    }
    assert (w.carry("CapacityGbHours"), w.carry("DataTransferGb")) == (Decimal("2.5"), Decimal("1.5"))
    # and the next hour bills it
    await w.biller.bill(message(period=HOUR.shifted(6)))
    assert w.charged()[("CapacityGbHours", HOUR.shifted(6).start)] == 2


async def test_a_concurrent_decision_is_retried_and_the_hour_billed_once() -> None:
    # Given a second delivery of the same message that decides and bills the hour while the first one
    # reads the usage (so the first one's balances moved under it)
    w = world()
    some_usage(w)
    msg = message()
    other: list[BillOutcome] = []

    async def another_delivery() -> None:
        other.append(await w.biller.bill(msg))

    w.usage.on_read = another_delivery
    # When the first delivery goes on
    outcome = await w.biller.bill(msg)
    # Then its stale decision wrote nothing, its retry found the hour billed, and the marketplace was
    # called once
    assert other[0].marketplace_calls == 1
    assert outcome.already_billed
    assert len(w.market.calls) == 1
    assert w.charged() == {("CapacityGbHours", HOUR.start): 2, ("DataTransferGb", HOUR.start): 1}
    assert w.repo.calls.count("record_decision") == 2
    assert w.repo.versions["c1"] == 1


async def test_the_window_closing_during_the_call_carries_the_hour() -> None:
    # Given a marketplace that answers that the hour left its window during the call
    w = world(FakeMarketplace(answers=[Answer.WINDOW_CLOSED]))
    some_usage(w)
    # When the hour is billed
    outcome = await w.biller.bill(message())
    # Then the answer is recorded as a refusal and the hour settled: expired, its quantities carried
    assert quantities(outcome) == {
        "CapacityGbHours": (LedgerState.EXPIRED, 2),
        "DataTransferGb": (LedgerState.EXPIRED, 1),
    }
    assert {d: (r.attempts, r.refused_attempts) for d, r in w.rows().items()} == {
        "CapacityGbHours": (1, 1),
        "DataTransferGb": (1, 1),
    }
    assert (w.carry("CapacityGbHours"), w.carry("DataTransferGb")) == (Decimal("2.5"), Decimal("1.5"))
    assert w.charged() == {}


async def test_an_unavailable_marketplace_fails_the_bill_and_a_redelivery_resends_the_same() -> None:
    # Given a marketplace unavailable for the first call (it took nothing, and said so)
    w = world(FakeMarketplace(answers=[Answer.UNAVAILABLE]))
    some_usage(w)
    # When the hour is billed
    with pytest.raises(MarketplaceUnavailableError, match="2 of 2 records not confirmed"):
        await w.biller.bill(message())
    # Then the rows are failed (refused), the lease released, and the adapter's retries were not repeated
    assert w.states() == {"CapacityGbHours": LedgerState.FAILED, "DataTransferGb": LedgerState.FAILED}
    assert len(w.market.calls) == 1
    # When more usage arrives for the hour and SQS redelivers the message
    w.usage.add("c1", HOUR.start + timedelta(minutes=50), "capacity_gb_hours", "10")
    outcome = await w.biller.bill(message())
    # Then exactly the recorded quantities are sent, not a recomputation (the new usage is late usage)
    assert quantities(outcome) == {
        "CapacityGbHours": (LedgerState.ACCEPTED, 2),
        "DataTransferGb": (LedgerState.ACCEPTED, 1),
    }
    assert w.market.calls[1] == [
        e
        for e in w.market.calls[1]
        if (e.dimension, e.quantity) in {("CapacityGbHours", 2), ("DataTransferGb", 1)}
    ]
    assert {d: r.attempts for d, r in w.rows().items()} == {"CapacityGbHours": 2, "DataTransferGb": 2}


async def test_a_lost_answer_is_resent_with_the_same_quantity_and_charged_once() -> None:
    # Given a marketplace that takes the records but whose answer is lost
    w = world(FakeMarketplace(answers=[Answer.LOSE_ANSWER]))
    some_usage(w)
    with pytest.raises(MarketplaceUnavailableError):
        await w.biller.bill(message())
    # Then the rows stay submitted (maybe accepted) and unconfirmed
    assert w.states() == {"CapacityGbHours": LedgerState.SUBMITTED, "DataTransferGb": LedgerState.SUBMITTED}
    assert all(r.unconfirmed and r.lease_owner is None for r in w.rows().values())
    # When the message is redelivered
    outcome = await w.biller.bill(message())
    # Then the identical records are sent again and the marketplace charges each once
    assert quantities(outcome) == {
        "CapacityGbHours": (LedgerState.ACCEPTED, 2),
        "DataTransferGb": (LedgerState.ACCEPTED, 1),
    }
    assert w.charged() == {("CapacityGbHours", HOUR.start): 2, ("DataTransferGb", HOUR.start): 1}
    assert {d: r.record_id for d, r in w.rows().items()} == {
        d: w.market.held[("c1", d, HOUR.start)][1] for d in w.rows()
    }


async def test_a_refused_record_is_recorded_and_not_sent_again() -> None:
    # Given a marketplace that refuses the customer's records for good
    w = world(FakeMarketplace(answers=[Answer.REJECT]))
    some_usage(w)
    # When the hour is billed, and delivered again
    outcome = await w.biller.bill(message())
    again = await w.biller.bill(message())
    # Then the refusal is recorded with its reason, the bill ends (no error to retry), nothing is resent
    assert quantities(outcome) == {
        "CapacityGbHours": (LedgerState.REJECTED, 2),
        "DataTransferGb": (LedgerState.REJECTED, 1),
    }
    assert {r.last_error for r in w.rows().values()} == {"not subscribed"}
    assert again.already_billed and len(w.market.calls) == 1


# --- resumed -------------------------------------------------------------------------------------------


async def test_a_redelivery_waits_while_another_delivery_holds_the_claim() -> None:
    # Given an hour whose first submission was refused (unavailable), now claimed by another delivery
    w = world(FakeMarketplace(answers=[Answer.UNAVAILABLE]))
    some_usage(w)
    with pytest.raises(MarketplaceUnavailableError):
        await w.biller.bill(message())
    assert await w.repo.claim("c1", HOUR, "another-delivery", timedelta(minutes=2)) is not None
    # When this delivery bills it
    with pytest.raises(ClaimHeldError):
        await w.biller.bill(message())
    # Then it waited for the holder, backing off, for at most holder_wait_seconds, trying the claim
    # after each wait, then failed (SQS redelivers it); it sent nothing and left the other's lease alone
    assert w.waits[:3] == [0.05, 0.1, 0.2] and max(w.waits) == 1.0
    assert sum(w.waits) <= w.biller.holder_wait_seconds < sum(w.waits) + 1.0
    assert w.repo.calls.count("claim") == 1 + len(w.waits) + 1
    assert len(w.market.calls) == 1
    assert {r.lease_owner for r in w.rows().values()} == {"another-delivery"}
    # and once that lease has lapsed, a redelivery takes the hour over and bills it
    w.clock.advance(timedelta(minutes=3))
    outcome = await w.biller.bill(message())
    assert {e.state for e in outcome.entries} == {LedgerState.ACCEPTED}


async def test_a_twin_delivery_waits_for_the_holder_and_ends_as_already_billed() -> None:
    # Given an hour whose first submission was refused, now claimed by another delivery resubmitting it
    w = world(FakeMarketplace(answers=[Answer.UNAVAILABLE]))
    some_usage(w)
    with pytest.raises(MarketplaceUnavailableError):
        await w.biller.bill(message())
    claimed = await w.repo.claim("c1", HOUR, "another-delivery", timedelta(minutes=2))
    assert claimed is not None

    async def holder_settles() -> None:  # during this delivery's second wait, the holder records AWS's answer
        if len(w.waits) == 2:
            accepted = [SubmitResult(e.dimension, LedgerState.ACCEPTED, record_id="r") for e in claimed]
            await w.repo.record_results("c1", HOUR, "another-delivery", accepted)

    w.while_waiting = holder_settles
    # When this delivery bills the same hour
    outcome = await w.biller.bill(message())
    # Then it waited until the holder had settled the hour and ends as already billed, sending nothing
    assert w.waits == [0.05, 0.1]
    assert outcome.already_billed
    assert w.states() == {"CapacityGbHours": LedgerState.ACCEPTED, "DataTransferGb": LedgerState.ACCEPTED}
    assert len(w.market.calls) == 1


async def test_a_resumed_hour_past_its_window_is_carried_without_a_call() -> None:
    # Given an hour whose only submission was refused as unavailable (a refusal on record for every attempt)
    w = world(FakeMarketplace(answers=[Answer.UNAVAILABLE]))
    some_usage(w)
    with pytest.raises(MarketplaceUnavailableError):
        await w.biller.bill(message())
    # When it is redelivered after the window closed
    w.clock.now = PAST_AWS_WINDOW
    outcome = await w.biller.bill(message())
    # Then it is settled without a call: expired, its quantities back in the carried balance
    assert len(w.market.calls) == 1
    assert quantities(outcome) == {
        "CapacityGbHours": (LedgerState.EXPIRED, 2),
        "DataTransferGb": (LedgerState.EXPIRED, 1),
    }
    assert (w.carry("CapacityGbHours"), w.carry("DataTransferGb")) == (Decimal("2.5"), Decimal("1.5"))


async def test_an_hour_the_marketplace_may_hold_is_never_carried_at_expiry() -> None:
    # Given an hour whose answer was lost (the marketplace may hold its records)
    w = world(FakeMarketplace(answers=[Answer.LOSE_ANSWER]))
    some_usage(w)
    with pytest.raises(MarketplaceUnavailableError):
        await w.biller.bill(message())
    # When it is redelivered after the window closed
    w.clock.now = PAST_AWS_WINDOW
    outcome = await w.biller.bill(message())
    # Then it is rejected for a person to check, and its quantities are not carried (no double billing)
    assert {e.state for e in outcome.entries} == {LedgerState.REJECTED}
    assert all("may have received" in (r.last_error or "") for r in w.rows().values())
    assert (w.carry("CapacityGbHours"), w.carry("DataTransferGb")) == (Decimal("0.5"), Decimal("0.5"))
    assert len(w.market.calls) == 1


async def test_an_expiry_waits_while_another_delivery_holds_the_lease() -> None:
    # Given an hour refused as unavailable, claimed by another delivery, and its window closed
    w = world(FakeMarketplace(answers=[Answer.UNAVAILABLE]))
    some_usage(w)
    with pytest.raises(MarketplaceUnavailableError):
        await w.biller.bill(message())
    w.clock.now = PAST_AWS_WINDOW
    await w.repo.claim("c1", HOUR, "another-delivery", timedelta(minutes=2))
    # When this delivery bills it
    with pytest.raises(ClaimHeldError, match="being settled by another delivery"):
        await w.biller.bill(message())
    # Then nothing was settled under the other's lease
    assert w.states() == {"CapacityGbHours": LedgerState.SUBMITTED, "DataTransferGb": LedgerState.SUBMITTED}
    assert w.carry("CapacityGbHours") == Decimal("0.5")


# --- rating across hours -------------------------------------------------------------------------------


async def test_remainders_carry_until_they_make_a_whole_unit() -> None:
    # Given 0.4 GB-hours in each of three hours
    w = world()
    hours = [HOUR.shifted(i) for i in range(3)]
    for hour in hours:
        w.usage.add("c1", hour.start + timedelta(minutes=1), "capacity_gb_hours", "0.4")
    # When each hour is billed in turn
    for hour in hours:
        w.clock.now = hour.end + timedelta(minutes=20)
        await w.biller.bill(message(period=hour))
    # Then the third hour bills the unit the three make, and 0.2 is carried
    assert [w.charged()[("CapacityGbHours", h.start)] for h in hours] == [0, 0, 1]
    assert w.carry("CapacityGbHours") == Decimal("0.2")


async def test_late_usage_is_billed_with_the_next_hour() -> None:
    # Given an hour billed with 2 GB-hours
    w = world()
    w.usage.add("c1", HOUR.start + timedelta(minutes=1), "capacity_gb_hours", "2")
    await w.biller.bill(message())
    # When 3 more GB-hours of that hour arrive late and the next hour (1 GB-hour) is billed
    w.usage.add("c1", HOUR.start + timedelta(minutes=59), "capacity_gb_hours", "3")
    w.usage.add("c1", HOUR.end + timedelta(minutes=1), "capacity_gb_hours", "1")
    w.clock.now = HOUR.shifted(1).end + timedelta(minutes=20)
    await w.biller.bill(message(period=HOUR.shifted(1)))
    # Then the next hour bills its own usage and the late usage; the billed hour is not billed again
    assert w.charged()[("CapacityGbHours", HOUR.start)] == 2
    assert w.charged()[("CapacityGbHours", HOUR.shifted(1).start)] == 4
    assert w.rows(period=HOUR.shifted(1))["CapacityGbHours"].rated == Decimal(4)


async def test_a_downward_correction_is_credit_never_a_negative_quantity() -> None:
    # Given an hour billed with 3.5 GB-hours (3 units, 0.5 carried)
    w = world()
    w.usage.add("c1", HOUR.start + timedelta(minutes=1), "capacity_gb_hours", "3.5")
    await w.biller.bill(message())
    # When that hour's usage is corrected down by 2 and the next two hours have 1 GB-hour each
    w.usage.add("c1", HOUR.start + timedelta(minutes=2), "capacity_gb_hours", "-2")
    for i in (1, 2):
        w.usage.add("c1", HOUR.shifted(i).start + timedelta(minutes=1), "capacity_gb_hours", "1")
        w.clock.now = HOUR.shifted(i).end + timedelta(minutes=20)
        await w.biller.bill(message(period=HOUR.shifted(i)))
    # Then the correction is a credit (a negative carry) used up by later usage, no quantity is negative,
    # and in all the customer pays floor(3.5 - 2 + 1 + 1) = 3 units
    billed = [w.charged()[("CapacityGbHours", HOUR.shifted(i).start)] for i in range(3)]
    assert billed == [3, 0, 0]
    assert w.rows(period=HOUR.shifted(1))["CapacityGbHours"].carry_out == Decimal("-0.5")
    assert w.carry("CapacityGbHours") == Decimal("0.5")
