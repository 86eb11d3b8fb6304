"""Rating: usage becomes integer marketplace quantities, exactly, with carried remainders.

The decision for an hour covers every dimension of the customer's marketplace. For each dimension
it adds to the carried balance the rated usage of the hour plus any change since the last look at
earlier hours in the look-back window (late usage, or downward corrections), then bills the whole
units of that balance and carries the rest. So over time a customer pays floor(total rated usage)
units, late usage lands in the next billed hour, and a correction is credit, never a negative
quantity.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING

from billing.domain.model import Period
from billing.domain.subscriptions import plan_in_force

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from billing.domain.model import Marketplace, Rate, RateCard, UsageTotal
    from billing.domain.subscriptions import PlanSpan

ZERO = Decimal(0)


@dataclass(frozen=True)
class DimensionDecision:
    """What one dimension gets for the hour, and the balance it leaves."""

    dimension: str
    rated: Decimal  # usage newly accounted for by this decision (may be negative: a correction)
    carry_in: Decimal
    quantity: int
    carry_out: Decimal


@dataclass(frozen=True)
class Decision:
    dimensions: tuple[DimensionDecision, ...]
    # the rated usage now seen for each (dimension, hour) of the window: becomes the new observations
    observations: Mapping[tuple[str, datetime], Decimal]


def rate_usage(usage: Iterable[UsageTotal], rates: Iterable[Rate]) -> dict[tuple[str, datetime], Decimal]:
    """Rated quantity per (dimension, hour); metrics without a rate are ignored."""
    by_metric: dict[str, list[Rate]] = defaultdict(list)
    for rate in rates:
        by_metric[rate.metric].append(rate)
    rated: dict[tuple[str, datetime], Decimal] = defaultdict(lambda: ZERO)
    for row in usage:
        for rate in by_metric.get(row.metric, ()):
            rated[(rate.dimension, row.hour)] += row.quantity * rate.factor
    return dict(rated)


def decide(
    dimensions: Iterable[str],
    rated_now: Mapping[tuple[str, datetime], Decimal],
    observed: Mapping[tuple[str, datetime], Decimal],
    carries: Mapping[str, Decimal],
) -> Decision:
    """Decide the hour's quantity for every dimension (see the module docstring)."""
    delta: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for key in rated_now.keys() | observed.keys():
        delta[key[0]] += rated_now.get(key, ZERO) - observed.get(key, ZERO)
    decisions = []
    for dimension in dimensions:
        carry_in = carries.get(dimension, ZERO)
        balance = carry_in + delta[dimension]
        quantity = max(0, int(balance.to_integral_value(rounding=ROUND_FLOOR)))
        decisions.append(
            DimensionDecision(
                dimension=dimension,
                rated=delta[dimension],
                carry_in=carry_in,
                quantity=quantity,
                carry_out=balance - quantity,
            )
        )
    # an hour whose usage disappeared is observed as zero, so a later look does not count it again
    observations = {key: rated_now.get(key, ZERO) for key in rated_now.keys() | observed.keys()}
    return Decision(dimensions=tuple(decisions), observations=observations)


def rate_usage_by_plan(
    usage: Iterable[UsageTotal],
    card: RateCard,
    marketplace: Marketplace,
    plans: Sequence[PlanSpan],
) -> dict[tuple[str, datetime], Decimal]:
    """:func:`rate_usage`, each hour's usage with the rates of the plan in force during that hour
    (:func:`billing.domain.subscriptions.plan_in_force`): late usage of an hour before a plan change is
    rated with the plan of its own hour, not with the plan of the hour billing it."""
    by_plan: dict[str | None, list[UsageTotal]] = defaultdict(list)
    for row in usage:
        span = plan_in_force(plans, Period(row.hour))
        by_plan[span.plan if span else None].append(row)
    rated: dict[tuple[str, datetime], Decimal] = {}
    for plan, rows in by_plan.items():
        for key, quantity in rate_usage(rows, card.for_marketplace(marketplace, plan)).items():
            rated[key] = rated.get(key, ZERO) + quantity
    return rated


def billed_dimensions(
    card: RateCard,
    marketplace: Marketplace,
    plan: str | None,
    rated_now: Mapping[tuple[str, datetime], Decimal],
    observed: Mapping[tuple[str, datetime], Decimal],
) -> tuple[str, ...]:
    """The dimensions an hour decides: its plan's, and any other whose rated usage changed in the
    look-back (late usage of an hour under an earlier plan is billed in that plan's dimension, never
    dropped by marking it observed without a record)."""
    keys = rated_now.keys() | observed.keys()
    changed = {key[0] for key in keys if rated_now.get(key, ZERO) != observed.get(key, ZERO)}
    return tuple(sorted(set(card.plan_dimensions(marketplace, plan)) | changed))
