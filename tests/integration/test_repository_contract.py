"""One contract, two BillingRepository implementations: the Postgres adapter and the unit tests' fake.

Each scenario runs against ``PostgresBillingRepository`` on a real (embedded) PostgreSQL and against
``tests/fakes.FakeBillingRepository``; both must give the same answers and leave the same rows. The
Biller's unit tests trust the fake only as far as this holds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from billing.adapters.postgres import PostgresBillingRepository
from billing.domain.errors import ConcurrentDecisionError
from billing.domain.messages import BillMessageV1
from billing.domain.model import LedgerState, SubmitResult
from billing.domain.rating import Decision, decide
from billing.ports import BillingRepository, CustomerHourState
from fakes import Clock, FakeBillingRepository, aws_customer
from testkit import HOUR, add_aws_customer

LEASE = timedelta(minutes=2)
LAPSED = timedelta(seconds=-1)  # a lease that has already run out, on either clock
DIMENSIONS = ("CapacityGbHours", "DataTransferGb")
SUBMIT = (LedgerState.SUBMITTED, 1)
WINDOW = "6-hour"


@dataclass
class Row:
    state: LedgerState
    quantity: int
    attempts: int
    refused_attempts: int
    unconfirmed: bool
    lease_owner: str | None
    record_id: str | None
    last_error: str | None


class Harness:
    """A repository and the means to arrange and inspect its rows, whatever keeps them."""

    repo: BillingRepository

    async def add_customer(self, customer_id: str) -> None:
        raise NotImplementedError

    async def rows(self, customer_id: str) -> dict[str, Row]:
        raise NotImplementedError

    async def carry(self, customer_id: str, dimension: str) -> Decimal:
        raise NotImplementedError


class PostgresHarness(Harness):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.repo = PostgresBillingRepository(pool)

    async def add_customer(self, customer_id: str) -> None:
        await add_aws_customer(self.pool, customer_id)

    async def rows(self, customer_id: str) -> dict[str, Row]:
        found = await self.pool.fetch(
            "SELECT * FROM ledger WHERE customer_id = $1 AND period = $2", customer_id, HOUR.start
        )
        return {
            r["dimension"]: Row(
                LedgerState(r["state"]),
                r["quantity"],
                r["attempts"],
                r["refused_attempts"],
                r["unconfirmed"],
                r["lease_owner"],
                r["record_id"],
                r["last_error"],
            )
            for r in found
        }

    async def carry(self, customer_id: str, dimension: str) -> Decimal:
        value = await self.pool.fetchval(
            "SELECT carry FROM balances WHERE customer_id = $1 AND dimension = $2", customer_id, dimension
        )
        return Decimal(value)


class FakeHarness(Harness):
    def __init__(self) -> None:
        self.fake = FakeBillingRepository(clock=Clock(datetime.now(UTC)))
        self.repo = self.fake

    async def add_customer(self, customer_id: str) -> None:
        self.fake.add_customer(aws_customer(customer_id))

    async def rows(self, customer_id: str) -> dict[str, Row]:
        return {
            d: Row(
                r.state,
                r.quantity,
                r.attempts,
                r.refused_attempts,
                r.unconfirmed,
                r.lease_owner,
                r.record_id,
                r.last_error,
            )
            for d, r in self.fake.rows(customer_id, HOUR).items()
        }

    async def carry(self, customer_id: str, dimension: str) -> Decimal:
        return self.fake.balances[(customer_id, dimension)]


@pytest.fixture(params=["postgres", "fake"])
def harness(request: pytest.FixtureRequest) -> Harness:
    # sync, so that the Postgres fixtures (which run their own event loops to create a database) are set
    # up outside the test's loop
    if request.param == "fake":
        return FakeHarness()
    pool: asyncpg.Pool = request.getfixturevalue("pool")
    return PostgresHarness(pool)


def message() -> BillMessageV1:
    return BillMessageV1(customer_id="c1", period=HOUR.start, run_id=uuid.uuid4())


def decision(carries: dict[str, Decimal] | None = None) -> Decision:
    """2.5 and 1.5 units rated in the hour: 2 and 1 billed, 0.5 of each carried."""
    rated = {("CapacityGbHours", HOUR.start): Decimal("2.5"), ("DataTransferGb", HOUR.start): Decimal("1.5")}
    return decide(DIMENSIONS, rated, {}, carries or {})


async def decided(h: Harness, states: dict[str, tuple[LedgerState, int]] | None = None) -> CustomerHourState:
    """c1's hour decided by "first" (rows with an attempt leased to it); the state loaded afterwards."""
    await h.add_customer("c1")
    state = await h.repo.load("c1", HOUR, HOUR.shifted(-24).start)
    assert state is not None
    chosen = states or dict.fromkeys(DIMENSIONS, SUBMIT)
    assert await h.repo.record_decision(state, message(), decision(), chosen, "first", LEASE)
    after = await h.repo.load("c1", HOUR, HOUR.shifted(-24).start)
    assert after is not None
    return after


def answer(state: LedgerState, record_id: str | None = None, reason: str | None = None) -> list[SubmitResult]:
    return [
        SubmitResult(d, state, record_id=record_id and f"{record_id}-{d}", reason=reason) for d in DIMENSIONS
    ]


async def test_an_unknown_customer_loads_as_none(harness: Harness) -> None:
    assert await harness.repo.load("nobody", HOUR, HOUR.shifted(-24).start) is None


async def test_a_decision_is_read_back_with_its_balances_and_observations(harness: Harness) -> None:
    # Given a decision of c1's hour, When the hour is loaded again
    state = await decided(harness, {"CapacityGbHours": SUBMIT, "DataTransferGb": (LedgerState.SKIPPED, 0)})
    # Then it holds the rows, the carried balances, the observations and the next billing version
    assert state.version == 1
    assert sorted((e.dimension, e.quantity, e.state, e.attempts) for e in state.entries) == [
        ("CapacityGbHours", 2, LedgerState.SUBMITTED, 1),
        ("DataTransferGb", 1, LedgerState.SKIPPED, 0),
    ]
    assert dict(state.carries) == {"CapacityGbHours": Decimal("0.5"), "DataTransferGb": Decimal("0.5")}
    assert dict(state.observed) == {
        ("CapacityGbHours", HOUR.start): Decimal("2.5"),
        ("DataTransferGb", HOUR.start): Decimal("1.5"),
    }
    # and only the row with an attempt is leased, to the decider
    assert {d: r.lease_owner for d, r in (await harness.rows("c1")).items()} == {
        "CapacityGbHours": "first",
        "DataTransferGb": None,
    }


async def test_a_decision_on_a_stale_billing_version_writes_nothing(harness: Harness) -> None:
    # Given a state loaded before another decision moved c1's billing version
    await harness.add_customer("c1")
    stale = await harness.repo.load("c1", HOUR.shifted(1), HOUR.shifted(-23).start)
    assert stale is not None
    await harness.repo.record_decision(
        stale, message(), decision(), dict.fromkeys(DIMENSIONS, SUBMIT), "first", LEASE
    )
    # When a decision of another hour is recorded on it
    later = BillMessageV1(customer_id="c1", period=HOUR.shifted(1).start, run_id=uuid.uuid4())
    written = await harness.repo.record_decision(
        stale, later, decision(), dict.fromkeys(DIMENSIONS, SUBMIT), "second", LEASE
    )
    # Then it is refused and nothing of it is written
    assert written is False
    reloaded = await harness.repo.load("c1", HOUR.shifted(1), HOUR.shifted(-23).start)
    assert reloaded is not None and reloaded.entries == () and reloaded.version == 1


async def test_deciding_a_decided_hour_again_is_a_concurrent_decision(harness: Harness) -> None:
    # Given c1's hour decided, and its state loaded afterwards (the current billing version)
    state = await decided(harness)
    # When the hour is decided again on that version
    # Then the ledger's key refuses it
    with pytest.raises(ConcurrentDecisionError):
        await harness.repo.record_decision(
            state, message(), decision(), dict.fromkeys(DIMENSIONS, SUBMIT), "second", LEASE
        )


async def test_a_live_lease_of_another_delivery_keeps_the_claim_from_anyone_else(harness: Harness) -> None:
    # Given rows leased to "first" by its decision
    await decided(harness)
    # When "second" claims them, then "first" itself
    assert await harness.repo.claim("c1", HOUR, "second", LEASE) is None
    mine = await harness.repo.claim("c1", HOUR, "first", LEASE)
    # Then only the owner gets them: one more attempt, unconfirmed (the last one was never answered)
    assert mine is not None and sorted((e.dimension, e.attempts) for e in mine) == [
        ("CapacityGbHours", 2),
        ("DataTransferGb", 2),
    ]
    assert {r.unconfirmed for r in (await harness.rows("c1")).values()} == {True}


async def test_a_lapsed_lease_is_taken_over_and_answers_are_recorded_only_by_the_owner(
    harness: Harness,
) -> None:
    # Given rows whose lease has run out, answered as throttled by their owner
    await decided(harness)
    await harness.repo.record_results("c1", HOUR, "first", answer(LedgerState.FAILED, reason="throttled"))
    taken = await harness.repo.claim("c1", HOUR, "second", LAPSED)
    assert taken is not None and {e.state for e in taken} == {LedgerState.SUBMITTED}
    # When the earlier owner and then the new owner record answers
    await harness.repo.record_results("c1", HOUR, "first", answer(LedgerState.ACCEPTED, record_id="late"))
    await harness.repo.claim("c1", HOUR, "third", LEASE)
    await harness.repo.record_results("c1", HOUR, "third", answer(LedgerState.ACCEPTED, record_id="r"))
    # Then only the holder's answer counts, the refusal was counted, and the rows are released
    rows = await harness.rows("c1")
    assert {d: (r.state, r.record_id, r.attempts, r.refused_attempts) for d, r in rows.items()} == {
        d: (LedgerState.ACCEPTED, f"r-{d}", 3, 1) for d in DIMENSIONS
    }
    assert {r.lease_owner for r in rows.values()} == {None}
    # and "second"'s attempt, never answered, leaves them unconfirmed
    assert {r.unconfirmed for r in rows.values()} == {True}
    # and settled rows are not claimed again
    assert await harness.repo.claim("c1", HOUR, "fourth", LEASE) is None


async def test_expiry_carries_only_what_every_attempt_proved_refused(harness: Harness) -> None:
    # Given one row refused on its only attempt, and one whose answer was lost
    await decided(harness)
    await harness.repo.record_results(
        "c1",
        HOUR,
        "first",
        [
            SubmitResult("CapacityGbHours", LedgerState.FAILED, reason="throttled"),
            SubmitResult("DataTransferGb", LedgerState.SUBMITTED, reason="answer lost"),
        ],
    )
    # When the hour is settled outside the window
    settled = await harness.repo.expire("c1", HOUR, "later", WINDOW)
    # Then the refused row expires and gives its quantity back; the other is rejected for a person
    rows = await harness.rows("c1")
    assert settled == 2
    assert {d: r.state for d, r in rows.items()} == {
        "CapacityGbHours": LedgerState.EXPIRED,
        "DataTransferGb": LedgerState.REJECTED,
    }
    assert "carried to a later hour" in (rows["CapacityGbHours"].last_error or "")
    assert "may have received" in (rows["DataTransferGb"].last_error or "")
    assert await harness.carry("c1", "CapacityGbHours") == Decimal("2.5")
    assert await harness.carry("c1", "DataTransferGb") == Decimal("0.5")
    # and the billing version moved; a second expiry finds nothing
    after = await harness.repo.load("c1", HOUR, HOUR.shifted(-24).start)
    assert after is not None and after.version == 2
    assert await harness.repo.expire("c1", HOUR, "later", WINDOW) == 0


async def test_expiry_leaves_rows_leased_to_another_delivery(harness: Harness) -> None:
    # Given rows still leased to "first"
    await decided(harness)
    # When another delivery settles the hour, Then nothing is settled and the version stays
    assert await harness.repo.expire("c1", HOUR, "other", WINDOW) == 0
    state = await harness.repo.load("c1", HOUR, HOUR.shifted(-24).start)
    assert state is not None and state.version == 1
    assert {r.state for r in (await harness.rows("c1")).values()} == {LedgerState.SUBMITTED}
