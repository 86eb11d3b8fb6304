"""Subscriptions: who is billed, for which hours, under which identity (issue #13's shared contract).

Each marketplace adapter parses its own raw input (an AWS agreement EventBridge event or legacy SNS
message, a Google Procurement Pub/Sub notification, an Azure SaaS fulfillment webhook, a registration,
an imported CSV row) into a :class:`LifecycleEvent`. This module folds those events into a
:class:`SubscriptionState`. Pure: no I/O.

Marketplaces deliver these events at least once and in no particular order, so the state is a function
of the *set* of events seen, never of their arrival order: :func:`apply` adds an event to the set
(keyed by the marketplace's own event id, so a replay is a no-op) and recomputes the derived fields by
replaying the set in the marketplace's own order (:attr:`LifecycleEvent.sort_key`). Applying any event
twice, or an older event after a newer one, gives the same state as applying them once, in order.

Time: ``effective_at`` is when an event's change takes effect (an end instant for ENDING/ENDED, the
moment a plan change applies); ``ordering`` is the marketplace's own event time or version, which says
which of two events is newer. They differ: a pending cancellation is *announced* now (ordering) and
*takes effect* at the end of the term (effective_at), and a later "cancellation reverted" (newer
ordering, effective now) must undo that scheduled end.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from billing.domain.model import Marketplace, Period

if TYPE_CHECKING:
    from collections.abc import Iterable

# JSON-able value, for the raw payload kept in the history
JsonValue = Any


class LifecycleKind(enum.StrEnum):
    """What an event says happened to a subscription."""

    REGISTERED = "registered"  # a registration: links the subject to a tenant/identity, no status change
    #                            (a late registration must never revive an ended subscription)
    REQUESTED = "requested"  # asked for, not yet approved/activated (Google creation requested, Azure
    #                          PendingFulfillmentStart): not billable
    ACTIVE = "active"  # subscribed and billable from effective_at
    PLAN_CHANGED = "plan_changed"  # plan (and so dimensions/rates) changes from effective_at
    QUANTITY_CHANGED = "quantity_changed"  # seats/quantity change from effective_at; status unchanged
    SUSPENDED = "suspended"  # not billable from effective_at (Azure Suspend: payment problem)
    REINSTATED = "reinstated"  # billable again from effective_at
    ENDING = "ending"  # pending cancellation / unsubscribe-pending: billable until effective_at (the end
    #                    instant), then a final bill; may still be reverted by a newer ACTIVE/REINSTATED
    ENDED = "ended"  # over at effective_at


class SubscriptionStatus(enum.StrEnum):
    """Where a subscription stands at an instant."""

    PENDING = "pending"  # requested, never active yet
    ACTIVE = "active"
    SUSPENDED = "suspended"
    ENDED = "ended"


# Which status each kind moves the status timeline to (plan/quantity changes leave it alone).
_STATUS_OF: dict[LifecycleKind, SubscriptionStatus] = {
    LifecycleKind.REQUESTED: SubscriptionStatus.PENDING,
    LifecycleKind.ACTIVE: SubscriptionStatus.ACTIVE,
    LifecycleKind.REINSTATED: SubscriptionStatus.ACTIVE,
    LifecycleKind.SUSPENDED: SubscriptionStatus.SUSPENDED,
    LifecycleKind.ENDING: SubscriptionStatus.ENDED,
    LifecycleKind.ENDED: SubscriptionStatus.ENDED,
}

# Tie-break between two events with the same ordering: the more final one is taken as the newer, so a
# subscription never stays billable because two events carried the same timestamp.
_PRECEDENCE: dict[LifecycleKind, int] = {
    LifecycleKind.REGISTERED: -1,
    LifecycleKind.REQUESTED: 0,
    LifecycleKind.ACTIVE: 1,
    LifecycleKind.REINSTATED: 2,
    LifecycleKind.PLAN_CHANGED: 3,
    LifecycleKind.QUANTITY_CHANGED: 4,
    LifecycleKind.SUSPENDED: 5,
    LifecycleKind.ENDING: 6,
    LifecycleKind.ENDED: 7,
}


class EventSource(enum.StrEnum):
    """Where an event came from (kept in the history; routing is the handler's job)."""

    AWS_AGREEMENT = "aws.agreement-marketplace"  # EventBridge agreement/license events (2026 listings)
    AWS_SNS = "aws.sns"  # legacy SaaS subscription SNS topic, through SQS
    AWS_REGISTRATION = "aws.registration"  # fulfillment URL POST -> ResolveCustomer
    GCP_PUBSUB = "gcp.pubsub"  # Procurement notifications by Pub/Sub push
    AZURE_WEBHOOK = "azure.webhook"  # SaaS fulfillment v2 webhook
    AZURE_REGISTRATION = "azure.registration"  # landing page resolve + activate
    REGISTRATION = "registration"  # any other link of a subject to a tenant
    IMPORT = "import"  # `billing customers import`


@dataclass(frozen=True, order=True)
class SubjectKey:
    """One billing subject: a marketplace and the marketplace's own id of the agreement.

    AWS: the license ARN (2026 listings), or ``"<CustomerIdentifier>/<ProductCode>"`` for legacy
    customers; Google: the entitlement id; Azure: the SaaS subscription id, or a managed app's resourceUri.
    """

    marketplace: Marketplace
    subject_id: str

    def __post_init__(self) -> None:
        if not self.subject_id or len(self.subject_id) > 1024 or not self.subject_id.isprintable():
            raise ValueError("a subject id is 1 to 1024 printable characters")

    def __str__(self) -> str:
        return f"{self.marketplace}:{self.subject_id}"


@dataclass(frozen=True)
class Identity:
    """What the marketplace needs to accept a usage record for the subject; every field optional
    because each event carries only some of them. Merged field by field, the newest non-empty wins."""

    # AWS (2026 listings: account + license, no product code; legacy: customer identifier + product code)
    aws_account_id: str | None = None
    aws_license_arn: str | None = None
    aws_customer_identifier: str | None = None
    aws_product_code: str | None = None
    # agreement events name only the agreement; license events and ResolveCustomer name both
    aws_agreement_id: str | None = None
    # Google (usageReportingId is what Service Control takes as consumerId)
    gcp_entitlement_id: str | None = None
    gcp_account_id: str | None = None
    gcp_usage_reporting_id: str | None = None
    gcp_service_name: str | None = None
    # Azure (a SaaS subscription id, or a managed application's resourceUri)
    azure_subscription_id: str | None = None
    azure_resource_uri: str | None = None

    def merged(self, newer: Identity) -> Identity:
        """This identity with every field ``newer`` carries taken from ``newer``."""
        return replace(
            self, **{f.name: getattr(newer, f.name) for f in fields(self) if getattr(newer, f.name)}
        )

    def as_dict(self) -> dict[str, str]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name))}


def _utc(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class LifecycleEvent:
    """One marketplace event about one subject, parsed from the marketplace's own input."""

    key: SubjectKey
    kind: LifecycleKind
    effective_at: datetime  # when the change takes effect (the end instant for ENDING/ENDED)
    ordering: datetime  # the marketplace's own event time: which of two events is newer
    event_id: str  # the marketplace's id for this event (idempotency); unique per marketplace
    source: EventSource
    sequence: int = 0  # a version number within one ordering instant, where the marketplace has one
    plan: str | None = None
    dimensions: tuple[str, ...] | None = None  # the plan's dimensions when the event names them
    quantity: int | None = None
    tenant_id: str | None = None  # the seller's tenant id (what usage is recorded against), if known
    identity: Identity = field(default_factory=Identity)
    raw: JsonValue = None  # the marketplace's payload, JSON-able, kept in the history

    def __post_init__(self) -> None:
        object.__setattr__(self, "effective_at", _utc(self.effective_at, "effective_at"))
        object.__setattr__(self, "ordering", _utc(self.ordering, "ordering"))
        if not self.event_id or len(self.event_id) > 512:
            raise ValueError("an event id is 1 to 512 characters")
        if self.quantity is not None and self.quantity < 0:
            raise ValueError("a quantity is never negative")
        if self.raw is not None:
            json.dumps(self.raw)  # refuse a payload the history could not store

    @property
    def sort_key(self) -> tuple[datetime, int, int, str]:
        """The marketplace's order of events: newer sorts later; total, so replays are deterministic."""
        return (self.ordering, self.sequence, _PRECEDENCE[self.kind], self.event_id)


@dataclass(frozen=True)
class PlanSpan:
    """A plan in force from ``start`` (until the next span's start)."""

    start: datetime
    plan: str | None
    dimensions: tuple[str, ...] | None
    quantity: int | None


@dataclass(frozen=True)
class SubscriptionState:
    """A subject's state: the events seen (by id) and what they mean.

    ``timeline`` is the status from each instant on: ``((t0, s0), (t1, s1), ...)`` with t0 < t1 < ...;
    before t0 the subject did not exist (not billable).
    """

    key: SubjectKey
    events: Mapping[str, LifecycleEvent] = field(default_factory=dict)
    timeline: tuple[tuple[datetime, SubscriptionStatus], ...] = ()
    plans: tuple[PlanSpan, ...] = ()
    tenant_id: str | None = None
    identity: Identity = field(default_factory=Identity)

    @property
    def status(self) -> SubscriptionStatus:
        """The status after every known transition (scheduled ends included)."""
        return self.timeline[-1][1] if self.timeline else SubscriptionStatus.PENDING

    def status_at(self, moment: datetime) -> SubscriptionStatus:
        current = SubscriptionStatus.PENDING
        for start, status in self.timeline:
            if start > moment:
                break
            current = status
        return current

    @property
    def ends_at(self) -> datetime | None:
        """The end instant when the subscription has ended or is scheduled to end, else None."""
        if self.timeline and self.timeline[-1][1] is SubscriptionStatus.ENDED:
            return self.timeline[-1][0]
        return None

    @property
    def billable_intervals(self) -> tuple[tuple[datetime, datetime | None], ...]:
        """The [start, end) intervals during which the subject is ACTIVE (end None: open)."""
        out: list[tuple[datetime, datetime | None]] = []
        start: datetime | None = None
        for moment, status in self.timeline:
            if status is SubscriptionStatus.ACTIVE and start is None:
                start = moment
            elif status is not SubscriptionStatus.ACTIVE and start is not None:
                out.append((start, moment))
                start = None
        if start is not None:
            out.append((start, None))
        return tuple(out)

    def plan_for(self, period: Period) -> PlanSpan | None:
        return plan_in_force(self.plans, period)


def plan_in_force(plans: Iterable[PlanSpan], period: Period) -> PlanSpan | None:
    """The plan that rates ``period``: the newest span starting before the hour's end.

    #13: "a plan change moves the subject's dimensions/rates from the hour it takes effect". An hour is
    billed as one record per dimension, so it has one plan: a change effective at 13:00 bills the 12:00
    hour with the old plan and the 13:00 hour with the new one, and a change at 13:20 bills the whole
    13:00 hour with the new plan (the hour it takes effect in), never a mix of the two.
    """
    chosen: PlanSpan | None = None
    for span in sorted(plans, key=lambda p: p.start):
        if span.start < period.end:
            chosen = span
    return chosen


def _sorted_events(events: Iterable[LifecycleEvent]) -> list[LifecycleEvent]:
    return sorted(events, key=lambda e: e.sort_key)


def _derive(key: SubjectKey, events: Mapping[str, LifecycleEvent]) -> SubscriptionState:
    """Replay the events in the marketplace's order. A status event fixes the status from its
    effective instant on and replaces anything scheduled at or after that instant by older events
    (a revert cancels a scheduled end); an older event never overrides a newer one's future."""
    timeline: list[tuple[datetime, SubscriptionStatus]] = []
    plans: list[PlanSpan] = []
    tenant: str | None = None
    identity = Identity()
    for event in _sorted_events(events.values()):
        status = _STATUS_OF.get(event.kind)
        if status is not None:
            timeline = [(t, s) for t, s in timeline if t < event.effective_at]
            if not timeline or timeline[-1][1] is not status:
                timeline.append((event.effective_at, status))
        if event.plan is not None or event.dimensions is not None or event.quantity is not None:
            before = [p for p in plans if p.start < event.effective_at]
            previous = before[-1] if before else None
            span = PlanSpan(
                start=event.effective_at,
                plan=event.plan if event.plan is not None else (previous.plan if previous else None),
                dimensions=event.dimensions
                if event.dimensions is not None
                else (previous.dimensions if previous else None),
                quantity=event.quantity
                if event.quantity is not None
                else (previous.quantity if previous else None),
            )
            plans = [*before, span]
        if event.tenant_id:
            tenant = event.tenant_id
        identity = identity.merged(event.identity)
    return SubscriptionState(
        key=key,
        events=dict(events),
        timeline=tuple(timeline),
        plans=tuple(plans),
        tenant_id=tenant,
        identity=identity,
    )


def _keep(current: LifecycleEvent, other: LifecycleEvent) -> LifecycleEvent:
    """Two events claiming one id: keep one regardless of arrival order (the newer, then the one with
    the greater canonical payload), so even a marketplace reusing an id cannot make the result depend
    on order. The store keeps the first it saw in its history; both are in the log either way."""
    if current == other:
        return current
    a = (current.sort_key, repr(current))
    b = (other.sort_key, repr(other))
    return current if a >= b else other


def initial(key: SubjectKey) -> SubscriptionState:
    return SubscriptionState(key=key)


def apply(state: SubscriptionState, event: LifecycleEvent) -> SubscriptionState:
    """The state after ``event``: idempotent (a replay changes nothing) and order-insensitive."""
    if event.key != state.key:
        raise ValueError(f"event for {event.key} applied to {state.key}")
    known = state.events.get(event.event_id)
    if known is not None and _keep(known, event) is known:
        return state
    return _derive(state.key, {**state.events, event.event_id: event})


def fold(key: SubjectKey, events: Iterable[LifecycleEvent]) -> SubscriptionState:
    """The state after every event of ``events`` (any order, duplicates allowed)."""
    state = initial(key)
    for event in events:
        state = apply(state, event)
    return state


def billable_during(state: SubscriptionState, period: Period) -> bool:
    """Whether the subject was ACTIVE during any part of the hour."""
    return any(
        start < period.end and (end is None or end > period.start) for start, end in state.billable_intervals
    )


def final_bill_due(state: SubscriptionState, now: datetime) -> datetime | None:
    """The end instant when the subscription has ended by ``now`` (its last hours are to be billed at
    once), else None. A scheduled end in the future is not due yet."""
    end = state.ends_at
    if end is None or end > _utc(now, "now"):
        return None
    return end
