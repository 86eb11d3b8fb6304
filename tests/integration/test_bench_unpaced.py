"""The bench sections that time a bill's own cost run unpaced (bench/env.py UNPACED_ENV).

Since the lanes' quota pacing landed, every Runtime built from the default settings waits ~111 ms between
AWS calls; the profile, Lambda, scheduling and cost sections timed that wait instead of the bill.
"""

from __future__ import annotations

import pytest
from bench.__main__ import UNPACED_SECTIONS
from bench.env import UNPACED_ENV

from billing.config import Settings
from billing.domain.model import Marketplace


def test_the_unpaced_environment_turns_every_lanes_pace_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the defaults (AWS paced at its documented 10 calls a second), then the bench's overrides
    assert Settings().pace(Marketplace.AWS.value) is not None
    for name, value in UNPACED_ENV.items():
        monkeypatch.setenv(name, value)
    # Then no marketplace is paced
    assert {m: Settings().pace(m.value) for m in Marketplace} == dict.fromkeys(Marketplace)


def test_the_sections_that_time_a_bill_run_unpaced() -> None:
    assert {"profile", "lambda", "scheduling", "cost"} <= set(UNPACED_SECTIONS)
    # the sections that measure the pace itself keep it
    assert not {"quota", "lanes"} & set(UNPACED_SECTIONS)
