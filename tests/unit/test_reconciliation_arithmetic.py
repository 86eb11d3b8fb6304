"""The reconciliation's arithmetic (billing.domain.reconciliation.reconcile_pair) on hand-made ledgers.

source − billed = pending late usage + late usage across the range's edges + carry movement + expired
quantities returned to the carry + rejected / unsettled quantities: every case checks which parts are
there, which are explained, and that the parts add up to source − billed exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

from billing.domain.model import LedgerState as S
from billing.domain.reconciliation import DimensionReconciliation, LedgerRow, reconcile_pair

H1 = datetime(2026, 11, 26, 10, tzinfo=UTC)
H2 = H1 + timedelta(hours=1)
H3 = H2 + timedelta(hours=1)
LOOKBACK = timedelta(hours=24)


def row(
    period: datetime,
    state: S,
    quantity: int,
    rated: str,
    carry_in: str,
    carry_out: str,
    *,
    in_range: bool = True,
    attempts: int = 1,
    refused: int = 0,
    expired_at: datetime | None = None,
) -> LedgerRow:
    decided = period + timedelta(minutes=20)
    return LedgerRow(
        customer_id="c1",
        dimension="d",
        period=period,
        quantity=quantity,
        state=state,
        rated=D(rated),
        carry_in=D(carry_in),
        carry_out=D(carry_out),
        last_error=None,
        decided_at=decided,
        updated_at=expired_at or decided,
        in_range=in_range,
        attempts=attempts,
        refused_attempts=refused,
    )


def pair(
    rows: list[LedgerRow],
    source: dict[datetime, str],
    observed: dict[datetime, str] | None = None,
    *,
    balance: str | None = None,
    all_rated: str | None = None,
    all_observed: str | None = None,
    next_hour: datetime | None = H3,
) -> DimensionReconciliation:
    src = {h: D(v) for h, v in source.items()}
    obs = {h: D(v) for h, v in (observed if observed is not None else source).items()}
    rated = sum((r.rated for r in rows), D(0))
    return reconcile_pair(
        customer_id="c1",
        marketplace="aws",
        dimension="d",
        source=src,
        observed=obs,
        rows=rows,
        balance=None if balance is None else D(balance),
        all_rated=D(all_rated) if all_rated is not None else rated,
        all_observed=D(all_observed) if all_observed is not None else sum(obs.values(), D(0)),
        next_hour=next_hour,
        lookback=LOOKBACK,
    )


def parts(line: DimensionReconciliation) -> dict[str, tuple[D, bool]]:
    return {d.kind: (d.amount, d.explained) for d in line.differences}


def adds_up(line: DimensionReconciliation) -> bool:
    return sum((d.amount for d in line.differences if d.in_sum), D(0)) == line.source - line.billed


def test_fractions_carried_between_hours_explain_the_remainder() -> None:
    # 1.4 bills 1 and carries 0.4; 0.4 + 2.3 bills 2 and carries 0.7
    rows = [row(H1, S.ACCEPTED, 1, "1.4", "0", "0.4"), row(H2, S.ACCEPTED, 2, "2.3", "0.4", "0.7")]
    line = pair(rows, {H1: "1.4", H2: "2.3"}, balance="0.7")
    assert line.billed == 3 and line.carry_in == 0 and line.carry_out == D("0.7")
    assert parts(line) == {"carried remainder": (D("0.7"), True)}
    assert line.clean and adds_up(line)


def test_a_carry_billed_in_the_range_is_a_negative_movement() -> None:
    # 0.6 carried in from before the range; 2.4 more bills 3 and leaves nothing
    line = pair([row(H2, S.ACCEPTED, 3, "2.4", "0.6", "0")], {H2: "2.4"}, balance="0")
    assert parts(line) == {"carry billed": (D("-0.6"), True)}
    assert line.clean and adds_up(line)


def test_a_downward_correction_leaves_a_credit_never_a_negative_quantity() -> None:
    # the hour's usage was corrected down by 2.5 after an hour billed: quantity 0, carry -2.5
    line = pair([row(H2, S.ACCEPTED, 0, "-2.5", "0", "-2.5")], {H2: "-2.5"}, balance="-2.5")
    assert parts(line) == {"credit": (D("-2.5"), True)}
    assert line.clean and adds_up(line)


def test_late_usage_billed_by_a_later_hour_outside_the_range_is_explained_across_the_edge() -> None:
    # H1 saw 5 units, its decision rated 3: the other 2 arrived late and were billed by H2's decision,
    # outside the range; all-time, the ledger accounts for everything observed
    rows = [row(H1, S.ACCEPTED, 3, "3", "0", "0"), row(H2, S.ACCEPTED, 2, "2", "0", "0", in_range=False)]
    line = pair(rows, {H1: "5"}, all_rated="5", all_observed="5")
    assert parts(line) == {"late usage across the range's edges": (D(2), True)}
    assert line.clean and adds_up(line)


def test_late_usage_the_ledger_never_accounts_for_is_unexplained() -> None:
    line = pair([row(H1, S.ACCEPTED, 3, "3", "0", "0")], {H1: "5"}, all_rated="3", all_observed="5")
    assert parts(line) == {"late usage across the range's edges": (D(2), False)}
    assert not line.clean and adds_up(line)


def test_late_usage_not_yet_seen_is_pending_within_the_look_back_and_lost_beyond_it() -> None:
    rows = [row(H1, S.ACCEPTED, 3, "3", "0", "0")]
    pending = pair(rows, {H1: "4"}, {H1: "3"}, next_hour=H3)
    assert parts(pending) == {"pending": (D(1), True)}
    assert adds_up(pending)
    lost = pair(rows, {H1: "4"}, {H1: "3"}, next_hour=H1 + LOOKBACK + timedelta(hours=1))
    assert parts(lost) == {"late usage never billed": (D(1), False)}
    assert adds_up(lost)


def test_an_expired_quantity_every_attempt_of_which_was_refused_went_back_to_the_carry() -> None:
    # decided 7 (+0.2 carried), every submission refused, then settled outside the window
    expired = row(H1, S.EXPIRED, 7, "7.2", "0", "0.2", attempts=2, refused=2, expired_at=H3)
    line = pair([expired], {H1: "7.2"}, balance="7.2")
    assert line.billed == 0 and line.carry_out == D("7.2")
    assert parts(line) == {"carried remainder": (D("0.2"), True), "expired": (D(7), True)}
    assert line.clean and adds_up(line)


def test_an_expired_quantity_that_may_have_been_received_is_unexplained() -> None:
    # one of two submissions got no answer proving a refusal: the marketplace may hold the 7 units
    expired = row(H1, S.EXPIRED, 7, "7", "0", "0", attempts=2, refused=1, expired_at=H3)
    line = pair([expired], {H1: "7"}, balance="7")
    assert parts(line) == {"expired, may have been received": (D(7), False)}
    assert not line.clean and adds_up(line)


def test_an_hour_decided_after_its_window_carries_everything() -> None:
    line = pair([row(H1, S.EXPIRED, 0, "4.5", "0", "4.5", attempts=0)], {H1: "4.5"}, balance="4.5")
    ((kind, (amount, explained)),) = parts(line).items()
    assert (kind, amount, explained) == ("carried remainder", D("4.5"), True)
    assert "decided after the marketplace's window" in line.differences[0].reason
    assert adds_up(line)


def test_rejected_and_unsettled_quantities_are_unexplained_and_counted_in_the_sum() -> None:
    rows = [row(H1, S.REJECTED, 4, "4", "0", "0", refused=1), row(H2, S.FAILED, 5, "5", "0", "0", refused=1)]
    line = pair(rows, {H1: "4", H2: "5"}, balance="0")
    assert parts(line) == {"rejected": (D(4), False), "unsettled": (D(5), False)}
    assert line.billed == 0 and adds_up(line)


def test_a_row_changed_after_its_decision_and_a_broken_carry_chain_are_found() -> None:
    # H1's quantity was edited from 1 to 2; H2's carry_in is not what H1 left
    rows = [row(H1, S.ACCEPTED, 2, "1.4", "0", "0.4"), row(H2, S.ACCEPTED, 2, "2.3", "0.5", "0.8")]
    line = pair(rows, {H1: "1.4", H2: "2.3"}, balance="0.8")
    found = parts(line)
    assert found["ledger row arithmetic"] == (D(-1), False)
    assert found["carry chain"] == (D("0.1"), False)
    assert not line.clean
