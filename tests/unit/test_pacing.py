"""Pacing a lane's calls to its quota, the throttle waits, and the emulators' quota (no sockets)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from billing.adapters.bearer_http import retry_after_seconds
from billing.adapters.pacing import Pacer, per_environment, throttle_wait
from billing.config import Settings
from billing_local.emulators.quota import Quota


class FakeTime:
    """A monotonic clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_calls_of_one_environment_start_one_interval_apart() -> None:
    # Given a pace of 4 calls a second
    t = FakeTime()
    pacer = Pacer(4.0, clock=t.clock, sleep=t.sleep)

    # When five calls ask for their slot at once (consumers sharing the process)
    async def five() -> list[float]:
        starts = []
        for _ in range(5):
            await pacer.wait()
            starts.append(t.now)
        return starts

    starts = asyncio.run(five())
    # Then they start a quarter of a second apart: at most 4 in any second
    assert [round(s - starts[0], 6) for s in starts] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_call_costing_several_units_holds_several_slots() -> None:
    t = FakeTime()
    pacer = Pacer(10.0, clock=t.clock, sleep=t.sleep)

    async def two() -> None:
        await pacer.wait(cost=5)  # a report of 5 operations (Google counts a unit per operation)
        await pacer.wait()

    asyncio.run(two())
    assert [round(s, 6) for s in t.slept] == [0.5]


def test_without_a_quota_nothing_waits() -> None:
    t = FakeTime()
    pacer = Pacer(None, clock=t.clock, sleep=t.sleep)
    asyncio.run(pacer.wait())
    asyncio.run(pacer.wait())
    assert t.slept == []


def test_each_environment_paces_at_the_quota_over_the_lanes_concurrency() -> None:
    # AWS: 10 BatchMeterUsage a second per account and region, shared by the lane's 10 environments
    assert per_environment(10.0, 10) == 1.0
    assert per_environment(10.0, 50) == 0.2
    assert per_environment(0.0, 10) is None
    settings = Settings(aws_quota_per_second=10, aws_lane_environments=20, pace_headroom=1.0)
    assert settings.pace("aws") == 0.5
    assert Settings(aws_quota_per_second=10, aws_lane_environments=20).pace("aws") == 0.45
    assert settings.pace("azure") is None  # no documented rate: unpaced


def test_a_throttle_is_never_retried_before_its_retry_after() -> None:
    rng = random.Random(1)
    waits = [throttle_wait(3.0, n, rng) for n in range(20)]
    assert all(3.0 <= w <= 5.0 for w in waits)
    assert len({round(w, 6) for w in waits}) == 20  # jittered: environments do not retry in step


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    now = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds(later, now=now.timestamp) == 30.0


def test_the_emulated_quota_refuses_the_call_past_the_rate_and_counts_it() -> None:
    # Given an account quota of 2 calls a second, and a clock the test moves
    t = FakeTime()
    quota = Quota(rate=2, clock=t.clock)
    # When three calls arrive in the same instant
    answers = [quota.admit("AKID") for _ in range(3)]
    # Then the third is refused, told to wait until the window has room, and counted
    assert answers == [None, None, 1.0]
    assert (quota.admitted, quota.refused) == (2, 1)
    # and another account has its own quota
    assert quota.admit("OTHER") is None
    # and a second later the window has room again
    t.now += 1.0
    assert quota.admit("AKID") is None
    assert quota.max_arrivals_per_second() == 4
