"""What the ledger says: a period's counts and problems, and usage reconciled against the ledger.

The queries: ``period_report`` counts an hour (the runner prints it); ``period_status`` adds the
billing run and one readable reason per problem (``billing status``). The sums are
billing_local.accounting's, the printing billing_local.render's; a reconciliation (``billing
reconcile``) is computed by the Lambda layer's billing.services.reconcile, the same code the daily
auditor runs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from billing.domain.model import LedgerState, Period
from billing_local.accounting import SETTLED_STATES, HourQuantities, StateGroup, hour_quantities

if TYPE_CHECKING:
    from collections.abc import Mapping

    import asyncpg


# An expired record with no unit to bill: quantity 0 and, if never submitted (decided after the window,
# everything the hour rated put in the carry), nothing carried (carry_out <= carry_in: the hour rated
# nothing new, e.g. its usage was billed by a later hour's look-back, or a credit). Within the window it
# would have been sent as a zero or skipped: no money is deferred, so it counts as billed, and does not
# make a run exit 1. The same units hour_quantities counts as "expired" (billing_local.accounting).
EXPIRED_EMPTY = """
    (l.state = 'expired' AND l.quantity = 0 AND (l.attempts > 0 OR l.carry_out <= l.carry_in))
"""


@dataclass
class MarketplaceCustomers:
    """Billable customers of one marketplace in an hour, and which of them lack a complete ledger."""

    customers: int = 0
    billed: int = 0  # every record in a final state (rejected and expired included)
    missing: list[str] = field(default_factory=list)
    settled: int = 0  # every record held by the marketplace (accepted, duplicate) or with nothing to send


@dataclass
class PeriodReport:
    period: str
    customers: int  # billable in the hour
    billed: int  # every dimension in a final state
    unbilled: list[str] = field(default_factory=list)
    states: dict[str, dict[str, int]] = field(default_factory=dict)  # marketplace -> state -> records
    failures: list[dict[str, str]] = field(default_factory=list)
    marketplaces: dict[str, MarketplaceCustomers] = field(default_factory=dict)
    quantities: dict[str, HourQuantities] = field(default_factory=dict)  # marketplace -> units
    # marketplace -> state -> dimension -> quantity (the units each state's records hold)
    dimensions: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    settled: int = 0  # customers whose every record the marketplace holds (or had nothing to send)
    expired_empty: dict[str, int] = field(default_factory=dict)  # marketplace -> expired, no unit to bill

    def count(self, state: LedgerState, marketplace: str | None = None) -> int:
        groups = [self.states.get(marketplace, {})] if marketplace else list(self.states.values())
        return sum(g.get(state.value, 0) for g in groups)

    def not_billed(self) -> dict[LedgerState, int]:
        """Records per state, expired ones counted only when they held units to bill."""
        counts = {s: self.count(s) for s in LedgerState}
        counts[LedgerState.EXPIRED] -= sum(self.expired_empty.values())
        return counts


async def period_report(pool: asyncpg.Pool, period: Period, failures_limit: int = 50) -> PeriodReport:
    """Billable customers, how many have a complete ledger, and record counts per marketplace and state."""
    finals = [s.value for s in LedgerState if s.final]
    customers = await pool.fetch(
        """
        SELECT c.id, c.marketplace,
               EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = $1)
               AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = $1
                                  AND NOT (l.state = ANY($3::text[]))) AS billed,
               EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = $1)
               AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = $1
                                  AND NOT (l.state = ANY($4::text[]) OR """
        + EXPIRED_EMPTY
        + """)) AS settled
          FROM customers c
         WHERE c.status = 'active' AND c.active_from < $2 AND (c.active_until IS NULL OR c.active_until > $1)
         ORDER BY c.id
        """,
        period.start,
        period.end,
        finals,
        [s.value for s in SETTLED_STATES],
    )
    rows = await pool.fetch(
        """
        SELECT c.marketplace, l.state, l.dimension, l.attempts = 0 AS unsent, count(*) AS n,
               sum(l.quantity) AS quantity, sum(l.carry_in) AS carry_in, sum(l.carry_out) AS carry_out,
               count(*) FILTER (WHERE """
        + EXPIRED_EMPTY
        + """) AS empty
          FROM ledger l JOIN customers c ON c.id = l.customer_id
         WHERE l.period = $1 GROUP BY 1, 2, 3, 4
        """,
        period.start,
    )
    states: dict[str, dict[str, int]] = defaultdict(dict)
    groups: dict[str, list[StateGroup]] = defaultdict(list)
    dimensions: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    expired_empty: dict[str, int] = defaultdict(int)
    for r in rows:
        expired_empty[r["marketplace"]] += int(r["empty"])
        states[r["marketplace"]][r["state"]] = states[r["marketplace"]].get(r["state"], 0) + int(r["n"])
        per_dimension = dimensions[r["marketplace"]][r["state"]]
        per_dimension[r["dimension"]] = per_dimension.get(r["dimension"], 0) + int(r["quantity"])
        groups[r["marketplace"]].append(
            StateGroup(
                LedgerState(r["state"]), bool(r["unsent"]), int(r["quantity"]), r["carry_in"], r["carry_out"]
            )
        )
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
        if c["settled"]:
            counts.settled += 1
    return PeriodReport(
        period=period.isoformat(),
        customers=len(customers),
        billed=sum(1 for c in customers if c["billed"]),
        unbilled=[c["id"] for c in customers if not c["billed"]],
        states=dict(states),
        failures=[dict(f) for f in failures],
        marketplaces=dict(by_marketplace),
        quantities={m: hour_quantities(g) for m, g in groups.items()},
        dimensions={m: {s: dict(d) for s, d in by_state.items()} for m, by_state in dimensions.items()},
        settled=sum(1 for c in customers if c["settled"]),
        expired_empty={m: n for m, n in expired_empty.items() if n},
    )


# --- billing status -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """The hour's billing run (one per hour, however often it was triggered)."""

    run_id: str
    attempts: int
    dispatched: int  # messages the hour's dispatch sent
    started_at: str
    dispatched_at: str | None  # None: no dispatcher has finished sending the hour
    resent: int = 0  # messages sent again since (`billing run --resend-unbilled`), summed


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
        """
        SELECT id, attempts, dispatched, resent, started_at, dispatched_at FROM billing_runs
         WHERE period = $1
        """,
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
            resent=int(run_row["resent"]),
        )
    records = await pool.fetch(
        """
        SELECT c.marketplace, l.customer_id, l.dimension, l.state, l.quantity, l.last_error, l.attempts,
               l.lease_until > now() AS leased
          FROM ledger l JOIN customers c ON c.id = l.customer_id
         WHERE l.period = $1
           AND (l.state = ANY($2::text[]) OR (l.state = 'duplicate' AND l.last_error IS NOT NULL)
                -- expired, but some attempt may have been received: its quantity may be billed twice
                OR (l.state = 'expired' AND l.quantity <> 0
                    AND (l.unconfirmed OR l.refused_attempts < l.attempts)))
         ORDER BY l.customer_id, l.dimension
        """,
        period.start,
        _ATTENTION,
    )
    with_records = {r["customer_id"] for r in records}
    # the dispatch sends the customers billable when it runs: one written since was never sent
    # (both times are the database's own clock)
    after_dispatch: set[str] = set()
    if run_row is not None and run_row["dispatched_at"] is not None:
        after_dispatch = {
            r["id"]
            for r in await pool.fetch(
                "SELECT id FROM customers WHERE id = ANY($1::text[]) AND created_at > $2",
                report.unbilled,
                run_row["dispatched_at"],
            )
        }
    problems: list[Problem] = []
    for marketplace, counts in sorted(report.marketplaces.items()):
        problems += [
            Problem("missing", marketplace, c, None, _missing_reason(run, period, c in after_dispatch), True)
            for c in counts.missing
            if c not in with_records
        ]
    problems += [_record_problem(r) for r in records]
    problems.sort(key=lambda p: (not p.blocking, p.customer_id, p.dimension or ""))
    return PeriodStatus(report, run, problems)


def _missing_reason(run: RunInfo | None, period: Period, after_dispatch: bool) -> str:
    if run is None:
        return (
            "no ledger record: the hour was never dispatched (no billing run; "
            f"`billing run --period {period}`)"
        )
    if run.dispatched_at is None:
        return f"no ledger record: the dispatcher has not finished the hour (attempt {run.attempts})"
    if after_dispatch:
        return (
            "no ledger record: not in the hour's dispatch (billable since it ran): "
            f"`billing run --period {period} --resend-unbilled`"
        )
    return (
        "no ledger record: dispatched but never billed; its message is still in the billing queue "
        f"or in the dead-letter queue (`billing redrive`), or was lost (`billing run --period {period} "
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
    elif state is LedgerState.EXPIRED:
        reason = (
            "settled as outside the marketplace's window and carried to a later hour, but a submission of "
            "it got no answer proving a refusal: the marketplace may have received it (billed twice?); "
            "check its records"
        )
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


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
