"""AWS Marketplace through aioboto3 `meteringmarketplace.batch_meter_usage`.

Two identities, never mixed (AWS Marketplace Metering API reference, BatchMeterUsage, 2026):
- license-based (SaaS listings since June 2026, "Concurrent Agreements": one AWS account may hold
  several agreements for one product): each UsageRecord carries ``LicenseArn`` and
  ``CustomerAWSAccountId``, and the request has NO ``ProductCode``;
- legacy: the request carries ``ProductCode`` and each record ``CustomerIdentifier`` (or
  ``CustomerAWSAccountId``).
AWS: "Sending metering records with both ProductCode and LicenseArn for the same customer within the
same hour will result in duplicate billing." A subject that has a license ARN is therefore metered by
license only, for every hour, whatever legacy identifiers it also carries.

The pinned botocore (1.40.61, through aioboto3 15.5.0) has neither ``LicenseArn`` nor an optional
``ProductCode`` in its model: `use_shipped_models` puts the newer model shipped in the layer
(billing/botocore_data, from botocore 1.43.115) first on the session's data-loader search path.
"""

from __future__ import annotations

import random
import socket
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from billing import log_context
from billing.adapters.bearer_http import submit_until_settled
from billing.adapters.pacing import Pacer, paced_until_not_throttled
from billing.domain.errors import PermanentError, WindowExpiredError
from billing.domain.model import LedgerState, Marketplace, SubmitResult
from billing.ports import MarketplaceRules

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

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
        # a LicenseArn that is not valid, not the customer's, or past its activation period (2026 model)
        "InvalidLicenseException",
        "InvalidTagException",
        "InvalidUsageAllocationsException",
        "DisabledApiException",
        "ValidationException",
        "AccessDeniedException",
    }
)
# the request certainly was not processed: safe to retry and, later, to carry
_DEFINITE_TRANSIENT_CODES = frozenset({"ThrottlingException", "ThrottledException", "RequestLimitExceeded"})
# the hour is outside AWS's 6-hour window: nothing in the request was taken, and retrying cannot help
_OUT_OF_BOUNDS = "TimestampOutOfBoundsException"

# botocore's data layout (<service>/<api-version>/service-2.json); see botocore_data/NOTICE.md
SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "botocore_data"


def use_shipped_models(session: Any) -> Any:
    """Put the layer's service models first on ``session``'s botocore data-loader search path.

    ``session`` is an aioboto3/boto3 Session or a botocore/aiobotocore one. botocore's Loader looks a
    model up in its search paths in order (the first that holds ``<service>/<version>/service-2.json``
    wins; the bundled data come last), so only the shipped services change, and only for this session:
    not the process-wide ``AWS_DATA_PATH``. Call it before the session's first client is created
    (the loader caches what it loaded).
    """
    core = getattr(session, "_session", session)
    loader = core.get_component("data_loader")
    path = str(SHIPPED_MODELS)
    if path not in loader.search_paths:
        loader.search_paths.insert(0, path)
    return session


def identity(customer: Customer) -> tuple[dict[str, str], dict[str, str]]:
    """(request-level, record-level) identity fields of a customer's BatchMeterUsage call.

    A license subject gets ``LicenseArn`` + ``CustomerAWSAccountId`` on each record and no
    ``ProductCode``; any other gets ``ProductCode`` and its legacy identifier. Never both.
    """
    if customer.aws_license_arn:
        if not customer.aws_account_id:
            raise PermanentError(f"customer {customer.id} has a license ARN but no AWS account id")
        return {}, {"LicenseArn": customer.aws_license_arn, "CustomerAWSAccountId": customer.aws_account_id}
    if not customer.aws_product_code:
        raise PermanentError(f"customer {customer.id} has neither an AWS license ARN nor a product code")
    if customer.aws_customer_identifier:
        return {"ProductCode": customer.aws_product_code}, {
            "CustomerIdentifier": customer.aws_customer_identifier
        }
    if customer.aws_account_id:
        return {"ProductCode": customer.aws_product_code}, {"CustomerAWSAccountId": customer.aws_account_id}
    raise PermanentError(f"customer {customer.id} has no AWS customer identifier or account id")


class AwsMeteringClient:
    """One BatchMeterUsage call per 25 records, retried here with backoff and jitter (see _submit_chunk)."""

    marketplace = Marketplace.AWS
    rules = RULES

    def __init__(self, client: Any, attempts: int, pacer: Pacer | None = None) -> None:
        self._client = client
        self._attempts = attempts
        # BatchMeterUsage: 10 requests a second per account and region (Marketplace Metering Service
        # quotas), shared by the lane's environments: billing.adapters.pacing
        self._pacer = pacer or Pacer(None)
        self._rng = random.Random()

    async def submit(
        self, customer: Customer, period: Period, entries: Sequence[LedgerEntry]
    ) -> list[SubmitResult]:
        identity(customer)  # a customer without a usable identity is refused before any call
        results: list[SubmitResult] = []
        for start in range(0, len(entries), RULES.batch_limit):
            chunk = entries[start : start + RULES.batch_limit]
            results.extend(await self._submit_chunk(customer, period, chunk))
        # Settled as expired only when every record was refused as out of bounds and no attempt of the
        # hour may have delivered it (sticky() turns such a refusal into SUBMITTED); otherwise each record
        # keeps its own answer: an accepted one stays accepted, an unconfirmed one is never carried.
        if results and all(_out_of_bounds(r) and r.state is LedgerState.FAILED for r in results):
            raise WindowExpiredError(f"AWS: {results[0].reason}")
        return results

    async def _submit_chunk(
        self, customer: Customer, period: Period, chunk: Sequence[LedgerEntry]
    ) -> list[SubmitResult]:
        # Retried here, not by botocore (the client has one attempt a call): only here is each attempt's
        # outcome known, so an attempt whose answer was lost keeps the record 'submitted' (sticky) even
        # when a later attempt is refused outright.
        entries = {e.dimension: e for e in chunk}

        async def send(pending: Mapping[str, LedgerEntry]) -> dict[str, SubmitResult]:
            return await self._send(customer, period, list(pending.values()))

        async def send_once(pending: Mapping[str, LedgerEntry]) -> dict[str, SubmitResult]:
            # throttles are retried in there, within the bill's budget, without spending an attempt
            return await paced_until_not_throttled(send, pending, self._pacer, self._rng)

        with log_context.bound(operation="BatchMeterUsage"):
            answered = await submit_until_settled(
                send_once,
                entries,
                self._attempts,
                lambda r: not r.retryable or _out_of_bounds(r) or r.throttled,
            )
        return [answered[e.dimension] for e in chunk]

    async def _send(
        self, customer: Customer, period: Period, entries: list[LedgerEntry]
    ) -> dict[str, SubmitResult]:
        def every(state: LedgerState, reason: str, throttled: bool = False) -> dict[str, SubmitResult]:
            return {
                e.dimension: SubmitResult(e.dimension, state, reason=reason, throttled=throttled)
                for e in entries
            }

        request, who = identity(customer)
        try:
            response = await self._client.batch_meter_usage(
                **request, UsageRecords=[_record(who, period, e) for e in entries]
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            message = exc.response.get("Error", {}).get("Message", "")
            if code == _OUT_OF_BOUNDS:
                return every(LedgerState.FAILED, f"{code}: {message}")
            if code in _PERMANENT_CODES:
                return every(LedgerState.REJECTED, f"{code}: {message}")
            if code in _DEFINITE_TRANSIENT_CODES:
                return every(LedgerState.FAILED, f"{code}: {message}", throttled=True)
            # InternalServiceErrorException and anything unknown: it may have been recorded
            return every(LedgerState.SUBMITTED, f"{code}: {message}")
        except ParamValidationError as exc:
            # botocore checks the request against the service model before it opens a connection: nothing
            # was sent, and the same request would be refused again
            return every(LedgerState.REJECTED, f"ParamValidationError before sending: {exc}")
        except (BotoCoreError, OSError, TimeoutError) as exc:
            if never_sent(exc):
                return every(LedgerState.FAILED, _wire_reason(exc, "before sending"))
            # a reset, a close or a read timeout after the request may have been written: AWS may hold it
            return every(LedgerState.SUBMITTED, _wire_reason(exc, "after sending"))
        answered = every(LedgerState.FAILED, "UnprocessedRecords")  # what AWS did not answer for
        for result in response.get("Results", []):
            dimension = result["UsageRecord"]["Dimension"]
            answered[dimension] = _result(dimension, result)
        return answered


# The transport errors that provably happened before a byte of the request was written: aiohttp raises
# them from the connector (DNS, TCP connect, TLS handshake, a proxy's CONNECT, waiting for a pooled
# connection) or around it (ConnectionTimeoutError); the request is written only once it has a connection.
_BEFORE_SENDING = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, socket.gaierror)


def never_sent(exc: BaseException) -> bool:
    """Whether a failed BatchMeterUsage call provably sent nothing (only then may it count as not taken).

    Judged by the aiohttp error underneath, never by botocore's class: aiobotocore (httpsession.py) maps a
    refused connect and a connection reset while the answer is read to the same EndpointConnectionError,
    and a connect timeout by the text of aiohttp's message; it passes the aiohttp error as ``error``.
    """
    cause = getattr(exc, "kwargs", {}).get("error") if isinstance(exc, BotoCoreError) else exc
    return isinstance(cause, _BEFORE_SENDING)


def _wire_reason(exc: BaseException, when: str) -> str:
    """``EndpointConnectionError after sending: ClientOSError: [Errno 104] Connection reset by peer``."""
    cause = getattr(exc, "kwargs", {}).get("error") if isinstance(exc, BotoCoreError) else None
    return f"{type(exc).__name__} {when}: {type(cause or exc).__name__}: {cause or exc}"


def _out_of_bounds(result: SubmitResult) -> bool:
    return (result.reason or "").startswith(_OUT_OF_BOUNDS)


def _record(who: Mapping[str, str], period: Period, entry: LedgerEntry) -> dict[str, Any]:
    # The timestamp is the hour's start, so a resubmission is the identical request.
    return {"Timestamp": period.start, "Dimension": entry.dimension, "Quantity": entry.quantity, **who}


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
