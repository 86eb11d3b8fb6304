"""What the local commands print: an hour's summary and JSON report, and a reconciliation."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

from billing.domain.model import HOUR, LedgerState
from billing.domain.reconciliation import num

if TYPE_CHECKING:
    from collections.abc import Iterable

    from billing.domain.reconciliation import Reconciliation
    from billing_local.local_run import HourResult
    from billing_local.report import PeriodReport
    from billing_local.runner import RunnerStats

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


def hour_document(result: HourResult) -> dict[str, Any]:
    """The JSON report of a run (`--report FILE.json`): counts per marketplace and state, units, timings."""
    r = result.report
    return {
        "period": r.period,
        "customers": r.customers,
        "customer_hours": r.customers,
        "billed": r.billed,
        "unbilled": r.unbilled,
        "marketplaces": {
            mp: {
                s.value: r.count(s, mp)
                for s in (
                    LedgerState.ACCEPTED,
                    LedgerState.DUPLICATE,
                    LedgerState.REJECTED,
                    LedgerState.FAILED,
                    LedgerState.SKIPPED,
                    LedgerState.EXPIRED,
                )
            }
            | _units(r, mp)
            for mp in sorted(r.states)
        },
        "invocations": result.stats.invocations,
        "concurrency": result.concurrency,
        "makespan_s": round(result.stats.makespan, 4),
        "ideal_makespan_s": _ideal_makespan(result),
        **_duration_ratios(result.stats),
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
