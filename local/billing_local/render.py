"""What the local commands print: an hour's summary and JSON report, and a reconciliation."""

from __future__ import annotations

import math
import statistics
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from billing.domain.model import HOUR, LedgerState
from billing.domain.reconciliation import num

if TYPE_CHECKING:
    from collections.abc import Iterable

    from billing.domain.reconciliation import Reconciliation
    from billing_local.local_run import HourResult
    from billing_local.report import PeriodReport
    from billing_local.runner import RunnerStats

FOOTNOTE = (
    "billed: every record of the customer accepted or duplicate (the marketplace holds it), skipped, or "
    "expired with no unit to bill",
    "skipped: nothing to send (a zero quantity the marketplace does not want)",
    "expired: the hour was past the marketplace's window; its units went back to the carry for a later hour",
    "rejected: refused for good, not retried; failed: not settled yet (retried, or in the dead-letter queue)",
)


def hour_lines(r: PeriodReport) -> Iterable[str]:
    """Per marketplace: customers, records and units in every ledger state, and units carried."""
    not_billed = r.billed - r.settled
    yield (
        f"customers: {r.customers} billable, {r.settled} billed, {not_billed} finished not billed "
        f"(a record rejected or expired), {len(r.unbilled)} unfinished"
    )
    for marketplace in sorted(set(r.marketplaces) | set(r.states)):
        customers = r.marketplaces.get(marketplace)
        if customers is not None:
            yield (
                f"  {marketplace}: customers {customers.customers} billable, {customers.settled} billed, "
                f"{customers.billed - customers.settled} finished not billed, "
                f"{len(customers.missing)} unfinished"
            )
        else:
            yield f"  {marketplace}: customers 0 billable"
        dimensions = r.dimensions.get(marketplace, {})
        for state in LedgerState:
            n = r.count(state, marketplace)
            if not n and state not in SHOWN_STATES:
                continue  # pending and submitted: only while a run is in flight
            units = ", ".join(f"{d} {q}" for d, q in sorted(dimensions.get(state.value, {}).items()))
            empty = r.expired_empty.get(marketplace, 0) if state is LedgerState.EXPIRED else 0
            yield (
                f"    {state.value:<9} {n:>6} record(s)"
                + (f": {units}" if units else "")
                + (f" ({empty} with no unit to bill)" if empty else "")
            )
        q = r.quantities.get(marketplace)
        if q is not None:
            yield (
                f"    units: {q.billed} billed, {num(q.expired)} expired (back to the carry), "
                f"{num(q.carried)} carried to later hours"
            )
    yield from FOOTNOTE


# every state a record can end in, shown even at 0 so that a reader sees what did not happen too
SHOWN_STATES = (
    LedgerState.ACCEPTED,
    LedgerState.DUPLICATE,
    LedgerState.REJECTED,
    LedgerState.FAILED,
    LedgerState.EXPIRED,
    LedgerState.SKIPPED,
)


def iter_lines(reconciliation: Reconciliation, limit: int | None = None) -> Iterable[str]:
    """The human report: totals first, then one block per customer and dimension with a difference,
    unexplained ones first, at most ``limit`` blocks (None: all)."""
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
    different = [line for line in r.lines if line.differences]
    explained = sum(1 for line in different for d in line.differences if d.explained)
    yield (
        f"totals: source {num(sum((line.source for line in r.lines), Decimal(0)))}, "
        f"billed {sum(line.billed for line in r.lines)}; "
        f"{r.unexplained + explained} difference(s) in {len(different)} customer-dimension(s): "
        f"{r.unexplained} unexplained, {explained} explained"
    )
    different.sort(key=lambda line: not line.unexplained)  # stable: unexplained first, then as listed
    shown = different if limit is None else different[:limit]
    told: set[str] = set()  # a reason is written out once; the same one again is named by its kind
    for line in shown:
        yield (
            f"{line.customer_id} {line.dimension} ({line.marketplace}): source {num(line.source)}, "
            f"billed {line.billed}, carry {num(line.carry_in)} → {num(line.carry_out)}"
        )
        for d in line.differences:
            label = "explained" if d.explained else "UNEXPLAINED"
            at = f"{d.period} " if d.period else ""
            why = f"{d.kind}: {d.reason}" if d.reason not in told else f"{d.kind} (as above)"
            told.add(d.reason)
            yield f"    {label:<11} {num(d.amount):>10}  {at}{why}"
    if len(shown) < len(different):
        yield (
            f"... {len(different) - len(shown)} more customer-dimension(s) with a difference "
            "(--limit N to show more, --json for all)"
        )
    clean = sum(1 for line in r.lines if line.clean)
    verdict = "clean" if r.clean else f"{r.unexplained} unexplained difference(s)"
    yield f"{verdict}: {clean} of {len(r.lines)} customer-dimension(s) fully explained"


def hour_document(result: HourResult, wall_s: float | None = None) -> dict[str, Any]:
    """The JSON report of a run (`--report FILE.json`): what the summary prints, run id, timings."""
    r = result.report
    return {
        "period": r.period,
        "run_id": str(result.dispatch.run_id),
        "wall_time_s": None if wall_s is None else round(wall_s, 3),
        "customers": r.customers,
        "customer_hours": r.customers,
        "billed": r.settled,
        "finished_not_billed": r.billed - r.settled,
        "unbilled": r.unbilled,
        "marketplaces": {
            mp: {s.value: r.count(s, mp) for s in SHOWN_STATES}
            | {
                "customers": _customers(r, mp),
                "quantities": {s.value: r.dimensions.get(mp, {}).get(s.value, {}) for s in SHOWN_STATES},
                "expired_no_unit_to_bill": r.expired_empty.get(mp, 0),
            }
            | _units(r, mp)
            for mp in sorted(set(r.states) | set(r.marketplaces))
        },
        "footnote": list(FOOTNOTE),
        "invocations": result.stats.invocations,
        "concurrency": result.concurrency,
        "makespan_s": round(result.stats.makespan, 4),
        "ideal_makespan_s": _ideal_makespan(result),
        **_duration_ratios(result.stats),
    }


def _customers(r: PeriodReport, marketplace: str) -> dict[str, int]:
    c = r.marketplaces.get(marketplace)
    if c is None:
        return {"billable": 0, "billed": 0, "finished_not_billed": 0, "unfinished": 0}
    return {
        "billable": c.customers,
        "billed": c.settled,
        "finished_not_billed": c.billed - c.settled,
        "unfinished": len(c.missing),
    }


def _units(r: PeriodReport, marketplace: str) -> dict[str, Any]:
    q = r.quantities.get(marketplace)
    if q is None:
        return {}
    return {"units_billed": q.billed, "units_expired": str(q.expired), "units_carried": str(q.carried)}


def _ideal_makespan(result: HourResult) -> float | None:
    """ceil(customers / consumers) × the marketplace's latency per call, when that latency is known."""
    if not result.latency_s or not result.concurrency:
        return None
    return round(math.ceil(result.dispatch.dispatched / result.concurrency) * result.latency_s, 4)


def _duration_ratios(stats: RunnerStats) -> dict[str, float | None]:
    """Each invocation's recorded duration over its own work (the time inside the biller's code).

    The recorded duration is the APM transaction's when the run captured APM events, else the runner's
    own measure of the invocation. 1.0 means no transaction holds another message's wait.
    """
    from billing_local.apm_capture import CAPTURE

    recorded = {
        t["faas"]["trigger"]["request_id"]: t["duration"] / 1000
        for t in CAPTURE.of_type("transaction")
        if t.get("type") == "messaging" and t.get("faas", {}).get("trigger", {}).get("request_id")
    }
    ratios = sorted(
        recorded.get(message_id, duration) / work
        for message_id, duration, work in zip(stats.message_ids, stats.durations, stats.work, strict=True)
        if work > 0
    )
    if not ratios:
        return {"duration_ratio_p50": None, "duration_ratio_p99": None}
    return {
        "duration_ratio_p50": round(statistics.median(ratios), 4),
        "duration_ratio_p99": round(ratios[min(len(ratios) - 1, math.ceil(0.99 * len(ratios)) - 1)], 4),
    }
