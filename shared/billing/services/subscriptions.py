"""Record a subscription event; when a subscription has ended, send its final bills at once.

The Subscriptions function never bills: it enqueues bill messages on the billing queue, so the Biller
stays the one place that decides, submits and records a bill (exactly once per customer, dimension and
hour). For a subscription that ended at instant E:

- every hour before E's hour that the subject was active in gets an ordinary bill message (billing is
  idempotent: an hour already billed is not billed again);
- E's own hour gets a *final* bill message (``final_until=E``): the Biller bills it before the hour is
  over, with the usage up to E, because the marketplaces' final-metering windows
  (:data:`FINAL_METERING_WINDOW`) can close before the dispatcher would reach that hour.

Messages go out whenever the recorded state says the subscription has ended, also for a replayed event:
an invocation that recorded the event but failed before its messages were sent is redelivered by the
marketplace's queue, and the replay sends them then.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from billing.domain.messages import BillMessageV1
from billing.domain.model import Marketplace, Period, hour_floor
from billing.domain.subscriptions import billable_during, final_bill_due
from billing.ports import MessageQueue, Recorded, SubscriptionRepository

if TYPE_CHECKING:
    from billing.domain.subscriptions import LifecycleEvent, SubscriptionState

# How long after a subscription ends its last usage may still be reported: the final bill is sent as
# soon as the end is recorded, well inside each of these.
FINAL_METERING_WINDOW: dict[Marketplace, timedelta] = {
    # AWS Marketplace Seller Guide, "Amazon SNS notifications for SaaS products" (saas-notification):
    # on `unsubscribe-pending` the seller has one hour to send the customer's final metering records
    # before `unsubscribe-success`; the EventBridge agreement events of 2026 listings keep that hour.
    Marketplace.AWS: timedelta(hours=1),
    # Google Cloud Marketplace, "Configure usage reporting" (integrated-saas/configure-usage-reports):
    # usage reports are sent hourly and taken up to one hour after the reported period; a cancelled
    # entitlement's last usage is the last report.
    Marketplace.GCP: timedelta(hours=1),
    # Microsoft Learn, "Marketplace metered billing APIs - FAQ": usage events are accepted up to 24
    # hours after the hour they belong to, also for the hours before an Unsubscribe.
    Marketplace.AZURE: timedelta(hours=24),
}

_FINAL_RUNS = uuid.UUID("6d1d4b1e-2f35-5a0e-9c1b-6c0f6a1e7d13")


@dataclass(frozen=True)
class RecordOutcome:
    recorded: Recorded
    final_bills: int  # bill messages sent because the subscription has ended
    final_deadline: datetime | None  # the end instant + the marketplace's final-metering window

    @property
    def appended(self) -> bool:
        return self.recorded.appended


def final_messages(
    state: SubscriptionState, customer_id: str, now: datetime, lookback_hours: int
) -> list[BillMessageV1]:
    """The bill messages that settle an ended subscription: its unbilled hours up to the end instant."""
    end = final_bill_due(state, now)
    if end is None:
        return []
    end_hour = Period(hour_floor(end))
    # a deterministic run id per subject and end, so a replay's messages are the same messages
    run_id = uuid.uuid5(_FINAL_RUNS, f"{state.key}|{end.isoformat()}")
    messages: list[BillMessageV1] = []
    for back in range(lookback_hours, -1, -1):
        period = end_hour.shifted(-back)
        if not billable_during(state, period):
            continue
        final = period.end > now  # the end's hour, not over yet: billed up to the end instant
        messages.append(
            BillMessageV1(
                customer_id=customer_id,
                period=period.start,
                run_id=run_id,
                final_until=end if final else None,
            )
        )
    return messages


@dataclass
class SubscriptionService:
    repo: SubscriptionRepository
    queue: MessageQueue
    lookback_hours: int = 24
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    async def record(self, event: LifecycleEvent) -> RecordOutcome:
        """Append the event to the subject's history and apply it, once; send final bills when due."""
        recorded = await self.repo.record(event)
        state = recorded.state
        now = self.clock().astimezone(UTC)
        messages: list[BillMessageV1] = []
        if recorded.customer_id is not None:
            messages = final_messages(state, recorded.customer_id, now, self.lookback_hours)
        if messages:
            # hours billed already need no message (a replayed end, or hours the dispatcher reached)
            done = await self.repo.finished_hours(
                recorded.customer_id or "", messages[0].period, messages[-1].period
            )
            messages = [m for m in messages if m.period not in done]
        if messages:
            # on the subject's own lane, as the dispatcher would send them
            await self.queue.send(messages, lane=state.key.marketplace)
        deadline = None
        if state.ends_at is not None:
            deadline = state.ends_at + FINAL_METERING_WINDOW[state.key.marketplace]
        return RecordOutcome(recorded, len(messages), deadline)
