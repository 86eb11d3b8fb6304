"""What a period's ledger says: per-marketplace counts and the customers not yet billed."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from billing.domain.model import LedgerState

if TYPE_CHECKING:
    import asyncpg

    from billing.domain.model import Period


@dataclass
class PeriodReport:
    period: str
    customers: int  # billable in the hour
    billed: int  # every dimension in a final state
    unbilled: list[str] = field(default_factory=list)
    states: dict[str, dict[str, int]] = field(default_factory=dict)  # marketplace -> state -> records
    failures: list[dict[str, str]] = field(default_factory=list)

    def count(self, state: LedgerState, marketplace: str | None = None) -> int:
        groups = [self.states.get(marketplace, {})] if marketplace else list(self.states.values())
        return sum(g.get(state.value, 0) for g in groups)


async def period_report(pool: asyncpg.Pool, period: Period, failures_limit: int = 50) -> PeriodReport:
    finals = [s.value for s in LedgerState if s.final]
    customers = await pool.fetch(
        """
        SELECT c.id,
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
    return PeriodReport(
        period=period.isoformat(),
        customers=len(customers),
        billed=sum(1 for c in customers if c["billed"]),
        unbilled=[c["id"] for c in customers if not c["billed"]],
        states=dict(states),
        failures=[dict(f) for f in failures],
    )
