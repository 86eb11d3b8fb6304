"""Bill one customer for one hour: decide, record, then submit, then record the answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import stamina

from billing import log_context
from billing.budget import DEADLINE, budget_left
from billing.domain.errors import (
    BadMessageError,
    BudgetSpentError,
    ClaimHeldError,
    ConcurrentDecisionError,
    MarketplaceUnavailableError,
    ThrottledError,
    TransientError,
    WindowExpiredError,
)
from billing.domain.messages import BillMessageV1, require_billable_now
from billing.domain.model import BillOutcome, LedgerEntry, LedgerState, Marketplace, RateCard, SubmitResult
from billing.domain.rating import Decision, DimensionDecision, billed_dimensions, decide, rate_usage_by_plan
from billing.domain.subscriptions import plan_in_force
from billing.ports import BillingRepository, MarketplaceClient, UsageSource
from billing.tracing import span

if TYPE_CHECKING:
    from collections.abc import Sequence

    from billing.domain.model import Customer, Period
    from billing.ports import CustomerHourState


class RateCardCache:
    """The rate card, read once and then again every ``ttl_seconds``."""

    def __init__(self, repo: BillingRepository, ttl_seconds: float = 300.0) -> None:
        self._repo = repo
        self._ttl = ttl_seconds
        self._card: RateCard | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()  # concurrent first callers read it once

    async def get(self) -> RateCard:
        if self._card is None or time.monotonic() - self._read_at > self._ttl:
            async with self._lock:
                if self._card is None or time.monotonic() - self._read_at > self._ttl:
                    self._card = await self._repo.rate_card()
                    self._read_at = time.monotonic()
        return self._card


@dataclass
class Biller:
    """Everything billing one customer-hour needs, built once per execution environment."""

    repo: BillingRepository
    usage: UsageSource
    marketplace: Callable[[Marketplace], Awaitable[MarketplaceClient]]
    rate_cards: RateCardCache
    lookback_hours: int
    lease_seconds: int
    attempts: int = 3
    budget_seconds: float = 45.0  # BILLING_INVOCATION_BUDGET_SECONDS
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    # Puts a copy of the message back on its marketplace's lane, delayed (seconds of Retry-After if
    # known): a bill throttled until its budget ran out ends there, not as a failed receive (see bill).
    requeue: Callable[[BillMessageV1, Marketplace, float | None], Awaitable[None]] | None = None
    # How long a delivery waits for another delivery of the same hour that holds its claim (see
    # _wait_for_holder), at most; and how it waits (tests inject a sleep that lets the other finish).
    holder_wait_seconds: float = 10.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def bill(self, message: BillMessageV1, started: float | None = None) -> BillOutcome:
        """Bill the message's customer-hour; idempotent, so any delivery may run it again.

        The budget counts from ``started`` (the event loop's time when the invocation began: a cold
        start's database pool is built before the Biller exists, inside the same budget), else from now.

        An hour that has not ended by ``clock`` is a bad message (it fails until the dead-letter queue
        holds it): its usage is still coming in. One that ended inside the settle delay is billed: the
        delay is the scheduler's courtesy to late usage, and usage later still is billed with the next
        hour anyway. A final bill (``final_until``) is the one exception: its hour is billed once the
        subscription's end instant has passed, up to that instant, and only while the database still
        records that end (a final bill for a subscription since reinstated does nothing).
        """
        require_billable_now(message, self.clock)
        owner = f"{message.run_id}:{uuid.uuid4().hex[:12]}"

        def retryable(exc: Exception) -> bool:
            # the marketplace adapter has already retried its own calls; a held claim is waited for
            # (_bill_with_retries), not retried at once
            return isinstance(exc, TransientError) and not isinstance(
                exc, MarketplaceUnavailableError | ClaimHeldError
            )

        with log_context.bound(operation="bill"):
            # One deadline over every retry below: stopped here, a call in flight is as unconfirmed as after
            # a Lambda timeout (its ledger rows stay SUBMITTED, resubmitted with the same quantities later),
            # but the item fails with a log, a metric and an APM outcome, and the slot is free sooner.
            # The adapters read the same deadline (billing.budget) to stop retrying throttles in time.
            loop_time = asyncio.get_running_loop().time()
            ends = (loop_time if started is None else started) + self.budget_seconds
            if ends <= loop_time:  # spent before the bill began: claim nothing, send nothing
                raise BudgetSpentError(
                    f"the {self.budget_seconds:g} s budget was spent before the bill began; SQS redelivers it"
                )
            budget = DEADLINE.set(ends)
            try:
                async with asyncio.timeout_at(ends) as deadline:
                    return await self._bill_with_retries(message, owner, retryable)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise BudgetSpentError(
                    f"the bill did not settle within its {self.budget_seconds:g} s budget; SQS redelivers it"
                ) from None
            except ThrottledError as exc:
                # Nothing failed but the marketplace's quota, and its answers are recorded (the lease is
                # released). Failing the item would spend one of the lane's maxReceiveCount receives, so a
                # long throttle would dead-letter healthy customers: a fresh copy of the message goes back
                # to the lane instead (billing is idempotent) and this delivery ends as handled. If the copy
                # cannot be sent, the item fails as before.
                if self.requeue is None:
                    raise
                await self.requeue(message, Marketplace(exc.marketplace), exc.retry_after)
                return BillOutcome(
                    message.customer_id, message.billing_period, Marketplace(exc.marketplace), requeued=True
                )
            finally:
                DEADLINE.reset(budget)

    async def _bill_with_retries(
        self, message: BillMessageV1, owner: str, retryable: Callable[[Exception], bool]
    ) -> BillOutcome:
        """The bill, retried; a claim held by another delivery is waited for rather than retried.

        Two deliveries of one customer-hour at the same moment are normal (SQS delivers at least once,
        a schedule may fire twice): one claims the hour and submits, the other finds the claim held. The
        holder normally settles within a second, so the other waits for it (backing off, within this
        bill's budget and ``holder_wait_seconds``) and then ends as already billed. Failing the item
        instead spent one of the lane's maxReceiveCount receives per attempt: with quick redeliveries
        (the local runner; an SQS retry sooner than the holder's throttle retries) a healthy duplicate
        reached the dead-letter queue. A holder that crashed keeps its lease until it lapses: the wait
        ends, the item fails, and a redelivery after the queue's visibility timeout takes the hour over.
        """
        started = asyncio.get_running_loop().time()
        pause, waited = 0.05, 0.0
        while True:
            try:
                return await self._bill_attempts(message, owner, retryable)
            except ClaimHeldError:
                left = budget_left(asyncio.get_running_loop().time(), started)
                if waited + pause > self.holder_wait_seconds or pause > left:
                    raise
            await self.sleep(pause)
            waited += pause
            pause = min(pause * 2, 1.0)

    async def _bill_attempts(
        self, message: BillMessageV1, owner: str, retryable: Callable[[Exception], bool]
    ) -> BillOutcome:
        # The first attempt runs outside a retry context: nearly every bill succeeds at once, and a
        # stamina context costs about 25 us of CPU to set up. Only a retryable failure opens one, whose
        # first attempt re-raises that failure: stamina then logs it, backs off and counts it, exactly
        # as if the context had been open from the start.
        try:
            return await self._bill_once(message, owner)
        except Exception as exc:
            if not retryable(exc):
                raise
            first_failure: Exception | None = exc
        async for attempt in stamina.retry_context(
            on=retryable, attempts=self.attempts, wait_initial=0.05, wait_max=2.0
        ):
            with attempt:
                if first_failure is not None:
                    failure, first_failure = first_failure, None
                    raise failure
                return await self._bill_once(message, owner)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _bill_once(self, message: BillMessageV1, owner: str) -> BillOutcome:
        period = message.billing_period
        window_start = period.shifted(-self.lookback_hours).start
        lease = timedelta(seconds=self.lease_seconds)
        state = await self.repo.load(message.customer_id, period, window_start)
        if state is None:
            raise BadMessageError(f"unknown customer {message.customer_id!r}")
        customer = state.customer
        log_context.add(marketplace=customer.marketplace.value)
        outcome = BillOutcome(customer.id, period, customer.marketplace)
        if message.final_until is not None and customer.active_until != message.final_until:
            # the subscription was reinstated or its end moved since the final bill was sent: the
            # dispatcher bills the hour as usual once it is over (up to whatever end is recorded then)
            outcome.entries = list(state.entries)
            outcome.stale_final_bill = True
            return outcome
        if state.superseded and not state.entries:
            # AWS would bill both records: the license subject of the same account and product bills
            # this hour (see billing.adapters.postgres._superseded); an hour decided before the license
            # arrived is finished as decided
            outcome.superseded = True
            return outcome
        if state.entries and all(e.state.final for e in state.entries):
            outcome.entries = list(state.entries)
            outcome.already_billed = True
            return outcome

        client = await self.marketplace(customer.marketplace)
        expired = self.clock() - period.start > client.rules.window
        if state.entries:
            to_send = await self._resume(state, period, owner, lease, client, expired)
        else:
            to_send = await self._decide(state, message, window_start, owner, lease, client, expired)
        if to_send is None:  # settled without a call (expired hour)
            return await self._as_recorded(outcome, window_start)
        settled = [e for e in to_send if e.state.final]
        sending = [e for e in to_send if not e.state.final]
        results: list[SubmitResult] = []
        if sending:
            try:
                results = await client.submit(customer, period, sending)
                results = await self._resubmit_if_ended(
                    customer, period, window_start, client, sending, results
                )
            except WindowExpiredError as exc:
                # window closed between the check and the call: settle it like an expired hour
                await self.repo.record_results(customer.id, period, owner, _failed(sending, str(exc)))
                await self.repo.expire(customer.id, period, owner, _window_text(client))
                return await self._as_recorded(outcome, window_start)
            outcome.marketplace_calls = -(-len(sending) // client.rules.batch_limit)
            with span("ledger record"):
                await self.repo.record_results(customer.id, period, owner, results)
        by_dim = {r.dimension: r for r in results}
        outcome.entries = settled + [
            replace(
                e,
                state=by_dim[e.dimension].state,
                record_id=by_dim[e.dimension].record_id,
                last_error=by_dim[e.dimension].reason,
            )
            for e in sending
        ]
        failed = [r for r in results if r.retryable]
        if failed:
            reasons = "; ".join(sorted({f"{r.dimension}: {r.reason}" for r in failed}))
            if all(r.throttled for r in failed):
                raise ThrottledError(
                    f"{customer.marketplace} throttled {len(failed)} of {len(results)} records up to the "
                    f"bill's budget: {reasons}",
                    customer.marketplace.value,
                    max((r.retry_after or 0.0 for r in failed), default=0.0) or None,
                )
            raise MarketplaceUnavailableError(
                f"{len(failed)} of {len(results)} records not confirmed by {customer.marketplace}: {reasons}"
            )
        return outcome

    async def _resubmit_if_ended(
        self,
        customer: Customer,
        period: Period,
        window_start: datetime,
        client: MarketplaceClient,
        sending: list[LedgerEntry],
        results: list[SubmitResult],
    ) -> list[SubmitResult]:
        """A refusal for the subject as it stands now (``refused_now``: nothing was sent) of a customer
        loaded without an end: a cancellation recorded since (it can arrive while the bill is in flight)
        ends the subscription after usage that is still to be billed. Submit once more with the customer
        as recorded now; without a recorded end the refusal stands."""
        if customer.active_until is not None or not any(r.refused_now for r in results):
            return results
        fresh = await self.repo.load(customer.id, period, window_start)
        if fresh is None or fresh.customer.active_until is None:
            return results
        return list(await client.submit(fresh.customer, period, sending))

    async def _as_recorded(self, outcome: BillOutcome, window_start: datetime) -> BillOutcome:
        """The outcome as the ledger now records it (after an hour was settled without a call)."""
        reloaded = await self.repo.load(outcome.customer_id, outcome.period, window_start)
        outcome.entries = list(reloaded.entries) if reloaded else []
        return outcome

    async def _decide(
        self,
        state: CustomerHourState,
        message: BillMessageV1,
        window_start: datetime,
        owner: str,
        lease: timedelta,
        client: MarketplaceClient,
        expired: bool,
    ) -> list[LedgerEntry] | None:
        customer = state.customer
        period = message.billing_period
        card = await self.rate_cards.get()
        # usage after the subscription's end instant is never billed (reconcile reports it as
        # unbillable-after-end); the hour of the end is billed up to the instant
        usage_end = period.end
        if customer.active_until is not None:
            usage_end = max(period.start, min(period.end, customer.active_until))
        usage = await self.usage.hourly_usage(customer.id, window_start, usage_end)
        with span("rate usage"):
            # #13: each hour of the look-back is rated with the plan in force during it, and this hour
            # decides its own plan's dimensions (plan_in_force: the plan from the hour it takes effect)
            rated = rate_usage_by_plan(usage, card, customer.marketplace, state.plans)
            plan = plan_in_force(state.plans, period)
            dimensions = billed_dimensions(
                card, customer.marketplace, plan.plan if plan else None, rated, state.observed
            )
            decision = decide(dimensions, rated, state.observed, state.carries)
            if expired:
                decision = _carry_everything(decision)
        entry_states: dict[str, tuple[LedgerState, int]] = {}
        for d in decision.dimensions:
            if expired:
                entry_states[d.dimension] = (LedgerState.EXPIRED, 0)
            elif d.quantity == 0 and not client.rules.sends_zero:
                entry_states[d.dimension] = (LedgerState.SKIPPED, 0)
            else:
                entry_states[d.dimension] = (LedgerState.SUBMITTED, 1)
        with span("ledger write"):
            decided = await self.repo.record_decision(state, message, decision, entry_states, owner, lease)
        if not decided:
            raise ConcurrentDecisionError(f"balances of {customer.id} moved while deciding {period}")
        if expired:
            return None
        return [
            LedgerEntry(
                customer.id,
                d.dimension,
                period,
                d.quantity,
                entry_states[d.dimension][0],
                attempts=entry_states[d.dimension][1],
            )
            for d in decision.dimensions
        ]

    async def _resume(
        self,
        state: CustomerHourState,
        period: Period,
        owner: str,
        lease: timedelta,
        client: MarketplaceClient,
        expired: bool,
    ) -> list[LedgerEntry] | None:
        """The hour was decided before: resubmit exactly what was recorded, never a recomputation."""
        customer = state.customer
        if expired:
            settled = await self.repo.expire(customer.id, period, owner, _window_text(client))
            if settled == 0:
                raise ClaimHeldError(f"{customer.id} {period} is being settled by another delivery")
            return None
        claimed = await self.repo.claim(customer.id, period, owner, lease)
        if claimed is None:
            raise ClaimHeldError(f"{customer.id} {period} is being submitted by another delivery")
        return [e for e in state.entries if e.state.final] + list(claimed)


def _carry_everything(decision: Decision) -> Decision:
    """An hour the marketplace no longer accepts: bill nothing now, carry the whole balance."""
    return Decision(
        dimensions=tuple(
            DimensionDecision(d.dimension, d.rated, d.carry_in, 0, d.carry_in + d.rated)
            for d in decision.dimensions
        ),
        observations=decision.observations,
    )


def _window_text(client: MarketplaceClient) -> str:
    hours = client.rules.window.total_seconds() / 3600
    return f"{hours:g}-hour"


def _failed(entries: Sequence[LedgerEntry], reason: str) -> list[SubmitResult]:
    return [SubmitResult(e.dimension, LedgerState.FAILED, reason=reason) for e in entries]
