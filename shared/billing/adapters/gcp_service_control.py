"""Google Cloud Marketplace through Service Control v1 (REST): ``services.check``, then ``services.report``.

The request and response shapes are Google's discovery document ``servicecontrol:v1`` (revision 20261015,
copied in tests/fixtures/specs). The rules it leaves out come from Google's documentation:

- Report flow (cloud.google.com/marketplace/docs/partners/integrated-saas/configure-usage-reports): "you must
  first make a services.check API call ... if the checkErrors[] object is empty, make a services.report API
  call"; ``consumerId`` "is the same as the usageReportingId from the entitlement" (sent verbatim, never
  rewritten to ``project:<id>``); use "the same operationId for your check and report operations"; the
  example operation is named "Hourly Usage Report" and runs ``startTime``..``endTime`` over the hour; the
  startTime of a report "should have the same value as the endTime of the previous report Operation", so
  every hour is reported, zero included (``sends_zero``). Its example names the metric
  ``<product>/<metric>``; Google's own reporting agent (GoogleCloudPlatform/ubbagent,
  endpoint/servicecontrol/servicecontrol.go) and its SaaS codelab use ``<serviceName>/<metric>``, as here.
- Labels (…/integrated-saas/best-practices-labeling): the reserved userLabels
  ``cloudmarketplace.googleapis.com/resource_name`` and ``…/container_name`` reach the customer's Cloud
  Billing cost reports; values follow the resource-label syntax (lowercase letters, digits, ``_``, ``-``,
  at most 63 characters). We bill per customer account, which is the container; there is no finer resource.
- Lateness (…/integrated-saas/best-practices-reporting): "Service providers must report usage within one
  hour of the usage being generated"; usage after a cancellation is reported "with a timestamp that
  reflects the actual time ... before the entitlement was canceled". Service Control documents no rejection
  of a late report, so nothing here raises WindowExpiredError: the window is the biller's rule (RULES).
- services.check (method description): "the client should cache the check results and reuse them for 60
  seconds. In case of any server errors, the client should rely on the cached results for much longer time".
- ReportResponse.reportErrors: one item per Operation "that failed processing"; the rest succeeded. "A
  failed RPC status indicates a general non-deterministic failure ... impossible to know which of the
  'Operations' in the request succeeded or failed": so HTTP 429/5xx on report is SUBMITTED, not FAILED.
- Operation.operationId: "In scenarios where an operation is computed from existing information and an
  idempotent id is desirable for deduplication purpose, UUID version 5 is recommended." Google documents no
  distinct answer for a deduplicated operation: a resubmission is answered like the first report (no
  reportError), so it is ACCEPTED with the same record id, the operationId. An ALREADY_EXISTS reportError,
  should Google ever send one, means it holds the operation: DUPLICATE.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import stamina
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing import log_context
from billing.adapters.bearer_http import (
    FixedToken,
    MaybeSentError,
    NotSentError,
    SecretRead,
    SecretReloader,
    TokenSource,
    TokenUnavailableError,
    post_json,
    retry_after_seconds,
    submit_until_settled,
)
from billing.adapters.pacing import Pacer, paced_until_not_throttled
from billing.domain.errors import ConfigurationError, PermanentError
from billing.domain.model import HOUR, LedgerState, Marketplace, SubmitResult
from billing.ports import MarketplaceRules

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from billing.domain.model import Customer, LedgerEntry, Period

SCOPE = "https://www.googleapis.com/auth/servicecontrol"
OPERATION_NAME = "Hourly Usage Report"
# Fixed for ever: a new namespace would give every hour new operationIds and defeat Google's deduplication.
OPERATION_NAMESPACE = uuid.UUID("6f4f1d8e-3c2a-5b7e-9a41-0d2c8e6b7a53")
REPORT_WITHIN = timedelta(hours=1)  # Google: "within one hour of the usage being generated"
CHECK_FRESH = 60.0  # seconds: Google's "reuse them for 60 seconds"
CHECK_STALE = 3600.0  # seconds a verdict still stands in for a check that met server errors
CONTAINER_NAME_LABEL = "cloudmarketplace.googleapis.com/container_name"

RULES = MarketplaceRules(
    # No documented count limit: "the ReportRequest size should be no larger than 1MB". 100 operations of
    # about 600 bytes stay far below it.
    batch_limit=100,
    # The biller measures the window from the hour's start; an hour's usage is generated until its end and
    # is due within one hour of that.
    window=HOUR + REPORT_WITHIN,
    sends_zero=True,
    idempotency_key="operationId: UUIDv5 of customer, dimension and hour; Service Control deduplicates it",
)

# google.rpc.Code values of a per-operation reportError that say "not processed this time, retry":
# CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNAVAILABLE
_TRANSIENT_CODES = frozenset({1, 2, 4, 8, 10, 13, 14})
_ALREADY_EXISTS = 6
_RPC_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
    10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
    15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}  # fmt: skip
# CheckError codes that report a Google backend outage, not a verdict on the consumer
_CHECK_UNAVAILABLE = frozenset(
    {
        "NAMESPACE_LOOKUP_UNAVAILABLE",
        "SERVICE_STATUS_UNAVAILABLE",
        "BILLING_STATUS_UNAVAILABLE",
        "QUOTA_CHECK_UNAVAILABLE",
        "LOAS_PROJECT_LOOKUP_UNAVAILABLE",
        "CLOUD_RESOURCE_MANAGER_BACKEND_UNAVAILABLE",
        "SECURITY_POLICY_BACKEND_UNAVAILABLE",
        "LOCATION_POLICY_BACKEND_UNAVAILABLE",
        "LOAD_SHEDDING",
        "RESOURCE_EXHAUSTED",
        "INJECTED_ERROR",
    }
)
_LABEL_VALUE = re.compile(r"[^a-z0-9_-]")


class GcpSettings(BaseSettings):
    """Where Service Control is and how to authenticate to it; read once per environment."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    service_control_url: str = Field(
        default="https://servicecontrol.googleapis.com", validation_alias="BILLING_GCP_SERVICE_CONTROL_URL"
    )
    # local emulators only: a fixed bearer token, no token acquisition
    access_token: SecretStr | None = Field(default=None, validation_alias="BILLING_GCP_ACCESS_TOKEN")
    credentials_file: Path | None = Field(default=None, validation_alias="GOOGLE_APPLICATION_CREDENTIALS")
    credentials_secret_arn: str | None = Field(
        default=None, validation_alias="BILLING_GCP_CREDENTIALS_SECRET_ARN"
    )
    timeout_seconds: float = Field(default=15.0, gt=0, validation_alias="BILLING_GCP_TIMEOUT_SECONDS")


def operation_id(customer_id: str, dimension: str, period: Period) -> str:
    """The operationId of one (customer, dimension, hour): a UUIDv5, the same on every resubmission."""
    return str(uuid.uuid5(OPERATION_NAMESPACE, json.dumps([customer_id, dimension, period.isoformat()])))


def label_value(text: str) -> str:
    """``text`` in Google's label-value syntax: lowercase letters, digits, ``_`` and ``-``, at most 63."""
    return _LABEL_VALUE.sub("_", text.lower())[:63]


class ServiceAccountTokens:
    """OAuth2 tokens from google-auth service-account credentials, refreshed before they expire.

    google-auth signs the JWT bearer grant and posts it to the key file's ``token_uri``. Its public transport
    is synchronous (requests), so the refresh, about once an hour, runs in a worker thread.
    """

    REFRESH_MARGIN = timedelta(minutes=5)

    def __init__(
        self,
        info: Mapping[str, Any],
        timeout: float,
        reloader: SecretReloader | None = None,
        scopes: Sequence[str] = (SCOPE,),
    ) -> None:
        from google.auth.transport.requests import Request

        self._scopes = tuple(scopes)
        self._credentials = _credentials(info, self._scopes)
        self._request = Request()
        self._timeout = timeout
        self._reloader = reloader
        self._lock = asyncio.Lock()

    def close(self) -> None:
        self._request.session.close()

    def _stale(self) -> bool:
        expiry: datetime | None = self._credentials.expiry
        if self._credentials.token is None or expiry is None:
            return True
        # google-auth keeps expiry as a naive UTC datetime
        return expiry - datetime.now(UTC).replace(tzinfo=None) <= self.REFRESH_MARGIN

    async def get(self, *, refresh: bool) -> str:
        from google.auth.exceptions import GoogleAuthError

        async with self._lock:
            if refresh or self._stale():
                request = functools.partial(self._request, timeout=self._timeout)
                try:
                    await asyncio.wait_for(
                        asyncio.to_thread(self._credentials.refresh, request), timeout=self._timeout * 2
                    )
                except (GoogleAuthError, OSError, TimeoutError) as exc:
                    raise TokenUnavailableError(f"{type(exc).__name__}: {exc}") from exc
            token: str = self._credentials.token
            return token

    async def reload(self) -> bool:
        """A new key from the secret or key file, if it changed (the old one was deleted at Google)."""
        raw = await self._reloader.changed() if self._reloader else None
        if raw is None:
            return False
        try:
            credentials = _credentials(_key_info(raw), self._scopes)
        except ConfigurationError:
            return False  # a broken new key: the refusal of the old one stands
        async with self._lock:
            self._credentials = credentials
        return True


def _key_info(raw: str) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except ValueError:
        raise ConfigurationError("the GCP service-account key is not JSON") from None
    if not isinstance(info, dict):
        raise ConfigurationError("the GCP service-account key is not a JSON object")
    return info


def _credentials(info: Mapping[str, Any], scopes: Sequence[str] = (SCOPE,)) -> Any:
    from google.oauth2 import service_account

    try:
        return service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            dict(info), scopes=list(scopes)
        )
    except (ValueError, KeyError) as exc:
        raise ConfigurationError(f"invalid GCP service-account key: {exc}") from None


class _RetryError(Exception):
    """Some answers were transient: try those again."""


class _RpcStatus(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: int = 0
    message: str = ""


class _ReportError(BaseModel):
    model_config = ConfigDict(extra="ignore")
    operationId: str = ""
    status: _RpcStatus = Field(default_factory=_RpcStatus)


class _ReportResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")
    reportErrors: list[_ReportError] = Field(default_factory=list)


class _CheckError(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: str = "ERROR_CODE_UNSPECIFIED"
    detail: str = ""


class _CheckResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")
    checkErrors: list[_CheckError] = Field(default_factory=list)


class _GoogleError(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: int = 0
    message: str = ""
    status: str = ""


class _GoogleErrorBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    error: _GoogleError = Field(default_factory=_GoogleError)


@dataclass(frozen=True)
class _Verdict:
    errors: tuple[str, ...]  # "CODE: detail" of each CheckError; empty means report
    at: float


class GcpServiceControlClient:
    """services.check once per consumer (cached), then one services.report per 100 operations."""

    marketplace = Marketplace.GCP
    rules = RULES

    def __init__(
        self,
        session: aiohttp.ClientSession,
        tokens: TokenSource,
        *,
        endpoint: str,
        attempts: int,
        monotonic: Callable[[], float] = time.monotonic,
        pacer: Pacer | None = None,
    ) -> None:
        self._session = session
        self._tokens = tokens
        self._endpoint = endpoint.rstrip("/")
        self._attempts = attempts
        self._monotonic = monotonic
        # Service Control: one quota unit per services.check call and per operation reported (Service
        # Infrastructure quotas), per producer project: a report of n operations costs n slots
        self._pacer = pacer or Pacer(None)
        self._rng = random.Random()
        self._verdicts: dict[tuple[str, str], _Verdict] = {}

    async def submit(
        self, customer: Customer, period: Period, entries: Sequence[LedgerEntry]
    ) -> list[SubmitResult]:
        if not customer.gcp_service_name or not customer.gcp_usage_reporting_id:
            raise PermanentError(f"customer {customer.id} has no GCP service name or usageReportingId")
        if not entries:
            return []
        service = customer.gcp_service_name
        operations = {e.dimension: _operation(customer, period, e) for e in entries}
        if _ended(customer):
            # A cancelled entitlement: Google's check now refuses the consumer, yet usage up to the
            # cancellation is still to be reported (best-practices-reporting). That holds for the final
            # partial hour and for every earlier hour billed after the cancellation (the final bills go out
            # at once; a cancellation can arrive while an hour's bill is in flight).
            check_errors: tuple[str, ...] = ()
        else:
            with log_context.bound(operation="services.check"):
                verdict = await self._check(
                    service, customer.gcp_usage_reporting_id, next(iter(operations.values()))
                )
            if isinstance(verdict, str):
                return [SubmitResult(e.dimension, LedgerState.FAILED, reason=verdict) for e in entries]
            check_errors = verdict.errors
        if check_errors:
            reason = "services.check: " + "; ".join(check_errors)
            refused = LedgerState.REJECTED
            return [SubmitResult(e.dimension, refused, reason=reason, refused_now=True) for e in entries]
        answered: dict[str, SubmitResult] = {}
        dimensions = list(operations)
        for start in range(0, len(dimensions), RULES.batch_limit):
            chunk = {d: operations[d] for d in dimensions[start : start + RULES.batch_limit]}
            with log_context.bound(operation="services.report"):
                answered.update(await self._report(service, chunk))
        return [answered[e.dimension] for e in entries]

    async def _check(self, service: str, consumer: str, operation: Mapping[str, Any]) -> _Verdict | str:
        """The cached or fresh verdict on the consumer, or the reason no verdict could be had."""
        key = (service, consumer)
        cached = self._verdicts.get(key)
        if cached is not None and self._monotonic() - cached.at < CHECK_FRESH:
            return cached
        url = f"{self._endpoint}/v1/services/{service}:check"
        failure = "services.check gave no answer"
        try:
            async for attempt in stamina.retry_context(
                on=_RetryError, attempts=self._attempts, wait_initial=0.05, wait_max=2.0
            ):
                with attempt:
                    try:
                        await self._pacer.wait()
                        status, body = await self._post(url, {"operation": operation})
                    except (NotSentError, MaybeSentError) as exc:
                        failure = f"services.check: {exc}"
                        raise _RetryError from exc
                    if status == 200:
                        try:
                            errors = _CheckResponse.model_validate(body).checkErrors
                        except ValidationError:
                            failure = "services.check: unreadable answer"
                            raise _RetryError from None
                        outage = [e for e in errors if e.code in _CHECK_UNAVAILABLE]
                        if outage:
                            failure = "services.check: " + "; ".join(f"{e.code}: {e.detail}" for e in outage)
                            raise _RetryError
                        verdict = _Verdict(tuple(f"{e.code}: {e.detail}" for e in errors), self._monotonic())
                        self._verdicts[key] = verdict
                        return verdict
                    failure = f"services.check: {_http_reason(status, body)}"
                    if status == 429 or status >= 500:
                        raise _RetryError
                    if status in (400, 404):
                        # the request itself is wrong (unknown service, bad consumer id): a verdict
                        verdict = _Verdict((_http_reason(status, body),), self._monotonic())
                        self._verdicts[key] = verdict
                        return verdict
                    # 401/403 after a refresh and a reading of the credentials: a refusal that retrying
                    # cannot change (see _report_once); not cached, so fixed credentials count at once
                    return _Verdict((_http_reason(status, body),), self._monotonic())
        except _RetryError:
            pass
        if cached is not None and self._monotonic() - cached.at < CHECK_STALE:
            return cached
        return failure

    async def _report(
        self, service: str, operations: Mapping[str, dict[str, Any]]
    ) -> dict[str, SubmitResult]:
        url = f"{self._endpoint}/v1/services/{service}:report"

        async def send_once(pending: Mapping[str, dict[str, Any]]) -> dict[str, SubmitResult]:
            # 429s are retried in there within the bill's budget (operationIds make that safe)
            report = functools.partial(self._report_once, url)
            return await paced_until_not_throttled(report, pending, self._pacer, self._rng, len(pending))

        return await submit_until_settled(
            send_once, operations, self._attempts, lambda r: not r.retryable or r.throttled
        )

    async def _report_once(
        self, url: str, operations: Mapping[str, dict[str, Any]]
    ) -> dict[str, SubmitResult]:
        def every(state: LedgerState, reason: str) -> dict[str, SubmitResult]:
            return {d: SubmitResult(d, state, reason=reason) for d in operations}

        headers: dict[str, str] = {}
        try:
            status, body = await self._post(url, {"operations": list(operations.values())}, headers)
        except NotSentError as exc:
            return every(LedgerState.FAILED, str(exc))
        except MaybeSentError as exc:
            return every(LedgerState.SUBMITTED, str(exc))
        if status == 200:
            try:
                errors = _ReportResponse.model_validate(body).reportErrors
            except ValidationError:
                return every(LedgerState.SUBMITTED, "services.report: unreadable answer")
            by_id = {e.operationId: e for e in errors}
            return {
                d: _report_result(d, op["operationId"], by_id.get(op["operationId"]))
                for d, op in operations.items()
            }
        reason = f"services.report: {_http_reason(status, body)}"
        if status in (401, 403):
            # Still refused after a fresh token (401) and one reading of the credentials. UNAUTHENTICATED /
            # PERMISSION_DENIED refuse the call before it runs ("the caller does not have permission to
            # execute the specified operation", google.rpc.Code), "the caller doesn't have the right IAM
            # permission" (cloud.google.com/service-usage/docs/troubleshooting), and AIP-194 retries only
            # UNAVAILABLE. Recorded as a refusal with Google's reason, not FAILED: SQS would only retry it
            # into the dead-letter queue
            return every(LedgerState.REJECTED, reason)
        if status == 429:
            # RESOURCE_EXHAUSTED: the project's quota. A failed RPC is non-deterministic (ReportResponse),
            # so the records stay SUBMITTED; retried after Retry-After, if Google sends one
            wait = retry_after_seconds(headers.get("retry-after"))
            return {
                d: SubmitResult(d, LedgerState.SUBMITTED, reason=reason, throttled=True, retry_after=wait)
                for d in operations
            }
        if status >= 500:
            return every(LedgerState.SUBMITTED, reason)  # Google: a failed RPC is non-deterministic
        return every(LedgerState.REJECTED, reason)

    async def _post(
        self, url: str, body: Mapping[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        return await post_json(self._session, url, body, self._tokens, refresh_on=(401,), headers_out=headers)


def _operation(customer: Customer, period: Period, entry: LedgerEntry) -> dict[str, Any]:
    service = customer.gcp_service_name
    end = period.end
    if customer.active_until is not None and period.start < customer.active_until < end:
        end = customer.active_until  # Google: the timestamp must be before the entitlement was cancelled
    return {
        "operationId": operation_id(customer.id, entry.dimension, period),
        "operationName": OPERATION_NAME,
        "consumerId": customer.gcp_usage_reporting_id,
        "startTime": _rfc3339(period.start),
        "endTime": _rfc3339(end),
        "metricValueSets": [
            {
                "metricName": f"{service}/{entry.dimension}",
                "metricValues": [{"int64Value": str(entry.quantity)}],
            }
        ],
        "userLabels": {CONTAINER_NAME_LABEL: label_value(customer.id)},
    }


def _ended(customer: Customer) -> bool:
    """Whether the customer's entitlement has a recorded end (cancelled, or to be cancelled): services.check
    answers for the consumer as it is now, so from the end on it refuses hours that were active. An end
    still in the future (a pending cancellation) would pass the check; skipping it then changes nothing."""
    return customer.active_until is not None


def _report_result(dimension: str, op_id: str, error: _ReportError | None) -> SubmitResult:
    if error is None:
        return SubmitResult(dimension, LedgerState.ACCEPTED, record_id=op_id)
    code = error.status.code
    reason = f"{_RPC_NAMES.get(code, str(code))}: {error.status.message}"
    if code == _ALREADY_EXISTS:
        return SubmitResult(dimension, LedgerState.DUPLICATE, record_id=op_id, reason=reason)
    if code in _TRANSIENT_CODES:
        return SubmitResult(dimension, LedgerState.FAILED, reason=reason)
    return SubmitResult(dimension, LedgerState.REJECTED, reason=reason)


def _http_reason(status: int, body: Any) -> str:
    try:
        error = _GoogleErrorBody.model_validate(body).error
    except ValidationError:
        return f"HTTP {status}"
    return f"HTTP {status} {error.status}: {error.message}".rstrip(": ")


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def create(
    stack: contextlib.AsyncExitStack, secret: SecretRead, attempts: int, pacer: Pacer | None = None
) -> GcpServiceControlClient:
    """Build the adapter from the environment; its HTTP session and credentials close with ``stack``."""
    settings = GcpSettings()
    tokens: TokenSource
    if settings.access_token is not None:
        tokens = FixedToken(settings.access_token.get_secret_value())
    else:
        read: Callable[[], Awaitable[str]]
        if settings.credentials_file is not None:
            read = functools.partial(asyncio.to_thread, settings.credentials_file.read_text)
            raw = await read()
        elif settings.credentials_secret_arn:
            arn = settings.credentials_secret_arn
            raw = await asyncio.to_thread(secret, arn)
            read = functools.partial(asyncio.to_thread, functools.partial(secret, arn, fresh=True))
        else:
            raise ConfigurationError(
                "set GOOGLE_APPLICATION_CREDENTIALS, BILLING_GCP_CREDENTIALS_SECRET_ARN "
                "or BILLING_GCP_ACCESS_TOKEN"
            )
        account = ServiceAccountTokens(
            _key_info(raw), timeout=settings.timeout_seconds, reloader=SecretReloader(read, raw)
        )
        stack.callback(account.close)
        tokens = account
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=settings.timeout_seconds, sock_connect=min(5.0, settings.timeout_seconds)
        )
    )
    stack.push_async_callback(session.close)
    return GcpServiceControlClient(
        session, tokens, endpoint=settings.service_control_url, attempts=attempts, pacer=pacer
    )
