"""AWS Marketplace through aioboto3 `meteringmarketplace.batch_meter_usage`."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import stamina
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError

from billing.domain.errors import PermanentError, WindowExpiredError
from billing.domain.model import LedgerState, Marketplace, SubmitResult
from billing.ports import MarketplaceRules

if TYPE_CHECKING:
    from collections.abc import Sequence

    from billing.domain.model import Customer, LedgerEntry, Period

RULES = MarketplaceRules(
    batch_limit=25,
    window=timedelta(hours=6),
    sends_zero=True,  # AWS asks for a record every hour, zero included
    idempotency_key="customer, dimension, timestamp (an identical record is accepted again with its id)",
)

# errors that say the request itself is wrong: retrying the same request cannot help
_PERMANENT_CODES = frozenset(
    {
        "InvalidProductCodeException",
        "InvalidUsageDimensionException",
        "InvalidCustomerIdentifierException",
        "InvalidTagException",
        "InvalidUsageAllocationsException",
        "DisabledApiException",
        "ValidationException",
        "AccessDeniedException",
    }
)
# the request certainly was not processed: safe to retry and, later, to carry
_DEFINITE_TRANSIENT_CODES = frozenset({"ThrottlingException", "ThrottledException", "RequestLimitExceeded"})


class _Unprocessed(Exception):
    """Some records came back in UnprocessedRecords."""


class AwsMeteringClient:
    """One BatchMeterUsage call per 25 records; botocore retries throttling and 5xx itself."""

    marketplace = Marketplace.AWS
    rules = RULES

    def __init__(self, client: Any, attempts: int) -> None:
        self._client = client
        self._attempts = attempts

    async def submit(
        self, customer: Customer, period: Period, entries: Sequence[LedgerEntry]
    ) -> list[SubmitResult]:
        if not customer.aws_product_code:
            raise PermanentError(f"customer {customer.id} has no AWS product code")
        results: list[SubmitResult] = []
        for start in range(0, len(entries), RULES.batch_limit):
            chunk = entries[start : start + RULES.batch_limit]
            results.extend(await self._submit_chunk(customer, period, chunk))
        return results

    async def _submit_chunk(
        self, customer: Customer, period: Period, chunk: Sequence[LedgerEntry]
    ) -> list[SubmitResult]:
        pending = {e.dimension: e for e in chunk}
        answered: dict[str, SubmitResult] = {}
        try:
            async for attempt in stamina.retry_context(
                on=_Unprocessed, attempts=self._attempts, wait_initial=0.05, wait_max=2.0
            ):
                with attempt:
                    response = await self._client.batch_meter_usage(
                        ProductCode=customer.aws_product_code,
                        UsageRecords=[_record(customer, period, e) for e in pending.values()],
                    )
                    for result in response.get("Results", []):
                        dimension = result["UsageRecord"]["Dimension"]
                        answered[dimension] = _result(dimension, result)
                        pending.pop(dimension, None)
                    if pending:
                        raise _Unprocessed
        except _Unprocessed:
            answered.update(
                {
                    d: SubmitResult(d, LedgerState.FAILED, reason="UnprocessedRecords after retries")
                    for d in pending
                }
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            message = exc.response.get("Error", {}).get("Message", "")
            if code == "TimestampOutOfBoundsException":
                raise WindowExpiredError(f"AWS: {code}: {message}") from exc
            if code in _PERMANENT_CODES:
                state = LedgerState.REJECTED
            elif code in _DEFINITE_TRANSIENT_CODES:
                state = LedgerState.FAILED
            else:  # InternalServiceErrorException and anything unknown: it may have been recorded
                state = LedgerState.SUBMITTED
            answered.update({d: SubmitResult(d, state, reason=f"{code}: {message}") for d in pending})
        except (EndpointConnectionError, ConnectTimeoutError) as exc:
            # the request never reached AWS
            answered.update(
                {d: SubmitResult(d, LedgerState.FAILED, reason=type(exc).__name__) for d in pending}
            )
        except (BotoCoreError, OSError, TimeoutError) as exc:
            # a read timeout or dropped connection after sending: the answer is unknown
            answered.update(
                {d: SubmitResult(d, LedgerState.SUBMITTED, reason=type(exc).__name__) for d in pending}
            )
        return [answered[e.dimension] for e in chunk]


def _record(customer: Customer, period: Period, entry: LedgerEntry) -> dict[str, Any]:
    # The timestamp is the hour's start, so a resubmission is the identical request.
    record: dict[str, Any] = {
        "Timestamp": period.start,
        "Dimension": entry.dimension,
        "Quantity": entry.quantity,
    }
    if customer.aws_customer_identifier:
        record["CustomerIdentifier"] = customer.aws_customer_identifier
    else:
        record["CustomerAWSAccountId"] = customer.aws_account_id
    return record


def _result(dimension: str, result: dict[str, Any]) -> SubmitResult:
    status = result.get("Status")
    record_id = result.get("MeteringRecordId")
    if status == "Success":
        return SubmitResult(dimension, LedgerState.ACCEPTED, record_id=record_id)
    if status == "DuplicateRecord":
        return SubmitResult(
            dimension,
            LedgerState.DUPLICATE,
            record_id=record_id,
            reason="DuplicateRecord: AWS already holds a record with another quantity for this hour",
        )
    if status == "CustomerNotSubscribed":
        return SubmitResult(dimension, LedgerState.REJECTED, reason="CustomerNotSubscribed")
    return SubmitResult(dimension, LedgerState.SUBMITTED, reason=f"unknown status {status!r}")
