"""PostgreSQL reads of the reconciliation (asyncpg): one method per query, domain types out."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import TYPE_CHECKING

from billing.adapters.postgres import Statement, plan_spans
from billing.domain.model import CustomerStatus, LedgerState, Marketplace
from billing.domain.reconciliation import LedgerRow, ScopeCustomer

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    import asyncpg

    from billing.domain.model import Period, RateCard

PairAmounts = dict[tuple[str, str], Decimal]
PairHours = dict[tuple[str, str], dict["datetime", Decimal]]

_SCOPE = Statement.of("""
SELECT c.id, c.marketplace, c.status, c.active_from, c.active_until,
       (SELECT s.plans FROM subscription_state s WHERE s.customer_id = c.id) AS plans
  FROM customers c
 WHERE (:customer::text IS NULL OR c.id = :customer)
   AND ((c.status = :active AND c.active_from < :end
         AND (c.active_until IS NULL OR c.active_until > :start))
        OR EXISTS (SELECT 1 FROM ledger l
                    WHERE l.customer_id = c.id AND l.period >= :start AND l.period < :end)
        -- ended before the range's end: usage recorded after the end is reported (unbillable after end)
        OR (c.active_until IS NOT NULL AND c.active_until < :end))
 ORDER BY c.id
""")

_OBSERVATIONS = """
SELECT customer_id, dimension, hour, rated FROM usage_observations
 WHERE customer_id = ANY($1::text[]) AND hour >= $2 AND hour < $3
"""

# The rows the chain walk needs per (customer, dimension): every decision from the range's first to
# the first one after its last (decisions need not follow the hours' order: a redriven or backfilled
# hour is decided late), and every quantity an expiry gave back to the balance in that span.
_WALK = Statement.of("""
WITH r AS (
  SELECT customer_id, dimension, min(decided_at) AS first_at, max(decided_at) AS last_at
    FROM ledger
   WHERE customer_id = ANY(:ids::text[]) AND period >= :start AND period < :end
   GROUP BY 1, 2
), n AS (
  SELECT r.*, (SELECT min(x.decided_at) FROM ledger x
                WHERE x.customer_id = r.customer_id AND x.dimension = r.dimension
                  AND x.decided_at > r.last_at) AS next_at
    FROM r
)
SELECT l.customer_id, l.dimension, l.period, l.quantity, l.state, l.rated, l.carry_in, l.carry_out,
       l.last_error, l.decided_at, l.updated_at, (l.period >= :start AND l.period < :end) AS in_range,
       l.attempts, l.refused_attempts, l.unconfirmed
  FROM n JOIN ledger l ON l.customer_id = n.customer_id AND l.dimension = n.dimension
 WHERE l.decided_at BETWEEN n.first_at AND coalesce(n.next_at, n.last_at)
    OR (l.state = :state_expired AND l.quantity <> 0
        AND l.updated_at >= n.first_at AND l.updated_at < coalesce(n.next_at, 'infinity'))
""")

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
_LAST_DECIDED = """
SELECT customer_id, max(period) AS last FROM ledger WHERE customer_id = ANY($1::text[]) GROUP BY 1
"""


class PostgresReconcileReader:
    """What the reconciliation reads from the ledger and the customers (satisfies ReconcileReader)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def rate_card(self) -> RateCard:
        from billing.adapters.postgres import PostgresBillingRepository

        return await PostgresBillingRepository(self._pool).rate_card()

    async def scope_customers(self, start: Period, end: Period, customer: str | None) -> list[ScopeCustomer]:
        """Customers billable in the hours ``start`` .. ``end``, or with ledger rows in them."""
        active = CustomerStatus.ACTIVE.value
        args = _SCOPE.args(start=start.start, end=end.end, customer=customer, active=active)
        rows = await self._pool.fetch(_SCOPE.text, *args)
        return [
            ScopeCustomer(
                r["id"],
                Marketplace(r["marketplace"]),
                r["status"],
                r["active_from"],
                r["active_until"],
                plan_spans(r["plans"]),
            )
            for r in rows
        ]

    async def observations(self, ids: Sequence[str], start: Period, end: Period) -> PairHours:
        """What billing observed of each hour's usage, per (customer, dimension) and hour."""
        found: PairHours = defaultdict(dict)
        for r in await self._pool.fetch(_OBSERVATIONS, ids, start.start, end.end):
            found[(r["customer_id"], r["dimension"])][r["hour"]] = Decimal(r["rated"])
        return dict(found)

    async def ledger_walk(
        self, ids: Sequence[str], start: Period, end: Period
    ) -> dict[tuple[str, str], list[LedgerRow]]:
        """The ledger rows the carry-chain walk needs (see _WALK), per (customer, dimension)."""
        found: dict[tuple[str, str], list[LedgerRow]] = defaultdict(list)
        for r in await self._pool.fetch(_WALK.text, *_WALK.args(start=start.start, end=end.end, ids=ids)):
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
                    attempts=int(r["attempts"]),
                    refused_attempts=int(r["refused_attempts"]),
                    unconfirmed=bool(r["unconfirmed"]),
                )
            )
        return dict(found)

    async def balances(self, ids: Sequence[str]) -> PairAmounts:
        return await self._pair_amounts(_BALANCES, ids)

    async def all_rated(self, ids: Sequence[str]) -> PairAmounts:
        return await self._pair_amounts(_ALL_RATED, ids)

    async def all_observed(self, ids: Sequence[str]) -> PairAmounts:
        return await self._pair_amounts(_ALL_OBSERVED, ids)

    async def last_decided(self, ids: Sequence[str]) -> dict[str, datetime]:
        """Each customer's latest decided hour."""
        return {r["customer_id"]: r["last"] for r in await self._pool.fetch(_LAST_DECIDED, ids)}

    async def _pair_amounts(self, query: str, ids: Sequence[str]) -> PairAmounts:
        rows = await self._pool.fetch(query, ids)
        return {(r["customer_id"], r["dimension"]): Decimal(r["amount"]) for r in rows}
