"""An hour's units as the run and demo summaries print them (billing_local.accounting), by hand-made sums."""

from __future__ import annotations

from decimal import Decimal as D

from billing.domain.model import LedgerState as S
from billing_local.accounting import HourQuantities, StateGroup, hour_quantities


def test_billed_units_are_accepted_and_duplicate_quantities_and_the_carry_is_every_carry_out() -> None:
    groups = [
        StateGroup(S.ACCEPTED, False, 40, D("0.25"), D("0.5")),
        StateGroup(S.DUPLICATE, False, 2, D(0), D("0.1")),
        StateGroup(S.SKIPPED, False, 0, D("0.3"), D("0.3")),
    ]
    assert hour_quantities(groups) == HourQuantities(billed=42, expired=D(0), carried=D("0.9"), unsettled=0)


def test_an_hour_decided_after_its_window_expires_what_it_rated_into_the_carry() -> None:
    # never submitted, quantity 0: carry_in 0.5 grew by the hour's 12.25 rated units
    groups = [StateGroup(S.EXPIRED, True, 0, D("0.5"), D("12.75"))]
    assert hour_quantities(groups) == HourQuantities(
        billed=0, expired=D("12.25"), carried=D("12.75"), unsettled=0
    )


def test_a_refused_hour_settled_as_expired_returns_its_quantity_to_the_carry() -> None:
    # submitted, every attempt refused, then the window closed: its 7 units go back to the balance,
    # which the ledger row's carry_out (0.4, the remainder at decision) does not show
    groups = [StateGroup(S.EXPIRED, False, 7, D("0.1"), D("0.4"))]
    assert hour_quantities(groups) == HourQuantities(billed=0, expired=D(7), carried=D("7.4"), unsettled=0)


def test_rejected_failed_and_unfinished_quantities_are_not_billed_but_unsettled() -> None:
    groups = [
        StateGroup(S.REJECTED, False, 3, D(0), D(0)),
        StateGroup(S.FAILED, False, 4, D(0), D(0)),
        StateGroup(S.SUBMITTED, False, 5, D(0), D(0)),
        StateGroup(S.PENDING, True, 6, D(0), D(0)),
        StateGroup(S.ACCEPTED, False, 1, D(0), D(0)),
    ]
    assert hour_quantities(groups) == HourQuantities(billed=1, expired=D(0), carried=D(0), unsettled=18)


def test_no_rows_no_units() -> None:
    assert hour_quantities([]) == HourQuantities(billed=0, expired=D(0), carried=D(0), unsettled=0)


def test_a_run_fails_on_rejected_failed_and_expired_records_and_only_rejected_can_be_allowed() -> None:
    from billing_local.accounting import run_failures

    counts = {S.ACCEPTED: 9, S.DUPLICATE: 1, S.SKIPPED: 2, S.REJECTED: 3, S.FAILED: 4, S.EXPIRED: 5}
    assert run_failures(counts, allow_rejected=False) == {S.REJECTED: 3, S.FAILED: 4, S.EXPIRED: 5}
    assert run_failures(counts, allow_rejected=True) == {S.FAILED: 4, S.EXPIRED: 5}
    assert run_failures({S.ACCEPTED: 9, S.SKIPPED: 2, S.REJECTED: 0}, allow_rejected=False) == {}
