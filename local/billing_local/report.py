"""What the ledger says: a period's counts and problems, and usage reconciled against the ledger.

``period_report`` counts an hour (the runner prints it); ``period_status`` adds the billing run and
one readable reason per problem (``billing status``); ``reconcile`` checks, per customer and
dimension, that the usage source, what billing observed of it and the ledger agree
(``billing reconcile``; the accounting itself is ``reconcile_pair``, pure Python).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from billing.domain.model import HOUR, LedgerState, Marketplace, Period, hour_floor
from billing.domain.rating import rate_usage

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    import asyncpg

    from billing.domain.model import RateCard
    from billing.ports import UsageSource

ZERO = Decimal(0)


@dataclass
class MarketplaceCustomers:
    """Billable customers of one marketplace in an hour, and which of them lack a complete ledger."""

    customers: int = 0
    billed: int = 0
    missing: list[str] = field(default_factory=list)


@dataclass
class PeriodReport:
    period: str
    customers: int  # billable in the hour
    billed: int  # every dimension in a final state
    unbilled: list[str] = field(default_factory=list)
    states: dict[str, dict[str, int]] = field(default_factory=dict)  # marketplace -> state -> records
    failures: list[dict[str, str]] = field(default_factory=list)
    marketplaces: dict[str, MarketplaceCustomers] = field(default_factory=dict)

    def count(self, state: LedgerState, marketplace: str | None = None) -> int:
        groups = [self.states.get(marketplace, {})] if marketplace else list(self.states.values())
        return sum(g.get(state.value, 0) for g in groups)


async def period_report(pool: asyncpg.Pool, period: Period, failures_limit: int = 50) -> PeriodReport:
    """Billable customers, how many have a complete ledger, and record counts per marketplace and state."""
    finals = [s.value for s in LedgerState if s.final]
    customers = await pool.fetch(
        """
        SELECT c.id, c.marketplace,
               EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = $1)
               AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = $1
                                  AND NOT (l.state = ANY($3::text[]))) AS billed
          FROM customers c
         WHERE c.status = 'active' AND c.active_from < $2 AND (c.active_until IS NULL OR c.active_until > $1)
         ORDER BY c.id
        """,
        period.start,
        period.end,
        finals,
    )
    rows = await pool.fetch(
        """
        SELECT c.marketplace, l.state, count(*) AS n FROM ledger l JOIN customers c ON c.id = l.customer_id
         WHERE l.period = $1 GROUP BY 1, 2
        """,
        period.start,
    )
    states: dict[str, dict[str, int]] = defaultdict(dict)
    for r in rows:
        states[r["marketplace"]][r["state"]] = int(r["n"])
    failures = await pool.fetch(
        """
        SELECT customer_id, dimension, state, coalesce(last_error, '') AS reason FROM ledger
         WHERE period = $1 AND state IN ('rejected', 'failed', 'submitted', 'pending', 'duplicate')
           AND last_error IS NOT NULL
         ORDER BY customer_id, dimension LIMIT $2
        """,
        period.start,
        failures_limit,
    )
    by_marketplace: dict[str, MarketplaceCustomers] = defaultdict(MarketplaceCustomers)
    for c in customers:
        counts = by_marketplace[c["marketplace"]]
        counts.customers += 1
        if c["billed"]:
            counts.billed += 1
        else:
            counts.missing.append(c["id"])
    return PeriodReport(
        period=period.isoformat(),
        customers=len(customers),
        billed=sum(1 for c in customers if c["billed"]),
        unbilled=[c["id"] for c in customers if not c["billed"]],
        states=dict(states),
        failures=[dict(f) for f in failures],
        marketplaces=dict(by_marketplace),
    )


# --- billing status -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """The hour's billing run (one per hour, however often it was triggered)."""

    run_id: str
    attempts: int
    dispatched: int
    started_at: str
    dispatched_at: str | None  # None: no dispatcher has finished sending the hour


@dataclass(frozen=True)
class Problem:
    """One reason an hour is not clean; ``blocking`` ones make ``billing status`` fail."""

    kind: str  # missing, rejected, failed, submitted, pending, duplicate
    marketplace: str
    customer_id: str
    dimension: str | None
    reason: str
    blocking: bool
    quantity: int | None = None

    def line(self) -> str:
        what = self.customer_id + (f" {self.dimension}" if self.dimension else "")
        quantity = f" (quantity {self.quantity})" if self.quantity is not None else ""
        return f"{self.kind:<9} {self.marketplace:<5} {what}{quantity}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "marketplace": self.marketplace,
            "customer_id": self.customer_id,
            "dimension": self.dimension,
            "quantity": self.quantity,
            "reason": self.reason,
            "blocking": self.blocking,
        }


@dataclass
class PeriodStatus:
    report: PeriodReport
    run: RunInfo | None
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        """Every billable customer has a complete ledger and no record failed or was rejected."""
        return not self.report.unbilled and not any(p.blocking for p in self.problems)

    def as_dict(self) -> dict[str, Any]:
        r = self.report
        names = sorted(set(r.marketplaces) | set(r.states))
        return {
            "period": r.period,
            "ok": self.ok,
            "run": None if self.run is None else vars(self.run),
            "customers": r.customers,
            "billed": r.billed,
            "missing": r.unbilled,
            "marketplaces": {
                m: {
                    "customers": r.marketplaces.get(m, MarketplaceCustomers()).customers,
                    "billed": r.marketplaces.get(m, MarketplaceCustomers()).billed,
                    "missing": r.marketplaces.get(m, MarketplaceCustomers()).missing,
                    "states": {s.value: r.count(s, m) for s in LedgerState if r.count(s, m)},
                }
                for m in names
            },
            "problems": [p.as_dict() for p in self.problems],
        }


_ATTENTION = ["rejected", "failed", "submitted", "pending"]


async def period_status(pool: asyncpg.Pool, period: Period) -> PeriodStatus:
    """The period report plus its billing run and one problem per missing customer or bad record."""
    report = await period_report(pool, period)
    run_row = await pool.fetchrow(
        "SELECT id, attempts, dispatched, started_at, dispatched_at FROM billing_runs WHERE period = $1",
        period.start,
    )
    run = None
    if run_row is not None:
        run = RunInfo(
            run_id=str(run_row["id"]),
            attempts=int(run_row["attempts"]),
            dispatched=int(run_row["dispatched"]),
            started_at=_iso(run_row["started_at"]),
            dispatched_at=_iso(run_row["dispatched_at"]) if run_row["dispatched_at"] else None,
        )
    records = await pool.fetch(
        """
        SELECT c.marketplace, l.customer_id, l.dimension, l.state, l.quantity, l.last_error, l.attempts,
               l.lease_until > now() AS leased
          FROM ledger l JOIN customers c ON c.id = l.customer_id
         WHERE l.period = $1
           AND (l.state = ANY($2::text[]) OR (l.state = 'duplicate' AND l.last_error IS NOT NULL))
         ORDER BY l.customer_id, l.dimension
        """,
        period.start,
        _ATTENTION,
    )
    with_records = {r["customer_id"] for r in records}
    problems: list[Problem] = []
    for marketplace, counts in sorted(report.marketplaces.items()):
        problems += [
            Problem("missing", marketplace, c, None, _missing_reason(run), blocking=True)
            for c in counts.missing
            if c not in with_records
        ]
    problems += [_record_problem(r) for r in records]
    problems.sort(key=lambda p: (not p.blocking, p.customer_id, p.dimension or ""))
    return PeriodStatus(report, run, problems)


def _missing_reason(run: RunInfo | None) -> str:
    if run is None:
        return "no ledger record: the hour was never dispatched (no billing run; `billing run --period`)"
    if run.dispatched_at is None:
        return f"no ledger record: the dispatcher has not finished the hour (attempt {run.attempts})"
    return (
        "no ledger record: dispatched but never billed; its message is still in the billing queue "
        "or in the dead-letter queue (`billing redrive`), or was lost (`billing run --period HOUR "
        "--resend-unbilled`)"
    )


def _record_problem(r: Mapping[str, Any]) -> Problem:
    state = LedgerState(r["state"])
    error = r["last_error"]
    if state is LedgerState.REJECTED:
        reason = f"rejected by the marketplace: {error or 'no reason recorded'} (not retried)"
    elif state is LedgerState.FAILED:
        reason = (
            f"failed after {r['attempts']} attempt(s): {error or 'no reason recorded'}; SQS redelivers "
            "it, or it is in the dead-letter queue (`billing redrive`)"
        )
    elif state is LedgerState.SUBMITTED:
        answer = f"last answer: {error}" if error else "no answer recorded"
        holder = "a delivery is submitting it now" if r["leased"] else "the submitting delivery stopped"
        reason = f"submitted, not confirmed ({answer}; {holder})"
    elif state is LedgerState.PENDING:
        reason = "decided, not yet submitted"
    else:
        reason = f"{error}: the marketplace already held a record for the hour (counted as billed)"
    return Problem(
        kind=state.value,
        marketplace=r["marketplace"],
        customer_id=r["customer_id"],
        dimension=r["dimension"],
        reason=reason,
        blocking=state is not LedgerState.DUPLICATE,
        quantity=int(r["quantity"]),
    )


# --- billing reconcile ----------------------------------------------------------------------------

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
class _ScopeCustomer:
    id: str
    marketplace: Marketplace
    status: str
    active_from: datetime
    active_until: datetime | None


async def reconcile(
    pool: asyncpg.Pool,
    usage: UsageSource,
    start: Period,
    end: Period,
    *,
    lookback_hours: int,
    settle: timedelta,
    now: datetime,
    usage_source: str = "postgres",
    customer: str | None = None,
    concurrency: int = 4,
    progress: Callable[[str, int], AbstractContextManager[Callable[[int], Any]]] | None = None,
) -> Reconciliation:
    """Reconcile the hours ``start`` .. ``end`` (both included) for every customer billable or billed."""
    from billing.adapters.postgres import PostgresBillingRepository

    if end < start:
        raise ValueError(f"the range ends ({end}) before it starts ({start})")
    customers = await _scope_customers(pool, start, end, customer)
    ids = [c.id for c in customers]
    card = await PostgresBillingRepository(pool).rate_card()
    with progress("reading usage", len(customers)) if progress else nullcontext(None) as advance:
        source = await _source_usage(usage, customers, card, start, end, concurrency, advance)
    observed = await _observations(pool, ids, start, end)
    rows = await _ledger_walk(pool, ids, start, end)
    balances = await _pair_amounts(pool, _BALANCES, ids)
    all_rated = await _pair_amounts(pool, _ALL_RATED, ids)
    all_observed = await _pair_amounts(pool, _ALL_OBSERVED, ids)
    last_decided = {
        r["customer_id"]: r["last"]
        for r in await pool.fetch(
            "SELECT customer_id, max(period) AS last FROM ledger"
            " WHERE customer_id = ANY($1::text[]) GROUP BY 1",
            ids,
        )
    }
    next_dispatch = Period.last_complete_before(now, settle).start
    lines = []
    for c in customers:
        dimensions = set(card.dimensions(c.marketplace))
        dimensions |= {d for (cid, d) in source if cid == c.id}
        dimensions |= {d for (cid, d) in observed if cid == c.id}
        dimensions |= {d for (cid, d) in rows if cid == c.id}
        # the next hour billing will decide for the customer: late usage within its look-back is pending
        candidates = [next_dispatch, hour_floor(c.active_from)]
        if (last := last_decided.get(c.id)) is not None:
            candidates.append(last + HOUR)
        next_hour = max(candidates)
        billable_then = c.status == "active" and (c.active_until is None or c.active_until > next_hour)
        for dimension in sorted(dimensions):
            key = (c.id, dimension)
            line = reconcile_pair(
                customer_id=c.id,
                marketplace=c.marketplace.value,
                dimension=dimension,
                source=source.get(key, {}),
                observed=observed.get(key, {}),
                rows=rows.get(key, []),
                balance=balances.get(key),
                all_rated=all_rated.get(key, ZERO),
                all_observed=all_observed.get(key, ZERO),
                next_hour=next_hour if billable_then else None,
                lookback=timedelta(hours=lookback_hours),
            )
            if line.records or line.source or line.observed or line.differences:
                lines.append(line)
    return Reconciliation(start, end, usage_source, len(customers), lines)


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
    if r.state is LedgerState.EXPIRED and q:
        diffs.append(
            Difference(
                "expired",
                q,
                explained=True,
                reason=f"outside the marketplace's window: {r.quantity} unit(s) went back to the carry",
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


async def _scope_customers(
    pool: asyncpg.Pool, start: Period, end: Period, customer: str | None
) -> list[_ScopeCustomer]:
    rows = await pool.fetch(
        """
        SELECT c.id, c.marketplace, c.status, c.active_from, c.active_until FROM customers c
         WHERE ($3::text IS NULL OR c.id = $3)
           AND ((c.status = 'active' AND c.active_from < $2
                 AND (c.active_until IS NULL OR c.active_until > $1))
                OR EXISTS (SELECT 1 FROM ledger l
                            WHERE l.customer_id = c.id AND l.period >= $1 AND l.period < $2))
         ORDER BY c.id
        """,
        start.start,
        end.end,
        customer,
    )
    return [
        _ScopeCustomer(
            r["id"], Marketplace(r["marketplace"]), r["status"], r["active_from"], r["active_until"]
        )
        for r in rows
    ]


async def _source_usage(
    usage: UsageSource,
    customers: Sequence[_ScopeCustomer],
    card: RateCard,
    start: Period,
    end: Period,
    concurrency: int,
    progress: Callable[[int], Any] | None,
) -> dict[tuple[str, str], dict[datetime, Decimal]]:
    """Rated usage per (customer, dimension) and hour, read through the UsageSource port."""
    gate = asyncio.Semaphore(concurrency)
    found: dict[tuple[str, str], dict[datetime, Decimal]] = defaultdict(dict)

    async def one(c: _ScopeCustomer) -> None:
        async with gate:
            totals = await usage.hourly_usage(c.id, start.start, end.end)
        for (dimension, hour), quantity in rate_usage(totals, card.for_marketplace(c.marketplace)).items():
            found[(c.id, dimension)][hour] = quantity
        if progress is not None:
            progress(1)

    async with asyncio.TaskGroup() as group:
        for c in customers:
            group.create_task(one(c))
    return dict(found)


async def _observations(
    pool: asyncpg.Pool, ids: Sequence[str], start: Period, end: Period
) -> dict[tuple[str, str], dict[datetime, Decimal]]:
    rows = await pool.fetch(
        """
        SELECT customer_id, dimension, hour, rated FROM usage_observations
         WHERE customer_id = ANY($1::text[]) AND hour >= $2 AND hour < $3
        """,
        ids,
        start.start,
        end.end,
    )
    found: dict[tuple[str, str], dict[datetime, Decimal]] = defaultdict(dict)
    for r in rows:
        found[(r["customer_id"], r["dimension"])][r["hour"]] = Decimal(r["rated"])
    return dict(found)


# The rows the chain walk needs per (customer, dimension): every decision from the range's first to
# the first one after its last (decisions need not follow the hours' order: a redriven or backfilled
# hour is decided late), and every quantity an expiry gave back to the balance in that span.
_WALK = """
WITH r AS (
  SELECT customer_id, dimension, min(decided_at) AS first_at, max(decided_at) AS last_at
    FROM ledger
   WHERE customer_id = ANY($3::text[]) AND period >= $1 AND period < $2
   GROUP BY 1, 2
), n AS (
  SELECT r.*, (SELECT min(x.decided_at) FROM ledger x
                WHERE x.customer_id = r.customer_id AND x.dimension = r.dimension
                  AND x.decided_at > r.last_at) AS next_at
    FROM r
)
SELECT l.customer_id, l.dimension, l.period, l.quantity, l.state, l.rated, l.carry_in, l.carry_out,
       l.last_error, l.decided_at, l.updated_at, (l.period >= $1 AND l.period < $2) AS in_range
  FROM n JOIN ledger l ON l.customer_id = n.customer_id AND l.dimension = n.dimension
 WHERE l.decided_at BETWEEN n.first_at AND coalesce(n.next_at, n.last_at)
    OR (l.state = 'expired' AND l.quantity <> 0
        AND l.updated_at >= n.first_at AND l.updated_at < coalesce(n.next_at, 'infinity'))
"""


async def _ledger_walk(
    pool: asyncpg.Pool, ids: Sequence[str], start: Period, end: Period
) -> dict[tuple[str, str], list[LedgerRow]]:
    found: dict[tuple[str, str], list[LedgerRow]] = defaultdict(list)
    for r in await pool.fetch(_WALK, start.start, end.end, ids):
        found[(r["customer_id"], r["dimension"])].append(
            LedgerRow(
                customer_id=r["customer_id"],
                dimension=r["dimension"],
                period=r["period"],
                quantity=int(r["quantity"]),
                state=LedgerState(r["state"]),
                rated=Decimal(r["rated"]),
                carry_in=Decimal(r["carry_in"]),
                carry_out=Decimal(r["carry_out"]),
                last_error=r["last_error"],
                decided_at=r["decided_at"],
                updated_at=r["updated_at"],
                in_range=bool(r["in_range"]),
            )
        )
    return dict(found)


_BALANCES = "SELECT customer_id, dimension, carry AS amount FROM balances WHERE customer_id = ANY($1::text[])"
# all-time sums: every unit of usage billing observed must be accounted for by exactly one decision
_ALL_RATED = """
SELECT customer_id, dimension, sum(rated) AS amount FROM ledger
 WHERE customer_id = ANY($1::text[]) GROUP BY 1, 2
"""
_ALL_OBSERVED = """
SELECT customer_id, dimension, sum(rated) AS amount FROM usage_observations
 WHERE customer_id = ANY($1::text[]) GROUP BY 1, 2
"""


async def _pair_amounts(pool: asyncpg.Pool, query: str, ids: Sequence[str]) -> dict[tuple[str, str], Decimal]:
    rows = await pool.fetch(query, ids)
    return {(r["customer_id"], r["dimension"]): Decimal(r["amount"]) for r in rows}


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


def iter_lines(reconciliation: Reconciliation) -> Iterable[str]:
    """The human report: one block per customer and dimension with a difference."""
    r = reconciliation
    hours = int((r.end.end - r.start.start) / HOUR)
    yield (
        f"reconcile {r.start} to {r.end} ({hours} hour(s)): {r.customers} customer(s), "
        f"{len(r.lines)} customer-dimension(s) with usage or records"
    )
    yield (
        f"usage source: {r.usage_source}, read through the UsageSource port (an Elasticsearch source, "
        "BILLING_USAGE_SOURCE=elasticsearch, is reconciled the same way)"
    )
    yield "source = usage rated now with the rate card; billed = accepted + duplicate quantities"
    for line in r.lines:
        if not line.differences:
            continue
        yield (
            f"{line.customer_id} {line.dimension} ({line.marketplace}): source {num(line.source)}, "
            f"billed {line.billed}, carry {num(line.carry_in)} → {num(line.carry_out)}"
        )
        for d in line.differences:
            label = "explained" if d.explained else "UNEXPLAINED"
            at = f"{d.period} " if d.period else ""
            yield f"    {label:<11} {num(d.amount):>10}  {at}{d.kind}: {d.reason}"
    clean = sum(1 for line in r.lines if line.clean)
    verdict = "clean" if r.clean else f"{r.unexplained} unexplained difference(s)"
    yield f"{verdict}: {clean} of {len(r.lines)} customer-dimension(s) fully explained"
