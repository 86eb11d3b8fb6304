"""Value types of the billing domain."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

HOUR = timedelta(hours=1)
# The hours a Period may name. No marketplace metered usage before 2000; the ceiling keeps every hour's
# end and a week of look-back either side inside datetime's range (year 9999 would overflow). Hours
# outside are corrupt input, refused where they are parsed instead of overflowing deep inside.
EARLIEST_HOUR = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_HOUR = datetime(9000, 1, 1, tzinfo=UTC)


class Marketplace(enum.StrEnum):
    AWS = "aws"
    GCP = "gcp"
    AZURE = "azure"


class CustomerStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    CANCELLED = "cancelled"


class LedgerState(enum.StrEnum):
    """Where one (customer, dimension, hour) record stands."""

    PENDING = "pending"  # decided, not yet handed to the marketplace
    SUBMITTED = "submitted"  # an attempt to submit began; the answer is not recorded yet
    ACCEPTED = "accepted"  # the marketplace accepted it (record id kept)
    DUPLICATE = "duplicate"  # the marketplace already held a record for this key
    REJECTED = "rejected"  # permanently refused (reason kept); not retried
    FAILED = "failed"  # transient failure; the message will be redelivered
    SKIPPED = "skipped"  # nothing to send (zero quantity where the marketplace wants none)
    EXPIRED = "expired"  # outside the marketplace's window; quantity carried to a later hour

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def billed(self) -> bool:
        """The marketplace holds this record (it counts as charged)."""
        return self in (LedgerState.ACCEPTED, LedgerState.DUPLICATE)


FINAL_STATES = frozenset(
    {
        LedgerState.ACCEPTED,
        LedgerState.DUPLICATE,
        LedgerState.REJECTED,
        LedgerState.SKIPPED,
        LedgerState.EXPIRED,
    }
)
# Not settled yet: claimed again for another submission, or settled when the marketplace's window closes.
UNFINISHED_STATES = frozenset(s for s in LedgerState if s not in FINAL_STATES)
# An answer proving the marketplace did not take the record (throttled, unavailable, refused): only a row
# whose every attempt ended in one of these may give its quantity back to the carry when its window closes.
REFUSED_STATES = frozenset({LedgerState.FAILED, LedgerState.REJECTED})


def expiry_reasons(window: str) -> tuple[str, str]:
    """The ledger's reasons for an hour settled outside the marketplace's ``window``: (maybe received,
    carried). Domain, not the Postgres adapter: the unit tests' in-memory repository (tests/fakes.py)
    writes the same reasons without importing asyncpg."""
    return (
        f"outside the marketplace's {window} window after a submission the marketplace may have "
        "received (its answer never proved a refusal): check the marketplace's records before billing "
        "it again",
        f"outside the marketplace's {window} window: quantity carried to a later hour",
    )


def hour_floor(moment: datetime) -> datetime:
    """The start of the UTC hour that contains ``moment``."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: billing hours are UTC and must carry a timezone")
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True, order=True)
class Period:
    """One billing hour, [start, start + 1h), always UTC and aligned."""

    start: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("a billing period must be timezone-aware")
        if hour_floor(self.start) != self.start:
            raise ValueError(f"a billing period starts on the hour, got {self.start.isoformat()}")
        if not EARLIEST_HOUR <= self.start < LATEST_HOUR:
            bounds = f"[{EARLIEST_HOUR:%Y}, {LATEST_HOUR:%Y})"
            raise ValueError(f"a billing period lies in {bounds}, got {self.start.isoformat()}")
        object.__setattr__(self, "start", self.start.astimezone(UTC))

    @property
    def end(self) -> datetime:
        return self.start + HOUR

    def has_ended(self, now: datetime) -> bool:
        """Whether the hour is over at ``now`` (its last usage may still arrive: that is late usage)."""
        return self.end <= now

    @classmethod
    def parse(cls, text: str) -> Period:
        """Parse an ISO-8601 hour such as ``2026-11-26T13:00:00Z``."""
        return cls(datetime.fromisoformat(text.replace("Z", "+00:00")))

    @classmethod
    def last_complete_before(cls, moment: datetime, settle: timedelta) -> Period:
        """The last hour that had ended ``settle`` before ``moment`` (late usage gets that long)."""
        return cls(hour_floor(moment - settle) - HOUR)

    def shifted(self, hours: int) -> Period:
        return Period(self.start + hours * HOUR)

    def isoformat(self) -> str:
        return self.start.strftime("%Y-%m-%dT%H:%M:%SZ")

    def __str__(self) -> str:
        return self.isoformat()


@dataclass(frozen=True)
class Customer:
    """A customer to bill, with the identifiers its marketplace needs."""

    id: str
    marketplace: Marketplace
    status: CustomerStatus
    active_from: datetime
    active_until: datetime | None
    # AWS
    aws_customer_identifier: str | None = None
    aws_account_id: str | None = None
    aws_product_code: str | None = None
    # since June 2026 (AWS "Concurrent Agreements"): one subject per license, metered by LicenseArn
    # with aws_account_id and no product code; see billing.adapters.aws_metering.identity
    aws_license_arn: str | None = None
    # GCP
    gcp_usage_reporting_id: str | None = None
    gcp_service_name: str | None = None
    # Azure
    azure_resource_id: str | None = None
    azure_resource_uri: str | None = None
    azure_plan_id: str | None = None

    def billable_in(self, period: Period) -> bool:
        """Whether the customer was subscribed during any part of the hour."""
        if self.active_from >= period.end:
            return False
        return self.active_until is None or self.active_until > period.start


@dataclass(frozen=True)
class Rate:
    """How one usage metric becomes a quantity of a marketplace dimension."""

    marketplace: Marketplace
    metric: str
    dimension: str
    factor: Decimal  # dimension units per metric unit
    plan: str = "default"  # DEFAULT_PLAN, or the marketplace plan these rates belong to


# The rates of a subject without a plan, or whose plan the card does not list (migration 0006).
DEFAULT_PLAN = "default"


@dataclass(frozen=True)
class RateCard:
    rates: tuple[Rate, ...]

    def for_marketplace(self, marketplace: Marketplace, plan: str | None = None) -> tuple[Rate, ...]:
        """The rates of ``plan`` in the marketplace; the default plan's when ``plan`` is None or the card
        lists no rate for it (a plan's rates replace the default's, they are not added to them)."""
        mine = tuple(r for r in self.rates if r.marketplace is marketplace)
        if plan is not None and plan != DEFAULT_PLAN:
            planned = tuple(r for r in mine if r.plan == plan)
            if planned:
                return planned
        return tuple(r for r in mine if r.plan == DEFAULT_PLAN)

    def plan_dimensions(self, marketplace: Marketplace, plan: str | None) -> tuple[str, ...]:
        """The dimensions ``plan`` is billed in, in a stable order."""
        return tuple(sorted({r.dimension for r in self.for_marketplace(marketplace, plan)}))

    def dimensions(self, marketplace: Marketplace) -> tuple[str, ...]:
        """Every dimension the marketplace is billed in under any plan, in a stable order."""
        return tuple(sorted({r.dimension for r in self.rates if r.marketplace is marketplace}))


@dataclass(frozen=True)
class UsageTotal:
    """Summed usage of one metric in one hour for one customer."""

    hour: datetime
    metric: str
    quantity: Decimal


@dataclass(frozen=True)
class LedgerEntry:
    """One (customer, dimension, hour) record of the ledger."""

    customer_id: str
    dimension: str
    period: Period
    quantity: int
    state: LedgerState
    attempts: int = 0
    record_id: str | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class SubmitResult:
    """The marketplace's answer for one ledger entry.

    ``state`` is FAILED when the marketplace certainly did not take the record (throttled, 503,
    unprocessed) and SUBMITTED when nobody knows (a timeout after sending): both are retried.
    """

    dimension: str
    state: LedgerState
    record_id: str | None = None
    reason: str | None = None
    # a throttle answer (AWS ThrottlingException, HTTP 429): retried within the bill's budget, and a bill
    # that stops on nothing but throttles goes back to its lane's queue instead of failing
    throttled: bool = False
    retry_after: float | None = None  # seconds, from a Retry-After header
    # refused for the subject as it stands now (Google's services.check), not for the hour billed, and
    # nothing was sent: when the subscription ended after the bill loaded the customer, the Biller submits
    # once more with the recorded end (usage up to a cancellation is still billed)
    refused_now: bool = False

    @property
    def retryable(self) -> bool:
        return self.state in (LedgerState.FAILED, LedgerState.SUBMITTED)


@dataclass
class BillOutcome:
    """What billing one customer-hour did."""

    customer_id: str
    period: Period
    marketplace: Marketplace
    entries: list[LedgerEntry] = field(default_factory=list)
    marketplace_calls: int = 0
    already_billed: bool = False
    stale_final_bill: bool = False  # a final bill whose end instant the database no longer records
    superseded: bool = False  # a legacy AWS subject's hour billed by its account's license instead (#13)
    requeued: bool = False  # throttled until the budget ran out: a copy of the message waits in the lane

    def count(self, state: LedgerState) -> int:
        return sum(1 for e in self.entries if e.state is state)
