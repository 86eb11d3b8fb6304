"""A marketplace's quota, kept by each execution environment: paced calls, throttles retried within budget.

Each lane's quota is per seller account and region (AWS), per producer project (Google) or per publisher
(Azure), shared by the lane's ``MaximumConcurrency`` execution environments; each one handles a single
message at a time (BatchSize 1), so pacing each environment at ``quota / concurrency`` calls a second
keeps the lane's average at the quota without any coordination between environments. Environments that
happen to start a call in the same instant can still exceed it for a moment: those calls are answered
with a throttle, which is retried here with jitter (honouring Retry-After) until the bill's budget is
nearly spent.

Why a throttle may be retried and, at the end, given back to the queue: it provably means "not
processed". AWS documents ThrottlingException as a refused request ("The calls to the API are throttled",
BatchMeterUsage's Errors; retry with backoff, "Error retries and exponential backoff in AWS"); Azure's
429 Too Many Requests carries Retry-After, the time to wait before the same request. Google's 429
RESOURCE_EXHAUSTED on services.report is the exception: its ReportResponse documents a failed RPC as
non-deterministic, so the adapter keeps such records SUBMITTED (never carried); retrying them is still
safe, Google deduplicating on the operationId. A timeout is never a throttle.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, TypeVar

from billing.adapters.bearer_http import sticky
from billing.budget import budget_left

if TYPE_CHECKING:
    import random
    from collections.abc import Awaitable, Callable, Mapping

    from billing.domain.model import SubmitResult

T = TypeVar("T")

# Full-jitter exponential backoff between throttle answers without Retry-After (AWS's "Exponential
# Backoff And Jitter", the architecture blog): a random wait in [0, min(cap, base * 2**n)].
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0


class Pacer:
    """Starts at most ``rate`` calls a second from this execution environment: one every ``1/rate`` s.

    A slot is taken without awaiting (the event loop runs one coroutine at a time), so consumers sharing
    the pacer in one process (the local runner) are paced together, in arrival order.
    """

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next = float("-inf")

    async def wait(self, cost: int = 1) -> None:
        """Wait for this call's slot; a call costing ``cost`` quota units holds ``cost`` slots."""
        if not self.interval:
            return
        now = self._clock()
        slot = max(now, self._next)
        self._next = slot + self.interval * cost
        if slot > now:
            await self._sleep(slot - now)


def per_environment(quota: float, concurrency: int) -> float | None:
    """The pace of one of ``concurrency`` environments sharing ``quota`` calls a second (None: unpaced)."""
    return quota / max(concurrency, 1) if quota > 0 else None


def throttle_wait(retry_after: float | None, retries: int, rng: random.Random) -> float:
    """How long to wait after the ``retries``-th throttle in a row: never sooner than Retry-After."""
    jitter = rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**retries))
    return (retry_after or 0.0) + jitter


async def paced_until_not_throttled(
    send_once: Callable[[Mapping[str, T]], Awaitable[dict[str, SubmitResult]]],
    pending: Mapping[str, T],
    pacer: Pacer,
    rng: random.Random,
    cost: int = 1,
) -> dict[str, SubmitResult]:
    """``send_once(pending)`` in its paced slot, again after every answer that throttled the whole call,
    for as long as the bill's budget allows; the answers are folded with ``sticky`` (a record an earlier
    answer may have delivered stays SUBMITTED)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    answers: dict[str, SubmitResult] = {}
    retries = 0
    while True:
        await pacer.wait(cost)
        latest = await send_once(pending)
        answers = {d: sticky(answers.get(d), r) for d, r in latest.items()}
        if not latest or not all(r.throttled for r in latest.values()):
            return answers
        retry_after = max((r.retry_after or 0.0 for r in latest.values()), default=0.0)
        wait = throttle_wait(retry_after, retries, rng)
        if wait > budget_left(loop.time(), started):
            return answers  # the Biller gives the message back to its lane (ThrottledError)
        retries += 1
        _announce(retries, wait, next(iter(latest.values())).reason)
        await asyncio.sleep(wait)


class ThrottleAnswer(Exception):
    """The marketplace's throttle answer, as the retry log line shows it."""


def _announce(retry_num: int, wait: float, reason: str | None) -> None:
    """Tell stamina's retry hooks (the biller's log line, with the bill's keys) about a throttle retry."""
    from stamina.instrumentation import RetryDetails, get_on_retry_hooks

    details = RetryDetails(
        name="throttled",
        args=(),
        kwargs={},
        retry_num=retry_num,
        wait_for=wait,
        waited_so_far=0.0,
        caused_by=ThrottleAnswer(reason or "throttled"),
    )
    for hook in get_on_retry_hooks():
        hook(details)
