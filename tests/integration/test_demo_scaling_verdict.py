"""bench/demo_scaling.py's verdict: a demo that failed is a MISS, whatever its time says.

(It imports bench/, so it lives outside tests/unit.)
"""

from __future__ import annotations

from bench.demo_scaling import DemoRun, ScalingParams, verdict

PARAMS = ScalingParams(small=300, large=3_000, baseline=10)


def _runs(small_s: float, large_s: float, large_rc: int = 0, tail: str = "") -> dict[int, DemoRun]:
    return {
        10: DemoRun(10, 5.0, 0),
        300: DemoRun(300, small_s, 0),
        3_000: DemoRun(3_000, large_s, large_rc, tail),
    }


def test_a_large_demo_that_died_early_is_a_miss_with_its_exit_code_and_error() -> None:
    # Given a 3,000-customer demo that died after 20 s (faster per customer than the 300 one)
    runs = _runs(35.0, 20.0, large_rc=1, tail="...\nerror: SQS unreachable: ReadTimeoutError\n")
    judged = verdict(runs, PARAMS)
    # Then the ratio looks fine, but the verdict is a MISS that says why
    assert judged.ratio is not None and judged.ratio < 1.3
    assert judged.ok is False
    said = "`billing demo --customers 3000` exited 1: error: SQS unreachable: ReadTimeoutError"
    assert said in judged.reason


def test_demos_that_succeed_pass_within_the_target_and_miss_beyond_it() -> None:
    # 0.1 s per customer at 300; 0.12 (1.2 x) and then 0.15 (1.5 x) at 3,000
    within = verdict(_runs(35.0, 365.0), PARAMS)
    beyond = verdict(_runs(35.0, 455.0), PARAMS)
    assert within.ok is True and within.reason == ""
    assert beyond.ok is False and "1.50 x > 1.3 x" in beyond.reason
