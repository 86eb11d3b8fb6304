"""What the local commands print: an hour's summary and a reconciliation, as lines of text."""

from __future__ import annotations

from typing import TYPE_CHECKING

from billing.domain.model import HOUR, LedgerState
from billing.domain.reconciliation import num

if TYPE_CHECKING:
    from collections.abc import Iterable

    from billing.domain.reconciliation import Reconciliation
    from billing_local.report import PeriodReport

# always shown, even at 0: what a reader looks for first (was it billed, did the window close?)
_ALWAYS = (LedgerState.ACCEPTED, LedgerState.EXPIRED)


def hour_lines(r: PeriodReport) -> Iterable[str]:
    """Per marketplace: customers, records per ledger state, and units billed, expired and carried."""
    yield f"customers: {r.customers} billable, {r.billed} billed, {len(r.unbilled)} unbilled"
    for marketplace in sorted(set(r.marketplaces) | set(r.states)):
        customers = r.marketplaces.get(marketplace)
        if customers is not None:
            yield (
                f"  {marketplace}: customers {customers.customers} billable, {customers.billed} billed, "
                f"{len(customers.missing)} unbilled"
            )
        else:
            yield f"  {marketplace}: customers 0 billable"
        states = ", ".join(
            f"{s.value} {r.count(s, marketplace)}"
            for s in LedgerState
            if s in _ALWAYS or r.count(s, marketplace)
        )
        yield f"    records: {states}"
        q = r.quantities.get(marketplace)
        if q is not None:
            unsettled = f", {q.unsettled} not held (rejected, failed or unsettled)" if q.unsettled else ""
            yield (
                f"    units: {q.billed} billed, {num(q.expired)} expired (back to the carry), "
                f"{num(q.carried)} carried to later hours{unsettled}"
            )


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
