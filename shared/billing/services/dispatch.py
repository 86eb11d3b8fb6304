"""Dispatch one hour: one queue message per customer whose bill for the hour is not finished."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from billing.domain.messages import BillMessageV1
from billing.domain.model import Marketplace, Period

if TYPE_CHECKING:
    from billing.ports import DispatchRepository, MessageQueue


@dataclass(frozen=True)
class DispatchResult:
    run_id: uuid.UUID
    period: Period
    dispatched: int
    already_dispatched: bool
    resent: int = 0  # messages sent again for unfinished customers of an hour dispatched before

    def as_dict(self) -> dict[str, object]:
        return {
            "run_id": str(self.run_id),
            "period": self.period.isoformat(),
            "dispatched": self.dispatched,
            "already_dispatched": self.already_dispatched,
            "resent": self.resent,
        }


async def dispatch(
    period: Period,
    repo: DispatchRepository,
    queue: MessageQueue,
    page_size: int = 1000,
    resend_unbilled: bool = False,
) -> DispatchResult:
    """Idempotent: a finished run sends nothing (unless ``resend_unbilled``: then a message for each
    customer whose bill is not finished); an interrupted one sends what may be unbilled."""
    run = await repo.start_run(period)
    if run.completed and not resend_unbilled:
        return DispatchResult(run.id, period, run.dispatched, already_dispatched=True)
    sent = 0
    async for page in repo.customers_to_bill(period, page_size):
        # each marketplace bills in its own lane (queue, dead-letter queue, concurrency): a slow or
        # throttling marketplace never holds the other marketplaces' customers
        lanes: dict[Marketplace, list[BillMessageV1]] = {}
        for customer_id, marketplace in page:
            message = BillMessageV1(customer_id=customer_id, period=period.start, run_id=run.id)
            lanes.setdefault(marketplace, []).append(message)
        for marketplace, messages in lanes.items():
            sent += await queue.send(messages, lane=marketplace)
    if run.completed:
        # only counted, for `billing status`: the messages are on the queue already, and a failure
        # here makes the dispatch fail and be retried, which resends (billing is idempotent)
        await repo.record_resend(run.id, sent)
        return DispatchResult(run.id, period, run.dispatched, already_dispatched=True, resent=sent)
    await repo.finish_run(run.id, sent)
    return DispatchResult(run.id, period, sent, already_dispatched=False)
