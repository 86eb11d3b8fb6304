"""In-memory fakes of the biller's ports, for unit tests of the services: no database, no sockets.

``FakeBillingRepository`` keeps the ledger the way ``billing.adapters.postgres.PostgresBillingRepository``
keeps it in its tables, statement for statement: the customer's billing version guards every decision
(a stale one writes nothing), a second decision of the same hour is a ConcurrentDecisionError (the
ledger's primary key), submissions are claimed under leases that lapse on the clock, answers are recorded
only by the lease's owner, and an expired hour gives back to the carry only rows every attempt of which
was refused. ``tests/integration/test_repository_contract.py`` runs the same scenarios against both, so
the fake cannot drift from the adapter. Each method does all its work without an ``await`` in between,
so it is as atomic as the one SQL statement it stands for.

``FakeMarketplace`` follows the marketplaces' documented idempotency (AWS BatchMeterUsage: "an identical
record is accepted again with its id", another quantity for the same customer, dimension and hour is a
DuplicateRecord) and answers from a script: accepted, unavailable, refused, an answer lost after the
marketplace took the record, the window closing during the call, or a call that never returns.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from billing.adapters import aws_metering
from billing.domain.errors import ConcurrentDecisionError, WindowExpiredError
from billing.domain.messages import BillMessageV1
from billing.domain.model import (
    REFUSED_STATES,
    UNFINISHED_STATES,
    Customer,
    LedgerEntry,
    LedgerState,
    Marketplace,
    Period,
    Rate,
    RateCard,
    SubmitResult,
    UsageTotal,
    expiry_reasons,
    hour_floor,
)
from billing.domain.rating import Decision
from billing.ports import (
    BillingRepository,
    CustomerHourState,
    MarketplaceClient,
    MarketplaceRules,
    UsageSource,
)
from billing.services.bill import Biller, RateCardCache

Hook = Callable[[], Awaitable[None]]


class Clock:
    """A clock that moves only when told: the Biller's and the repository's ``now``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class LedgerRow:
    """One row of the ``ledger`` table."""

    customer_id: str
    period: datetime
    dimension: str
    quantity: int
    state: LedgerState
    rated: Decimal
    carry_in: Decimal
    carry_out: Decimal
    run_id: str
    attempts: int = 0
    refused_attempts: int = 0
    unconfirmed: bool = False
    record_id: str | None = None
    last_error: str | None = None
    lease_owner: str | None = None
    lease_until: datetime | None = None

    def entry(self) -> LedgerEntry:
        return LedgerEntry(
            customer_id=self.customer_id,
            dimension=self.dimension,
            period=Period(self.period),
            quantity=self.quantity,
            state=self.state,
            attempts=self.attempts,
            record_id=self.record_id,
            last_error=self.last_error,
        )


@dataclass
class FakeBillingRepository:
    """BillingRepository in memory, with the Postgres adapter's semantics (see the module docstring)."""

    clock: Callable[[], datetime]
    customers: dict[str, Customer] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    ledger: dict[tuple[str, datetime, str], LedgerRow] = field(default_factory=dict)
    balances: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    observations: dict[tuple[str, str, datetime], Decimal] = field(default_factory=dict)
    rates: list[Rate] = field(default_factory=list)
    # run once at the start of the named method, then forgotten: what a concurrent delivery does meanwhile
    before: dict[str, Hook] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # every method called, in order

    def add_customer(self, customer: Customer) -> Customer:
        self.customers[customer.id] = customer
        self.versions[customer.id] = 0
        return customer

    def rows(self, customer_id: str, period: Period) -> dict[str, LedgerRow]:
        """The hour's ledger rows by dimension."""
        return {
            d: row for (c, p, d), row in sorted(self.ledger.items()) if c == customer_id and p == period.start
        }

    async def _hook(self, name: str) -> None:
        self.calls.append(name)
        hook = self.before.pop(name, None)
        if hook is not None:
            await hook()

    def _leasable(self, row: LedgerRow, owner: str) -> bool:
        return row.lease_until is None or row.lease_until < self.clock() or row.lease_owner == owner

    async def load(
        self, customer_id: str, period: Period, window_start: datetime
    ) -> CustomerHourState | None:
        await self._hook("load")
        customer = self.customers.get(customer_id)
        if customer is None:
            return None
        return CustomerHourState(
            customer=customer,
            version=self.versions[customer_id],
            entries=tuple(row.entry() for row in self.rows(customer_id, period).values()),
            carries={d: carry for (c, d), carry in self.balances.items() if c == customer_id},
            observed={
                (d, hour): rated
                for (c, d, hour), rated in self.observations.items()
                if c == customer_id and window_start <= hour < period.end
            },
        )

    async def record_decision(
        self,
        state: CustomerHourState,
        message: BillMessageV1,
        decision: Decision,
        entry_states: Mapping[str, tuple[LedgerState, int]],
        owner: str,
        lease: timedelta,
    ) -> bool:
        await self._hook("record_decision")
        customer_id = state.customer.id
        if self.versions.get(customer_id) != state.version:
            return False
        period = message.billing_period.start
        if any((customer_id, period, d.dimension) in self.ledger for d in decision.dimensions):
            raise ConcurrentDecisionError("this hour was decided by a concurrent delivery")
        self.versions[customer_id] += 1
        for d in decision.dimensions:
            entry_state, attempts = entry_states[d.dimension]
            self.ledger[(customer_id, period, d.dimension)] = LedgerRow(
                customer_id=customer_id,
                period=period,
                dimension=d.dimension,
                quantity=d.quantity,
                state=LedgerState(entry_state),
                rated=d.rated,
                carry_in=d.carry_in,
                carry_out=d.carry_out,
                run_id=str(message.run_id),
                attempts=attempts,
                lease_owner=owner if attempts > 0 else None,
                lease_until=self.clock() + lease if attempts > 0 else None,
            )
            self.balances[(customer_id, d.dimension)] = d.carry_out
        for (dimension, hour), rated in decision.observations.items():
            self.observations[(customer_id, dimension, hour)] = rated
        return True

    async def claim(
        self, customer_id: str, period: Period, owner: str, lease: timedelta
    ) -> tuple[LedgerEntry, ...] | None:
        await self._hook("claim")
        claimed = []
        for row in self.rows(customer_id, period).values():
            if row.state in UNFINISHED_STATES and self._leasable(row, owner):
                row.unconfirmed = row.unconfirmed or row.state is LedgerState.SUBMITTED
                row.state = LedgerState.SUBMITTED
                row.attempts += 1
                row.lease_owner, row.lease_until = owner, self.clock() + lease
                claimed.append(row.entry())
        return tuple(claimed) or None

    async def record_results(
        self, customer_id: str, period: Period, owner: str, results: Sequence[SubmitResult]
    ) -> None:
        await self._hook("record_results")
        for result in results:
            row = self.ledger.get((customer_id, period.start, result.dimension))
            if row is None or row.lease_owner != owner:
                continue
            row.state = result.state
            row.record_id = result.record_id or row.record_id
            row.last_error = result.reason
            row.unconfirmed = row.unconfirmed or result.state is LedgerState.SUBMITTED
            row.refused_attempts += result.state in REFUSED_STATES
            row.lease_owner = row.lease_until = None

    async def expire(self, customer_id: str, period: Period, owner: str, window: str) -> int:
        await self._hook("expire")
        maybe_received, carried = expiry_reasons(window)
        settled = 0
        for row in self.rows(customer_id, period).values():
            if row.state not in UNFINISHED_STATES or not self._leasable(row, owner):
                continue
            settled += 1
            received = row.state is LedgerState.SUBMITTED or row.unconfirmed
            if received or row.refused_attempts < row.attempts:
                row.state, row.last_error = LedgerState.REJECTED, maybe_received
            else:
                row.state, row.last_error = LedgerState.EXPIRED, carried
                key = (customer_id, row.dimension)
                if key in self.balances:
                    self.balances[key] += row.quantity
            row.lease_owner = row.lease_until = None
        if settled:
            self.versions[customer_id] += 1
        return settled

    async def rate_card(self) -> RateCard:
        return RateCard(tuple(self.rates))


@dataclass
class FakeUsageSource:
    """UsageSource over a list of usage events (the ``usage`` table's rows)."""

    events: list[tuple[str, datetime, str, Decimal]] = field(default_factory=list)
    on_read: Hook | None = None  # run once at the next read: something happening while the biller reads

    def add(self, customer_id: str, at: datetime, metric: str, quantity: str) -> None:
        self.events.append((customer_id, at, metric, Decimal(quantity)))

    async def hourly_usage(self, customer_id: str, start: datetime, end: datetime) -> list[UsageTotal]:
        hook, self.on_read = self.on_read, None
        if hook is not None:
            await hook()
        totals: dict[tuple[datetime, str], Decimal] = {}
        for customer, at, metric, quantity in self.events:
            if customer == customer_id and start <= at < end:
                key = (hour_floor(at), metric)
                totals[key] = totals.get(key, Decimal(0)) + quantity
        return [UsageTotal(hour, metric, quantity) for (hour, metric), quantity in sorted(totals.items())]


class Answer(enum.Enum):
    """What the marketplace does with one call."""

    ACCEPT = "accept"  # takes the records (an identical one again: accepted with its id)
    UNAVAILABLE = "unavailable"  # takes nothing and says so (503, unprocessed records): FAILED, retryable
    REJECT = "reject"  # refuses the records for good (e.g. CustomerNotSubscribed): REJECTED
    LOSE_ANSWER = "lose answer"  # takes the records, but the answer never arrives: SUBMITTED, unknown
    WINDOW_CLOSED = "window closed"  # the hour fell out of its window during the call: WindowExpiredError
    HANG = "hang"  # never answers


@dataclass
class FakeMarketplace:
    """MarketplaceClient holding what it was sent, answering each call from ``answers`` (then ACCEPT)."""

    marketplace: Marketplace = Marketplace.AWS
    rules: MarketplaceRules = aws_metering.RULES
    answers: list[Answer] = field(default_factory=list)
    during_call: Hook | None = None  # run once inside the next call, before it answers
    held: dict[tuple[str, str, datetime], tuple[int, str]] = field(default_factory=dict)
    calls: list[list[LedgerEntry]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def quantities(self) -> dict[tuple[str, str, datetime], int]:
        """What the marketplace will charge: quantity per (customer, dimension, hour)."""
        return {key: quantity for key, (quantity, _) in self.held.items()}

    async def submit(
        self, customer: Customer, period: Period, entries: Sequence[LedgerEntry]
    ) -> list[SubmitResult]:
        self.calls.append(list(entries))
        answer = self.answers.pop(0) if self.answers else Answer.ACCEPT
        hook, self.during_call = self.during_call, None
        if hook is not None:
            await hook()
        if answer is Answer.HANG:
            await asyncio.Event().wait()
        if answer is Answer.WINDOW_CLOSED:
            raise WindowExpiredError(f"{period} is outside the marketplace's window")
        if answer is Answer.UNAVAILABLE:
            return [SubmitResult(e.dimension, LedgerState.FAILED, reason="unavailable") for e in entries]
        if answer is Answer.REJECT:
            return [SubmitResult(e.dimension, LedgerState.REJECTED, reason="not subscribed") for e in entries]
        results = [self._take(customer, period, e) for e in entries]
        if answer is Answer.LOSE_ANSWER:
            return [SubmitResult(r.dimension, LedgerState.SUBMITTED, reason="answer lost") for r in results]
        return results

    def _take(self, customer: Customer, period: Period, entry: LedgerEntry) -> SubmitResult:
        key = (customer.id, entry.dimension, period.start)
        if key in self.held:
            quantity, record_id = self.held[key]
            if quantity == entry.quantity:
                return SubmitResult(entry.dimension, LedgerState.ACCEPTED, record_id=record_id)
            return SubmitResult(entry.dimension, LedgerState.DUPLICATE, reason="DuplicateRecord")
        record_id = f"rec-{next(self._ids)}"
        self.held[key] = (entry.quantity, record_id)
        return SubmitResult(entry.dimension, LedgerState.ACCEPTED, record_id=record_id)


def aws_customer(customer_id: str, active_from: datetime | None = None) -> Customer:
    from billing.domain.model import CustomerStatus

    return Customer(
        id=customer_id,
        marketplace=Marketplace.AWS,
        status=CustomerStatus.ACTIVE,
        active_from=active_from or datetime(2026, 1, 1, tzinfo=UTC),
        active_until=None,
        aws_customer_identifier=f"aws-{customer_id}",
        aws_product_code="prod-test-0001",
    )


def biller_on_fakes(
    clock: Clock,
    repo: FakeBillingRepository,
    usage: FakeUsageSource,
    market: MarketplaceClient,
    *,
    attempts: int = 3,
    budget_seconds: float = 45.0,
) -> Biller:
    """A Biller wired to these fakes, with the template's look-back (24 h) and lease (120 s)."""

    async def client(_: Marketplace) -> MarketplaceClient:
        return market

    return Biller(
        repo=repo,
        usage=usage,
        marketplace=client,
        rate_cards=RateCardCache(repo),
        lookback_hours=24,
        lease_seconds=120,
        attempts=attempts,
        budget_seconds=budget_seconds,
        clock=clock,
    )


def _satisfies_the_ports(
    repo: FakeBillingRepository, usage: FakeUsageSource, market: FakeMarketplace
) -> tuple[BillingRepository, UsageSource, MarketplaceClient]:
    """mypy checks here that the fakes satisfy the ports' Protocols (mypy --strict tests/fakes.py)."""
    return repo, usage, market
