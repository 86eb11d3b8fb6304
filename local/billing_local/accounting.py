"""Pure accounting of one hour's ledger for the local reports: no I/O, unit-tested on its own.

The reconciliation of usage against the ledger over a range (carries, credits, late usage across the
range's edges, expired quantities) is the Lambda layer's billing.domain.reconciliation, the same code
the daily auditor runs; this module only sums one hour's ledger rows as the run and demo summaries show
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from billing.domain.model import LedgerState

if TYPE_CHECKING:
    from collections.abc import Iterable


# "billed" in a summary: the marketplace holds the record, or there was nothing to send
SETTLED_STATES = frozenset({LedgerState.ACCEPTED, LedgerState.DUPLICATE, LedgerState.SKIPPED})
# a record in one of these states is money not collected (yet): a run that leaves one fails
UNSETTLED_OUTCOMES = (LedgerState.REJECTED, LedgerState.FAILED, LedgerState.EXPIRED)


def run_failures(counts: dict[LedgerState, int], allow_rejected: bool) -> dict[LedgerState, int]:
    """The record counts that make a run exit 1: rejected (unless allowed), failed and expired (the
    caller counts only expired records with units to bill: PeriodReport.not_billed)."""
    return {
        state: counts.get(state, 0)
        for state in UNSETTLED_OUTCOMES
        if counts.get(state, 0) and not (allow_rejected and state is LedgerState.REJECTED)
    }


@dataclass(frozen=True)
class StateGroup:
    """The sums of one marketplace's ledger rows of an hour in one state (never submitted apart)."""

    state: LedgerState
    unsent: bool  # no row of the group was ever submitted (attempts = 0)
    quantity: int
    carry_in: Decimal
    carry_out: Decimal


@dataclass(frozen=True)
class HourQuantities:
    """One marketplace's units of an hour, as the ledger decided them."""

    billed: int  # accepted or duplicate: the marketplace holds them
    expired: Decimal  # the hour's units that went back to the carry because its window had closed
    carried: Decimal  # the balance the hour leaves to later hours, expired units included
    unsettled: int  # decided but not (yet) held by the marketplace: pending, submitted, failed, rejected


def hour_quantities(groups: Iterable[StateGroup]) -> HourQuantities:
    """Sum an hour's ledger groups into billed, expired, carried and unsettled units.

    An hour decided after its window closed is recorded ``expired``, never submitted, with quantity 0
    and everything it rated in its carry (carry_out - carry_in is what it would have billed). A
    submitted hour whose every submission was refused and whose window then closed is settled
    ``expired`` keeping its quantity, which the biller adds back to the carried balance
    (billing.adapters.postgres ``_EXPIRE``): its ledger carry_out does not include it.
    """
    billed = 0
    unsettled = 0
    expired = Decimal(0)
    carried = Decimal(0)
    for g in groups:
        carried += g.carry_out
        if g.state.billed:
            billed += g.quantity
        elif g.state is LedgerState.EXPIRED:
            if g.unsent:
                expired += g.carry_out - g.carry_in
            else:
                expired += g.quantity
                carried += g.quantity
        elif g.state is not LedgerState.SKIPPED:
            unsettled += g.quantity
    return HourQuantities(billed=billed, expired=expired, carried=carried, unsettled=unsettled)
