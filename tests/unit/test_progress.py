"""Billing progress counts customer-hours finished, not invocations (billing_local.progress)."""

from __future__ import annotations

from datetime import UTC, datetime

from billing.domain.model import BillOutcome, Marketplace, Period
from billing_local.progress import SettledProgress
from billing_local.runner import RunnerStats

HOUR = Period(datetime(2026, 11, 26, 13, tzinfo=UTC))


def succeed(stats: RunnerStats, customer: str, requeued: bool = False) -> None:
    """What the runner's consumer records for an invocation that returned (runner.drain)."""
    stats.invocations += 1
    stats.succeeded += 1
    stats.outcomes.append(BillOutcome(customer, HOUR, Marketplace.AWS, requeued=requeued))


def fail(stats: RunnerStats) -> None:
    stats.invocations += 1
    stats.failed += 1


def test_only_each_customer_hours_first_finish_advances_whatever_the_lane() -> None:
    advanced: list[int] = []
    progress = SettledProgress(advanced.append)
    aws, gcp = RunnerStats(), RunnerStats()
    steps = [
        (aws, lambda: succeed(aws, "a1")),  # billed: +1
        (aws, lambda: fail(aws)),  # failed, its message comes back: nothing
        (aws, lambda: succeed(aws, "a1")),  # a redelivered duplicate of a finished customer: nothing
        (gcp, lambda: succeed(gcp, "g1", requeued=True)),  # throttled, a copy waits in the lane: nothing
        (gcp, lambda: succeed(gcp, "g1")),  # its copy billed: +1
        (aws, lambda: succeed(aws, "a2")),  # +1
    ]
    for stats, step in steps:
        step()
        progress(stats)
    assert sum(advanced) == 3 == len(progress.settled)


def test_a_rerun_counts_only_the_customers_its_total_counted() -> None:
    # Given a rerun whose total is the hour's two unfinished customers (a1, a2)
    advanced: list[int] = []
    progress = SettledProgress(advanced.append, only={"a1", "a2"})
    stats = RunnerStats()
    # When a copy of a billed customer's message (a9, abandoned in flight by Ctrl-C) is billed as well
    for customer in ("a1", "a9", "a2"):
        succeed(stats, customer)
        progress(stats)
    # Then the count reaches the total and does not pass it
    assert sum(advanced) == 2
