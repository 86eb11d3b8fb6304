"""How many customers an hour each lane can bill at its marketplace's quota, and how close an hour came.

The quota bounds a lane whatever its concurrency: one customer-hour costs ``units`` quota units (AWS:
one BatchMeterUsage request per 25 records of one customer; Google: one services.check plus one unit
per operation reported; Azure: one batchUsageEvent call per 25 events), so a lane bills at most
``quota x 3600 / units`` customers an hour. A lane without a documented quota (Azure) is bounded by
its concurrency and the marketplace's latency instead: no figure is claimed for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# records per call: AWS BatchMeterUsage "can process up to 25 UsageRecords at a time"; Azure's batch
# usage event takes 25 events. Google counts a unit per operation, whatever the call.
RECORDS_PER_CALL = {"aws": 25, "azure": 25}


def units_per_customer(marketplace: str, dimensions: int) -> int:
    """Quota units one customer-hour with ``dimensions`` records costs on the marketplace."""
    if marketplace == "gcp":
        return 1 + dimensions  # services.check, then one unit per operation in services.report
    return max(1, math.ceil(dimensions / RECORDS_PER_CALL.get(marketplace, 25)))


@dataclass(frozen=True)
class LaneCapacity:
    marketplace: str
    quota_per_second: float  # 0: no documented quota, unpaced
    units_per_customer: int
    customers_this_hour: int

    @property
    def customers_per_hour(self) -> int | None:
        """Customers the lane can bill in an hour at its quota (None: no quota to bound it)."""
        if not self.quota_per_second:
            return None
        return math.floor(self.quota_per_second * 3600 / self.units_per_customer)

    @property
    def margin(self) -> int | None:
        """Customers the lane could still take this hour (negative: past the quota's hour)."""
        per_hour = self.customers_per_hour
        return None if per_hour is None else per_hour - self.customers_this_hour

    @property
    def used(self) -> float | None:
        """The hour's customers as a share of the lane's hourly capacity."""
        per_hour = self.customers_per_hour
        return None if not per_hour else self.customers_this_hour / per_hour

    def line(self) -> str:
        per_hour = self.customers_per_hour
        if per_hour is None:
            return (
                f"{self.marketplace} lane: no documented quota (unpaced; 429 + Retry-After honoured), "
                f"this hour {self.customers_this_hour:,} customer(s)"
            )
        return (
            f"{self.marketplace} lane: {per_hour:,} customers/hour at {self.quota_per_second:,g}/s "
            f"({self.units_per_customer} unit(s) each), this hour {self.customers_this_hour:,} "
            f"({(self.used or 0) * 100:.1f} %), margin {self.margin:,}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "quota_per_second": self.quota_per_second,
            "units_per_customer": self.units_per_customer,
            "customers_per_hour": self.customers_per_hour,
            "customers_this_hour": self.customers_this_hour,
            "margin": self.margin,
        }


def lane_capacities(
    quotas: dict[str, float], dimensions: dict[str, int], customers: dict[str, int]
) -> list[LaneCapacity]:
    """Each marketplace's lane: its quota, the units a customer costs, and the hour's customers."""
    return [
        LaneCapacity(m, quotas.get(m, 0.0), units_per_customer(m, dimensions.get(m, 1)), customers.get(m, 0))
        for m in ("aws", "gcp", "azure")
    ]
