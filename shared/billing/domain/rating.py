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

if TYPE_CHECKING:
    from collections.abc import Iterable

    from billing.domain.model import Rate, UsageTotal

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
