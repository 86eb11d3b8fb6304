"""Ports: what the services need from the outside world. Adapters satisfy them."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from billing.domain.model import (
    Customer,
    LedgerEntry,
    LedgerState,
    Period,
)
from billing.domain.subscriptions import PlanSpan, SubscriptionState

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from billing.domain.messages import BillMessageV1
    from billing.domain.model import (
        Marketplace,
        RateCard,
        SubmitResult,
        UsageTotal,
    )
    from billing.domain.rating import Decision
    from billing.domain.reconciliation import LedgerRow, ScopeCustomer
    from billing.domain.subscriptions import LifecycleEvent


@dataclass(frozen=True)
class MarketplaceRules:
    """A marketplace's documented limits, kept as data of its adapter."""

    batch_limit: int  # records per API call
    window: timedelta  # how far back an hour may still be reported
    sends_zero: bool  # whether a zero quantity is reported (AWS: yes; Azure: rejected)
    idempotency_key: str  # what the marketplace deduplicates on, for humans


class MarketplaceClient(Protocol):
    """Submits one customer's records for one hour to its marketplace."""

    marketplace: Marketplace
    rules: MarketplaceRules

    async def submit(
        self, customer: Customer, period: Period, entries: Sequence[LedgerEntry]
    ) -> list[SubmitResult]:
        """One result per entry; transient failures that outlived the retries come back as FAILED."""
        ...


class UsageSource(Protocol):
    async def hourly_usage(self, customer_id: str, start: datetime, end: datetime) -> list[UsageTotal]:
        """Usage summed per (hour, metric) in [start, end), in one query."""
        ...


@dataclass(frozen=True)
class Run:
    id: uuid.UUID
    period: Period
    dispatched: int
    completed: bool


@dataclass(frozen=True)
class CustomerHourState:
    """Everything the biller reads about a customer before it decides, in one round trip."""

    customer: Customer
    version: int  # optimistic-concurrency counter of the customer's billing decisions
    entries: tuple[LedgerEntry, ...]  # this hour's ledger rows, if already decided
    carries: Mapping[str, Decimal]
    observed: Mapping[tuple[str, datetime], Decimal]
    plans: tuple[PlanSpan, ...] = ()  # the subject's plan spans (#13), oldest first; none: default plan
    # a legacy AWS subject whose account and product have a license subject billable during the hour
    superseded: bool = False


class BillingRepository(Protocol):
    async def load(
        self, customer_id: str, period: Period, window_start: datetime
    ) -> CustomerHourState | None: ...

    async def record_decision(
        self,
        state: CustomerHourState,
        message: BillMessageV1,
        decision: Decision,
        entry_states: Mapping[str, tuple[LedgerState, int]],
        owner: str,
        lease: timedelta,
    ) -> bool:
        """Write the decision, one row per dimension in ``entry_states``' (state, attempts), and claim the
        rows with an attempt for ``owner`` until ``lease`` from now; False, with nothing written, if the
        customer's billing version is no longer ``state.version`` (its balances moved). Raises
        ConcurrentDecisionError if the hour already has rows."""
        ...

    async def claim(
        self, customer_id: str, period: Period, owner: str, lease: timedelta
    ) -> tuple[LedgerEntry, ...] | None:
        """Claim the hour's unfinished rows whose lease is free, lapsed or ``owner``'s: each becomes SUBMITTED
        with one more attempt (and unconfirmed if it was SUBMITTED already); None if there is none."""
        ...

    async def record_results(
        self, customer_id: str, period: Period, owner: str, results: Sequence[SubmitResult]
    ) -> None:
        """Record the marketplace's answers on the rows ``owner`` holds, and release them; rows another
        delivery holds now are left alone. A FAILED or REJECTED answer counts as a refused attempt."""
        ...

    async def expire(self, customer_id: str, period: Period, owner: str, window: str) -> int:
        """Settle an hour outside the marketplace's window: unfinished rows (lease free, lapsed or
        ``owner``'s) every attempt of which was refused become EXPIRED and give their quantity back to the
        carry; the others may have been received and become REJECTED. Returns how many were settled."""
        ...

    async def rate_card(self) -> RateCard: ...


class DispatchRepository(Protocol):
    async def start_run(self, period: Period) -> Run: ...

    def customers_to_bill(
        self, period: Period, page_size: int
    ) -> AsyncIterator[list[tuple[str, Marketplace]]]: ...

    async def finish_run(self, run_id: uuid.UUID, dispatched: int) -> None: ...

    async def record_resend(self, run_id: uuid.UUID, resent: int) -> None:
        """Add ``resent`` to the run's count of messages sent again (read by the operator tooling)."""
        ...


class MessageQueue(Protocol):
    async def send(
        self, messages: Sequence[BillMessageV1], lane: Marketplace | None = None, delay_seconds: int = 0
    ) -> int:
        """Send every message to the marketplace's lane (its own queue; None: the default queue), 10 a
        call, several calls in flight, each delayed ``delay_seconds``; return how many were sent."""
        ...


class ReconcileReader(Protocol):
    """What the reconciliation reads of customers and the ledger (billing.adapters.postgres_reconcile)."""

    async def rate_card(self) -> RateCard: ...

    async def scope_customers(self, start: Period, end: Period, customer: str | None) -> list[ScopeCustomer]:
        """Customers billable in the hours ``start`` .. ``end``, or with ledger rows in them."""
        ...

    async def observations(
        self, ids: Sequence[str], start: Period, end: Period
    ) -> dict[tuple[str, str], dict[datetime, Decimal]]: ...

    async def ledger_walk(
        self, ids: Sequence[str], start: Period, end: Period
    ) -> dict[tuple[str, str], list[LedgerRow]]: ...

    async def balances(self, ids: Sequence[str]) -> dict[tuple[str, str], Decimal]: ...

    async def all_rated(self, ids: Sequence[str]) -> dict[tuple[str, str], Decimal]: ...

    async def all_observed(self, ids: Sequence[str]) -> dict[tuple[str, str], Decimal]: ...

    async def last_decided(self, ids: Sequence[str]) -> dict[str, datetime]: ...


@dataclass(frozen=True)
class Recorded:
    """What recording one subscription event did."""

    state: SubscriptionState
    appended: bool  # False: the event id was already in the history (a replay)
    customer_id: str | None  # the linked customers row (the tenant id), if any
    link_problem: str | None  # why a subject is not billed yet, for operators


class SubscriptionRepository(Protocol):
    """The subjects' history and state (billing.adapters.postgres_subscriptions)."""

    async def record(self, event: LifecycleEvent) -> Recorded:
        """Append the event once and apply it, in one transaction."""
        ...

    async def finished_hours(self, customer_id: str, start: datetime, end: datetime) -> set[datetime]:
        """The hours in [start, end] whose every ledger row for the customer is final."""
        ...
