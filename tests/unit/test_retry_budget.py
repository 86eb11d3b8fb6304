"""One Biller invocation, every retry included, ends before the function's Timeout in template.yaml.

The worst case is computed from the template (the Biller's Timeout and environment) and the settings
it gives, with the retry structure of the code:

- the Biller retries a bill (``Biller.attempts``, stamina: waits min(2 s, 0.05 s x 2^k + up to 1 s of
  jitter), and stamina stops starting attempts after its default 45 s, but lets a started one finish);
- each bill makes 4 database round trips (asyncpg ``command_timeout`` 30 s each) and one marketplace
  submission, which the adapter retries ``BILLING_MARKETPLACE_ATTEMPTS`` times the same way, each
  attempt bounded by botocore's connect + read timeouts (AWS, the cheapest case: Google adds a token
  fetch and a services.check loop, Azure a token fetch whose azure-core timeouts are 300 s);
- the invocation budget (``BILLING_INVOCATION_BUDGET_SECONDS``) cuts all of it short, then the bill
  unwinds: its failure's log and metrics, connections returned to the pool. It counts from the
  invocation's start, so a cold start's pool (asyncpg's 60 s connect timeout, twice after a refused
  password) and the Google and Azure adapters, built on their first bill, are inside it
  (tests/integration/test_cold_start_budget.py, tests/unit/test_biller.py). The database secret read at
  module init falls under Lambda's init phase, not the invocation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from billing.config import Settings, load_settings
from billing_local.template import function_config

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"

# the code's retry structure (shared/billing/services/bill.py, adapters/bearer_http.py, bootstrap.py)
BILL_ATTEMPTS = 3
WAIT_INITIAL, WAIT_MAX, JITTER, STAMINA_TIMEOUT = 0.05, 2.0, 1.0, 45.0
DB_ROUND_TRIPS, DB_COMMAND_TIMEOUT = 4, 30.0
AWS_CONNECT_TIMEOUT, AWS_READ_TIMEOUT = 5.0, 15.0
# after the budget: the failure's log line and EMF document, and the cancelled connection back in the pool
UNWIND_SECONDS = 10.0


def retried(attempts: int, attempt_seconds: float) -> float:
    """The longest a stamina retry loop can run: every attempt at its longest, every wait at its longest,
    unless stamina's timeout stops it first (an attempt begun just before that still runs to its end)."""
    waits = [min(WAIT_MAX, WAIT_INITIAL * 2**k + JITTER) for k in range(attempts - 1)]
    serial = attempts * attempt_seconds + sum(waits)
    return min(serial, STAMINA_TIMEOUT + max(waits, default=0.0) + attempt_seconds)


def worst_case(template: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[float, float, int, Settings]:
    """(worst case of one Biller invocation without the budget, with it, its Timeout, its settings)."""
    config = function_config(template, "Biller")
    # the settings as the deployed Biller reads them: the template's environment and nothing else
    for name in [n for n in os.environ if n.startswith("BILLING_")]:
        monkeypatch.delenv(name)
    for name, value in config.environment.items():
        if name.startswith("BILLING_") and value is not None:
            monkeypatch.setenv(name, value)
    settings = load_settings()
    marketplace = retried(settings.marketplace_attempts, AWS_CONNECT_TIMEOUT + AWS_READ_TIMEOUT)
    one_bill = DB_ROUND_TRIPS * DB_COMMAND_TIMEOUT + marketplace
    unbounded = retried(BILL_ATTEMPTS, one_bill)
    bounded = min(unbounded, settings.invocation_budget_seconds) + UNWIND_SECONDS
    return unbounded, bounded, config.timeout, settings


def test_one_biller_invocation_ends_before_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    _, worst, timeout, _ = worst_case(TEMPLATE, monkeypatch)
    # (without the budget the retries alone could run for 232 s with today's settings)
    assert worst <= timeout, f"a Biller invocation may run {worst:.0f} s, its Timeout is {timeout} s"


def test_the_lease_outlives_the_invocation_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # no second delivery may start submitting the customer-hour while this one still can
    *_, settings = worst_case(TEMPLATE, monkeypatch)
    assert settings.invocation_budget_seconds < settings.lease_seconds


def test_a_template_whose_timeout_is_too_short_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the template with the Biller's Timeout lowered to 50 s (budget 45 s + 10 s to unwind > 50)
    copy = tmp_path / "template.yaml"
    text = TEMPLATE.read_text()
    biller = text.index("  BillerFunction:")
    lowered = text[:biller] + re.sub(r"Timeout: \d+", "Timeout: 50", text[biller:], count=1)
    copy.write_text(lowered)
    _, worst, timeout, _ = worst_case(copy, monkeypatch)
    assert timeout == 50
    with pytest.raises(AssertionError):
        assert worst <= timeout
