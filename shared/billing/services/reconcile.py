"""Reconcile usage with the ledger over a range of hours: ``billing reconcile`` and the daily auditor.

Reads through two ports (ReconcileReader for the ledger, UsageSource for the usage, rated now with the
rate card in exact decimals); the accounting is billing.domain.reconciliation, pure Python.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from billing.domain.model import HOUR, Period, hour_floor
from billing.domain.rating import rate_usage_by_plan
from billing.domain.reconciliation import ZERO, Reconciliation, reconcile_pair

if TYPE_CHECKING:
    from collections.abc import Sequence
    from decimal import Decimal

    from billing.domain.model import RateCard
    from billing.domain.reconciliation import ScopeCustomer
    from billing.ports import ReconcileReader, UsageSource

Usage = dict[tuple[str, str], dict[datetime, "Decimal"]]
Progress = Callable[[str, int], AbstractContextManager[Callable[[int], Any]]]


async def reconcile(
    reader: ReconcileReader,
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
    progress: Progress | None = None,
) -> Reconciliation:
    """Reconcile the hours ``start`` .. ``end`` (both included) for every customer billable or billed.

    ``now`` is the caller's clock (the CLI's, or the auditor's scheduled time): it says which hour billing
    decides next, so late usage within that hour's look-back is pending, not lost.
    """
    if end < start:
        raise ValueError(f"the range ends ({end}) before it starts ({start})")
    customers = await reader.scope_customers(start, end, customer)
    ids = [c.id for c in customers]
    card = await reader.rate_card()
    with progress("reading usage", len(customers)) if progress else nullcontext(None) as advance:
        source, after_end = await _source_usage(usage, customers, card, start, end, concurrency, advance)
    observed = await reader.observations(ids, start, end)
    rows = await reader.ledger_walk(ids, start, end)
    balances = await reader.balances(ids)
    all_rated = await reader.all_rated(ids)
    all_observed = await reader.all_observed(ids)
    last_decided = await reader.last_decided(ids)
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
                after_end=after_end.get(key, {}),
                ended_at=c.active_until,
            )
            if line.records or line.source or line.observed or line.differences:
                lines.append(line)
    return Reconciliation(start, end, usage_source, len(customers), lines)


async def _source_usage(
    usage: UsageSource,
    customers: Sequence[ScopeCustomer],
    card: RateCard,
    start: Period,
    end: Period,
    concurrency: int,
    progress: Callable[[int], Any] | None,
) -> tuple[Usage, Usage]:
    """Rated usage per (customer, dimension) and hour, read through the UsageSource port: what billing
    may bill (up to a customer's end, ``active_until``), and what was recorded after that end (#13:
    unbillable, never sent; reported)."""
    gate = asyncio.Semaphore(concurrency)
    found: Usage = defaultdict(dict)
    after: Usage = defaultdict(dict)

    async def one(c: ScopeCustomer) -> None:
        stop = end.end if c.active_until is None else max(start.start, min(end.end, c.active_until))
        async with gate:
            totals = await usage.hourly_usage(c.id, start.start, stop)
            late = await usage.hourly_usage(c.id, stop, end.end) if stop < end.end else []
        for (dimension, hour), quantity in rate_usage_by_plan(totals, card, c.marketplace, c.plans).items():
            found[(c.id, dimension)][hour] = quantity
        for (dimension, hour), quantity in rate_usage_by_plan(late, card, c.marketplace, c.plans).items():
            after[(c.id, dimension)][hour] = quantity
        if progress is not None:
            progress(1)

    async with asyncio.TaskGroup() as group:
        for c in customers:
            group.create_task(one(c))
    return dict(found), dict(after)
