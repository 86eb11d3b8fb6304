"""How many stamina retry contexts a bill opens, and that retrying the whole bill still works.

Real PostgreSQL and the AWS Marketplace Metering emulator (an HTTP double of BatchMeterUsage that
follows AWS's documented behaviour), the real aioboto3 client over HTTP. stamina is in testing mode
(tests/conftest.py): three attempts, no waits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import stamina
import stamina.instrumentation

from billing.bootstrap import Runtime, Wrappers
from billing.config import load_settings
from billing.domain.errors import TransientError
from billing_local.faults import Proxy
from testkit import HOUR, PRODUCT, add_aws_customer, add_rates, add_usage, message, within_window

if TYPE_CHECKING:
    from stamina.instrumentation import RetryDetails

    from billing.services.bill import Biller


class FlakyLoad(Proxy):
    """The repository, whose ``load`` raises a TransientError the first ``times`` calls."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.times = 0
        self.calls: list[int] = []

    async def load(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(1)
        if len(self.calls) <= self.times:
            raise TransientError("connection to the database lost")
        return await self.inner.load(*args, **kwargs)


@pytest.fixture
async def biller(stack: Any, pool: Any) -> AsyncIterator[Biller]:
    stack.metering.clock = within_window
    runtime = Runtime(load_settings(), clock=within_window, wrappers=Wrappers(repository=FlakyLoad))
    await add_rates(pool)
    stack.metering.add_product(PRODUCT, {"CapacityGbHours", "DataTransferGb"})
    stack.metering.subscribe(PRODUCT, await add_aws_customer(pool, "c1"))
    await add_usage(pool, "c1", HOUR.start, "capacity_gb_hours", "3")
    yield await runtime.biller()
    await runtime.close()


@pytest.fixture
def contexts_opened(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every stamina.retry_context opened (the adapters and the service look it up per call)."""
    opened: list[int] = []
    original = stamina.retry_context

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(stamina, "retry_context", counting)
    return opened


@pytest.fixture
def retries() -> Iterator[list[RetryDetails]]:
    """The retries stamina reports to its hooks (the biller's own hook logs them)."""
    seen: list[RetryDetails] = []
    hooks = stamina.instrumentation.get_on_retry_hooks()
    stamina.instrumentation.set_on_retry_hooks([*hooks, seen.append])
    yield seen
    stamina.instrumentation.set_on_retry_hooks(hooks)


def _load_failing(biller: Biller, times: int) -> list[int]:
    """The repository's load raises a TransientError ``times`` times, then works; returns its calls."""
    repo = biller.repo
    assert isinstance(repo, FlakyLoad)
    repo.times = times
    return repo.calls


async def test_a_bill_that_succeeds_at_once_opens_no_retry_context(
    biller: Biller, contexts_opened: list[int], stack: Any
) -> None:
    # When a customer-hour is billed and every call succeeds the first time
    outcome = await biller.bill(message("c1"))
    # Then neither the whole bill nor the marketplace adapter opened a retry context
    assert outcome.marketplace_calls == 1 and len(stack.metering.accepted()) == 2
    assert len(contexts_opened) == 0


async def test_a_marketplace_call_left_unconfirmed_is_retried_in_one_context_and_reported(
    biller: Biller, contexts_opened: list[int], retries: list[RetryDetails], stack: Any
) -> None:
    # Given AWS answers the first BatchMeterUsage with an internal error (it may have recorded it)
    stack.metering.faults.append("internal")
    # When the customer-hour is billed
    outcome = await biller.bill(message("c1"))
    # Then the adapter sent the records again in the one retry context it opened, stamina reported
    # the retry, and AWS holds both records
    assert stack.metering.calls == 2 and len(stack.metering.accepted()) == 2
    assert len(contexts_opened) == 1
    assert [r.retry_num for r in retries] == [1]
    assert not outcome.already_billed


async def test_a_transient_failure_of_the_first_attempt_is_retried_and_reported(
    biller: Biller, retries: list[RetryDetails], stack: Any
) -> None:
    # Given the database fails the first attempt's first query
    calls = _load_failing(biller, times=1)
    # When the customer-hour is billed
    outcome = await biller.bill(message("c1"))
    # Then the second attempt bills it, and stamina reported the retry with its cause
    assert not outcome.already_billed and len(stack.metering.accepted()) == 2
    assert len(calls) == 2
    assert [(r.retry_num, type(r.caused_by)) for r in retries] == [(1, TransientError)]


async def test_a_bill_failing_every_attempt_makes_exactly_the_configured_attempts(
    biller: Biller, retries: list[RetryDetails], stack: Any
) -> None:
    # Given the database fails every attempt
    calls = _load_failing(biller, times=100)
    # When the customer-hour is billed, the failure is raised (SQS will redeliver the message)
    with pytest.raises(TransientError):
        await biller.bill(message("c1"))
    # Then there were three attempts (stamina's testing mode), two of them reported as retries
    assert len(calls) == 3
    assert [r.retry_num for r in retries] == [1, 2]
    assert stack.metering.calls == 0
