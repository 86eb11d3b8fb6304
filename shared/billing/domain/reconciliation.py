"""Reconciliation's accounting, pure Python: per customer and dimension, usage against the ledger.

``source − billed = pending late usage + late usage across the range's edges + carry movement + expired
quantities returned to the carry + rejected / unsettled quantities``; every part is explained or not.
The reads behind it are the ReconcileReader port (billing.adapters.postgres_reconcile); the orchestration
is billing.services.reconcile, used by ``billing reconcile`` and the daily auditor alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from billing.domain.model import LedgerState, Marketplace, Period
from billing.domain.subscriptions import PlanSpan

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

ZERO = Decimal(0)
BILLED = frozenset({LedgerState.ACCEPTED, LedgerState.DUPLICATE})
UNSETTLED = frozenset({LedgerState.PENDING, LedgerState.SUBMITTED, LedgerState.FAILED})


@dataclass(frozen=True)
class LedgerRow:
    """A ledger row as the reconciliation reads it."""

    customer_id: str
    dimension: str
    period: datetime
    quantity: int
    state: LedgerState
    rated: Decimal
    carry_in: Decimal
    carry_out: Decimal
    last_error: str | None
    decided_at: datetime
    updated_at: datetime
    in_range: bool
    attempts: int = 0  # the decision's submission and each later claim
    refused_attempts: int = 0  # of those, the ones whose answer proved the record was not taken
    unconfirmed: bool = False  # some attempt may have delivered it and its answer was never recorded

    @property
    def maybe_received(self) -> bool:
        """Some attempt may have reached the marketplace: no answer on record proves it refused them all."""
        return self.unconfirmed or self.refused_attempts < self.attempts

    @property
    def returned(self) -> bool:
        """Decided with a quantity, then expired: the quantity went back to the carried balance."""
        return self.state is LedgerState.EXPIRED and self.quantity != 0


@dataclass(frozen=True)
class Difference:
    """One explained or unexplained part of (source − billed) for a customer and dimension.

    ``in_sum`` parts add up to source − billed; the others are consistency checks of the ledger.
    """

    kind: str
    amount: Decimal
    explained: bool
    reason: str
    period: str | None = None
    in_sum: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "amount": num(self.amount),
            "explained": self.explained,
            "reason": self.reason,
            "period": self.period,
            "in_sum": self.in_sum,
        }


@dataclass
class DimensionReconciliation:
    customer_id: str
    marketplace: str
    dimension: str
    source: Decimal  # rated usage of the range's hours, from the usage source now
    observed: Decimal  # what billing last saw of those hours (usage_observations)
    rated: Decimal  # usage accounted for by the decisions of the range's hours (ledger.rated)
    billed: int  # quantities the marketplace holds (accepted, duplicate)
    carry_in: Decimal  # the balance before the range's first decision
    carry_out: Decimal  # carry_in + what the range's decisions left in, or gave back to, the balance
    records: int
    differences: list[Difference] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return all(d.explained for d in self.differences)

    @property
    def unexplained(self) -> list[Difference]:
        return [d for d in self.differences if not d.explained]

    def as_dict(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "marketplace": self.marketplace,
            "dimension": self.dimension,
            "source": num(self.source),
            "observed": num(self.observed),
            "rated": num(self.rated),
            "billed": self.billed,
            "carry_in": num(self.carry_in),
            "carry_out": num(self.carry_out),
            "records": self.records,
            "clean": self.clean,
            "differences": [d.as_dict() for d in self.differences],
        }


@dataclass
class Reconciliation:
    start: Period
    end: Period  # the last hour, included
    usage_source: str
    customers: int
    lines: list[DimensionReconciliation]

    @property
    def unexplained(self) -> int:
        return sum(len(line.unexplained) for line in self.lines)

    @property
    def clean(self) -> bool:
        return self.unexplained == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "usage_source": self.usage_source,
            "customers": self.customers,
            "clean": self.clean,
            "unexplained": self.unexplained,
            "lines": [line.as_dict() for line in self.lines],
        }


@dataclass(frozen=True)
class ScopeCustomer:
    """A customer in a reconciliation's scope: billable in the range, or with ledger rows in it."""

    id: str
    marketplace: Marketplace
    status: str
    active_from: datetime
    active_until: datetime | None
    plans: tuple[PlanSpan, ...] = ()  # the subject's plan spans (#13): each hour rated with its plan


def reconcile_pair(
    *,
    customer_id: str,
    marketplace: str,
    dimension: str,
    source: Mapping[datetime, Decimal],
    observed: Mapping[datetime, Decimal],
    rows: Sequence[LedgerRow],
    balance: Decimal | None,
    all_rated: Decimal,
    all_observed: Decimal,
    next_hour: datetime | None,
    lookback: timedelta,
    after_end: Mapping[datetime, Decimal] | None = None,
    ended_at: datetime | None = None,
) -> DimensionReconciliation:
    """Account for source − billed of one customer and dimension over the range.

    source − billed = pending late usage + late usage across the range's edges + carry movement
    + expired quantities returned to the carry + rejected / unsettled quantities + row arithmetic
    errors; the last three are unexplained. Each row must satisfy
    rated = quantity + carry_out − carry_in, and in decision order every carry_in must equal the
    balance the decision before left (its carry_out, plus quantities of rows expired in between).
    """
    in_range = [r for r in rows if r.in_range]
    diffs: list[Difference] = []
    source_total = sum(source.values(), ZERO)
    observed_total = sum(observed.values(), ZERO)
    rated = sum((r.rated for r in in_range), ZERO)
    billed = sum(r.quantity for r in in_range if r.state in BILLED)

    diffs += _pending(source, observed, next_hour, lookback)
    edge = observed_total - rated
    if edge:
        conserved = all_rated == all_observed
        diffs.append(
            Difference(
                "late usage across the range's edges",
                edge,
                explained=conserved,
                reason=(
                    "usage of these hours billed by decisions of later hours, or late usage of earlier "
                    "hours billed by decisions in the range"
                    + (
                        " (all-time: the ledger accounts for exactly the usage billing observed)"
                        if conserved
                        else f"; but all-time the ledger accounts for {num(all_rated)} of the "
                        f"{num(all_observed)} units billing observed"
                    )
                ),
            )
        )
    decisions = sorted(in_range, key=lambda r: (r.decided_at, r.period))
    carry_in = decisions[0].carry_in if decisions else ZERO
    movement = sum((r.carry_out - r.carry_in for r in in_range), ZERO)
    returned = sum((Decimal(r.quantity) for r in in_range if r.returned), ZERO)
    carry_out = carry_in + movement + returned
    if movement:
        diffs.append(_carry_difference(movement, carry_in, carry_out, in_range))
    for r in sorted(in_range, key=lambda r: r.period):
        diffs += _row_differences(r)
    diffs += _chain(rows, balance)
    unbillable = sum((after_end or {}).values(), ZERO)
    if unbillable:
        # #13: not part of source − billed (source stops at the end instant); reported so it is never lost
        # silently, and explained: no marketplace takes usage of a subscription after its end
        hours = sorted(after_end or {})
        diffs.append(
            Difference(
                "unbillable after end",
                unbillable,
                explained=True,
                reason=f"usage recorded after the subscription ended at {_iso(ended_at) if ended_at else '?'}"
                f" ({len(hours)} hour(s) from {_iso(hours[0])}): never sent to the marketplace",
                in_sum=False,
            )
        )
    return DimensionReconciliation(
        customer_id=customer_id,
        marketplace=marketplace,
        dimension=dimension,
        source=source_total,
        observed=observed_total,
        rated=rated,
        billed=billed,
        carry_in=carry_in,
        carry_out=carry_out,
        records=len(in_range),
        differences=diffs,
    )


def _pending(
    source: Mapping[datetime, Decimal],
    observed: Mapping[datetime, Decimal],
    next_hour: datetime | None,
    lookback: timedelta,
) -> list[Difference]:
    diffs = []
    for hour in sorted(source.keys() | observed.keys()):
        late = source.get(hour, ZERO) - observed.get(hour, ZERO)
        if not late:
            continue
        at = _iso(hour)
        if next_hour is None:
            diffs.append(
                Difference(
                    "late usage never billed",
                    late,
                    explained=False,
                    reason="usage billing has not seen, and the customer is no longer billable",
                    period=at,
                )
            )
        elif hour >= next_hour - lookback:
            diffs.append(
                Difference(
                    "pending",
                    late,
                    explained=True,
                    reason=f"will be billed with the next hour ({_iso(next_hour)})",
                    period=at,
                )
            )
        else:
            diffs.append(
                Difference(
                    "late usage never billed",
                    late,
                    explained=False,
                    reason=(
                        f"usage billing has not seen, older than the look-back window of the next hour "
                        f"({_iso(next_hour)}): bill the hour again or correct it by hand"
                    ),
                    period=at,
                )
            )
    return diffs


def _carry_difference(
    movement: Decimal, carry_in: Decimal, carry_out: Decimal, rows: Sequence[LedgerRow]
) -> Difference:
    expired = sum(1 for r in rows if r.state is LedgerState.EXPIRED and not r.quantity)
    note = f"; includes {expired} hour(s) decided after the marketplace's window" if expired else ""
    if carry_out < 0:
        reason = (
            f"downward corrections leave {num(-carry_out)} unit(s) to net against later usage, "
            f"never a negative quantity (carry {num(carry_in)} → {num(carry_out)}{note})"
        )
        kind = "credit"
    elif carry_in < 0:
        reason = f"used up by usage (carry {num(carry_in)} → {num(carry_out)}{note})"
        kind = "credit"
    elif movement < 0:
        reason = (
            "units carried from earlier hours (remainders, expired "
            f"hours) were billed (carry {num(carry_in)} → {num(carry_out)}{note})"
        )
        kind = "carry billed"
    else:
        reason = f"fractions of a unit wait for later hours (carry {num(carry_in)} → {num(carry_out)}{note})"
        kind = "carried remainder"
    return Difference(kind, movement, explained=True, reason=reason)


def _row_differences(r: LedgerRow) -> list[Difference]:
    at = _iso(r.period)
    diffs = []
    residual = r.rated - r.quantity - r.carry_out + r.carry_in
    if residual:
        diffs.append(
            Difference(
                "ledger row arithmetic",
                residual,
                explained=False,
                reason=(
                    f"rated {num(r.rated)} + carry in {num(r.carry_in)} − carry out {num(r.carry_out)} "
                    f"= {num(r.rated + r.carry_in - r.carry_out)}, but the row's quantity is {r.quantity}: "
                    "the row was changed after the decision"
                ),
                period=at,
            )
        )
    q = Decimal(r.quantity)
    if r.state is LedgerState.EXPIRED and q and r.maybe_received:
        unproven = (
            f"{r.attempts - r.refused_attempts} of its {r.attempts} submission(s) got no answer proving a "
            "refusal"
            if r.refused_attempts < r.attempts
            else "a submission of it was never confirmed"
        )
        diffs.append(
            Difference(
                "expired, may have been received",
                q,
                explained=False,
                reason=(
                    f"settled as outside the marketplace's window, but {unproven}: the marketplace may "
                    f"hold these {r.quantity} unit(s), which went back to the carry and may have been billed "
                    "again with a later hour; check the marketplace's records"
                ),
                period=at,
            )
        )
    elif r.state is LedgerState.EXPIRED and q:
        diffs.append(
            Difference(
                "expired",
                q,
                explained=True,
                reason=f"outside the marketplace's window: {r.quantity} unit(s) went back to the carry",
                period=at,
            )
        )
    elif r.state is LedgerState.REJECTED and q and r.maybe_received:
        diffs.append(
            Difference(
                "rejected, may have been received",
                q,
                explained=False,
                reason=(
                    f"{r.last_error or 'no reason recorded'}: the marketplace may hold these {r.quantity} "
                    "unit(s) or not (billed once, or not collected); check its records"
                ),
                period=at,
            )
        )
    elif r.state is LedgerState.REJECTED:
        diffs.append(
            Difference(
                "rejected",
                q,
                explained=not q,
                reason=(
                    f"{r.last_error or 'no reason recorded'}: "
                    + (f"{r.quantity} unit(s) not collected" if q else "quantity 0, nothing lost")
                ),
                period=at,
            )
        )
    elif r.state in UNSETTLED and q:
        diffs.append(
            Difference(
                "unsettled",
                q,
                explained=False,
                reason=(
                    f"{r.state.value}, not confirmed by the marketplace"
                    + (f" ({r.last_error})" if r.last_error else "")
                    + f": {r.quantity} unit(s) not billed yet (`billing status`, `billing redrive`)"
                ),
                period=at,
            )
        )
    elif r.state is LedgerState.SKIPPED and q:
        diffs.append(
            Difference("skipped", q, explained=False, reason=f"{r.quantity} unit(s) never sent", period=at)
        )
    return diffs


def _chain(rows: Sequence[LedgerRow], balance: Decimal | None) -> list[Difference]:
    """Walk decisions and expiries in time order: each carry_in must be the balance left before it.

    The walk runs from the range's first decision to the first decision after its last one; with no
    decision after the range, the balance left must be the stored balance.
    """
    decided = [r.decided_at for r in rows if r.in_range]
    if not decided:
        return []
    first, last = min(decided), max(decided)
    events: list[tuple[datetime, int, LedgerRow]] = [
        (r.decided_at, 0, r) for r in rows if r.decided_at >= first
    ]
    events += [(r.updated_at, 1, r) for r in rows if r.returned and r.updated_at >= first]
    events.sort(key=lambda e: (e[0], e[1], e[2].period))
    diffs = []
    running: Decimal | None = None
    previous: LedgerRow | None = None
    for _, kind, row in events:
        if kind == 1:  # an expiry gave the row's quantity back to the balance
            if running is not None:
                running += row.quantity
            continue
        if running is not None and previous is not None and row.carry_in != running:
            diffs.append(
                Difference(
                    "carry chain",
                    row.carry_in - running,
                    explained=False,
                    in_sum=False,
                    reason=(
                        f"carry in {num(row.carry_in)}, but the decision before it (hour "
                        f"{_iso(previous.period)}) left {num(running)}: the balance changed outside billing"
                    ),
                    period=_iso(row.period),
                )
            )
        running, previous = row.carry_out, row
    decided_later = any(r.decided_at > last for r in rows)
    if running is not None and balance is not None and not decided_later and balance != running:
        diffs.append(
            Difference(
                "balance",
                balance - running,
                explained=False,
                in_sum=False,
                reason=(
                    f"the stored balance is {num(balance)}, but the last decision left {num(running)}: "
                    "the balance changed outside billing"
                ),
            )
        )
    return diffs


def num(value: Decimal | int) -> str:
    """An exact quantity without trailing zeros: 0.50 → 0.5, 2.000 → 2."""
    if not value:
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
