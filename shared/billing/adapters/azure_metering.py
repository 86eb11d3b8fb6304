"""Azure Marketplace through the metered billing API: ``POST /api/batchUsageEvent?api-version=2018-08-31``.

The request and response shapes are Microsoft's OpenAPI description (microsoft/commercial-marketplace-openapi,
Microsoft.Marketplace.Metering/2018-08-31/meteringapi.v1.json, copied in tests/fixtures/specs). The rules
it leaves out come from Microsoft's documentation, "Marketplace metered billing APIs"
(learn.microsoft.com/partner-center/marketplace/marketplace-metering-service-apis) and its FAQ
(…/marketplace-metering-service-apis-faq):

- "Only one usage event can be emitted for each hour of a calendar day per resource and dimension"; a
  second event for the same hour "will be rejected as a duplicate". The batch answer for it has ``status``
  ``Duplicate`` and an ``error`` whose ``additionalInfo.acceptedMessage`` is the event Microsoft already
  holds, with its ``usageEventId``: that original id is the record id (DUPLICATE counts as billed). The
  single-event API answers the same case with HTTP 409 Conflict and the same body (``_conflict_result``).
- "Usage events can only be emitted for the past 24 hours"; "The maximum delay allowed is 24 hours, after
  which usage events aren't accepted": the item answers ``Expired``.
- ``quantity`` "must be greater than 0"; ``InvalidQuantity`` is "less than or equal to 0". Azure wants no
  event for an hour without usage ("emit usage every hour for the past hour, only if there's usage").
- "The maximum number of events in a single batch is 25"; HTTP 400 "The batch contained more than 25 usage
  events". HTTP 403: "The authorization token isn't provided, is invalid or expired", or the offer was
  published with another Entra app id; so a 401 or 403 first refreshes the token once.
- ``resourceId`` is the SaaS subscription id (or the managed app's ``resourceUsageId``); managed apps may
  send ``resourceUri`` instead, "never both".
- Tokens: client credentials for the marketplace resource ``20e940b3-4c77-4b0b-9a53-9e16a1b010a7`` (the
  spec's ApiVersion text); azure-identity uses the v2 endpoint, where it is the scope ``<resource>/.default``.
"""

from __future__ import annotations

import asyncio
import functools
import random
from datetime import UTC, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError
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
from billing.domain.errors import ConfigurationError, PermanentError, WindowExpiredError
from billing.domain.model import LedgerState, Marketplace, SubmitResult
from billing.ports import MarketplaceRules

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable, Mapping, Sequence

    from azure.core.credentials_async import AsyncTokenCredential

    from billing.domain.model import Customer, LedgerEntry, Period

API_VERSION = "2018-08-31"
MARKETPLACE_RESOURCE = "20e940b3-4c77-4b0b-9a53-9e16a1b010a7"
SCOPE = f"{MARKETPLACE_RESOURCE}/.default"

RULES = MarketplaceRules(
    batch_limit=25,
    window=timedelta(hours=24),
    sends_zero=False,  # Azure rejects a zero quantity: an hour without usage sends nothing
    idempotency_key="resource, dimension, hour of effectiveStartTime (a repeat: Duplicate, original id)",
)

_EXPIRED = "Expired: effectiveStartTime is more than 24 hours ago"
_PERMANENT_STATUSES = frozenset(
    {
        "ResourceNotFound",
        "ResourceNotAuthorized",
        "ResourceNotActive",
        "InvalidDimension",
        "InvalidQuantity",
        "BadArgument",
    }
)


class AzureSettings(BaseSettings):
    """Where the metering API is and how to authenticate to it; azure-identity's standard variables."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    metering_url: str = Field(
        default="https://marketplaceapi.microsoft.com", validation_alias="BILLING_AZURE_METERING_URL"
    )
    # local emulators only: a fixed bearer token, no token acquisition
    access_token: SecretStr | None = Field(default=None, validation_alias="BILLING_AZURE_ACCESS_TOKEN")
    tenant_id: str | None = Field(default=None, validation_alias="AZURE_TENANT_ID")
    client_id: str | None = Field(default=None, validation_alias="AZURE_CLIENT_ID")
    client_secret: SecretStr | None = Field(default=None, validation_alias="AZURE_CLIENT_SECRET")
    authority_host: str | None = Field(default=None, validation_alias="AZURE_AUTHORITY_HOST")
    credentials_secret_arn: str | None = Field(
        default=None, validation_alias="BILLING_AZURE_CREDENTIALS_SECRET_ARN"
    )
    timeout_seconds: float = Field(default=15.0, gt=0, validation_alias="BILLING_AZURE_TIMEOUT_SECONDS")


class ClientCredentials(BaseModel):
    """The Entra app's client credentials, as in a Secrets Manager secret (either spelling of the keys)."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str = Field(validation_alias=AliasChoices("tenant_id", "AZURE_TENANT_ID"))
    client_id: str = Field(validation_alias=AliasChoices("client_id", "AZURE_CLIENT_ID"))
    client_secret: SecretStr = Field(validation_alias=AliasChoices("client_secret", "AZURE_CLIENT_SECRET"))


class EntraTokens:
    """Tokens from an azure-identity async credential, which refreshes them before they expire.

    A refused token is replaced by building a new credential: azure-identity would otherwise hand back its
    cached token until that expires. When Entra refuses the client secret too, the secret is read again
    (``reloader``): a rotated client secret is picked up without a cold start.
    """

    def __init__(
        self,
        credentials: ClientCredentials,
        factory: Callable[[ClientCredentials], AsyncTokenCredential],
        reloader: SecretReloader | None = None,
    ) -> None:
        self._credentials = credentials
        self._factory = factory
        self._reloader = reloader
        self._credential = factory(credentials)
        self._lock = asyncio.Lock()

    async def get(self, *, refresh: bool) -> str:
        from azure.core.exceptions import AzureError

        async with self._lock:
            if refresh:
                await self._replace()
            try:
                return (await self._credential.get_token(SCOPE)).token
            except (AzureError, OSError, TimeoutError) as exc:
                raise TokenUnavailableError(f"{type(exc).__name__}: {exc}") from exc

    async def reload(self) -> bool:
        raw = await self._reloader.changed() if self._reloader else None
        if raw is None:
            return False
        try:
            credentials = ClientCredentials.model_validate_json(raw)
        except ValidationError:
            return False  # a broken new secret: the refusal of the old one stands
        async with self._lock:
            self._credentials = credentials
            await self._replace()
        return True

    async def _replace(self) -> None:
        stale, self._credential = self._credential, self._factory(self._credentials)
        await stale.close()

    async def close(self) -> None:
        await self._credential.close()


def client_secret_credential(
    credentials: ClientCredentials, authority: str | None, **options: Any
) -> AsyncTokenCredential:
    """azure-identity's ClientSecretCredential (async), imported only when an Azure customer is billed."""
    from azure.identity.aio import ClientSecretCredential

    if authority:
        options["authority"] = authority
    return ClientSecretCredential(
        credentials.tenant_id, credentials.client_id, credentials.client_secret.get_secret_value(), **options
    )


class _AcceptedMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    usageEventId: str | None = None
    quantity: float | None = None


class _AdditionalInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")
    acceptedMessage: _AcceptedMessage | None = None


class _Conflict(BaseModel):
    """UsageEventConflictResponse: the batch item's ``error`` and the single-event API's 409 body."""

    model_config = ConfigDict(extra="ignore")
    additionalInfo: _AdditionalInfo | None = None
    message: str = ""
    code: str = ""


class _BatchItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    usageEventId: str | None = None
    status: str = ""
    dimension: str | None = None
    error: _Conflict | None = None


class _BatchResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")
    result: list[_BatchItem] = Field(default_factory=list)


class _BadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: str = ""
    message: str = ""


class AzureMeteringClient:
    """One batchUsageEvent call per 25 events, each item's status handled on its own."""

    marketplace = Marketplace.AZURE
    rules = RULES

    def __init__(
        self,
        session: aiohttp.ClientSession,
        tokens: TokenSource,
        *,
        endpoint: str,
        attempts: int,
        pacer: Pacer | None = None,
    ) -> None:
        self._session = session
        self._tokens = tokens
        self._url = f"{endpoint.rstrip('/')}/api/batchUsageEvent?api-version={API_VERSION}"
        self._attempts = attempts
        self._pacer = pacer or Pacer(None)
        self._rng = random.Random()

    async def submit(
        self, customer: Customer, period: Period, entries: Sequence[LedgerEntry]
    ) -> list[SubmitResult]:
        if not customer.azure_plan_id or not (customer.azure_resource_id or customer.azure_resource_uri):
            raise PermanentError(f"customer {customer.id} has no Azure plan id and resource id or URI")
        answered = {
            e.dimension: SubmitResult(
                e.dimension, LedgerState.SKIPPED, reason="zero quantity: Azure wants no event"
            )
            for e in entries
            if e.quantity <= 0
        }
        sending = [e for e in entries if e.quantity > 0]
        for start in range(0, len(sending), RULES.batch_limit):
            chunk = {
                e.dimension: _event(customer, period, e) for e in sending[start : start + RULES.batch_limit]
            }
            with log_context.bound(operation="batchUsageEvent"):
                answered.update(await self._submit_chunk(chunk))
        if sending and all(answered[e.dimension].reason == _EXPIRED for e in sending):
            raise WindowExpiredError(f"Azure: every event of {period} is Expired (older than 24 hours)")
        return [answered[e.dimension] for e in entries]

    async def _submit_chunk(self, events: Mapping[str, dict[str, Any]]) -> dict[str, SubmitResult]:
        # an Expired answer is final for this call: the service moves the hour's quantity on
        async def send_once(pending: Mapping[str, dict[str, Any]]) -> dict[str, SubmitResult]:
            # 429s are retried in there after their Retry-After, within the bill's budget
            return await paced_until_not_throttled(self._submit_once, pending, self._pacer, self._rng)

        return await submit_until_settled(
            send_once,
            events,
            self._attempts,
            lambda r: not r.retryable or r.reason == _EXPIRED or r.throttled,
        )

    async def _submit_once(self, events: Mapping[str, dict[str, Any]]) -> dict[str, SubmitResult]:
        def every(state: LedgerState, reason: str) -> dict[str, SubmitResult]:
            return {d: SubmitResult(d, state, reason=reason) for d in events}

        headers: dict[str, str] = {}
        try:
            status, body = await self._post({"request": list(events.values())}, headers)
        except NotSentError as exc:
            return every(LedgerState.FAILED, str(exc))
        except MaybeSentError as exc:
            return every(LedgerState.SUBMITTED, str(exc))
        if status == 200:
            try:
                items = _BatchResponse.model_validate(body).result
            except ValidationError:
                return every(LedgerState.SUBMITTED, "batchUsageEvent: unreadable answer")
            by_dimension = {i.dimension: i for i in items if i.dimension is not None}
            if len(by_dimension) < len(items) and len(items) == len(events):  # items without a dimension
                by_dimension = dict(zip(events, items, strict=True))
            return {
                d: _item_result(d, by_dimension[d]) if d in by_dimension
                else SubmitResult(d, LedgerState.SUBMITTED, reason="no result for this event in the answer")
                for d in events
            }  # fmt: skip
        reason = f"batchUsageEvent: {_http_reason(status, body)}"
        if status in (401, 403):
            return every(LedgerState.FAILED, reason)  # still refused after a fresh token: nothing was taken
        if status == 429:
            # Too Many Requests: not processed; the same request may be sent after Retry-After
            wait = retry_after_seconds(headers.get("retry-after"))
            return {
                d: SubmitResult(d, LedgerState.FAILED, reason=reason, throttled=True, retry_after=wait)
                for d in events
            }
        if status == 503:
            return every(LedgerState.FAILED, reason)  # unavailable: not processed
        if status >= 500:
            return every(LedgerState.SUBMITTED, reason)  # it may have been recorded
        return every(LedgerState.REJECTED, reason)

    async def _post(self, body: Mapping[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
        # Azure answers a bad or expired token with 403 (its docs and spec), and sometimes 401
        return await post_json(
            self._session, self._url, body, self._tokens, refresh_on=(401, 403), headers_out=headers
        )


def _event(customer: Customer, period: Period, entry: LedgerEntry) -> dict[str, Any]:
    # effectiveStartTime is the hour's start, so a resubmission is the same (resource, dimension, hour)
    event: dict[str, Any] = {
        "quantity": entry.quantity,
        "dimension": entry.dimension,
        "effectiveStartTime": period.start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "planId": customer.azure_plan_id,
    }
    if customer.azure_resource_id:
        event["resourceId"] = customer.azure_resource_id
    else:
        event["resourceUri"] = customer.azure_resource_uri
    return event


def _item_result(dimension: str, item: _BatchItem) -> SubmitResult:
    status = item.status
    message = item.error.message if item.error else ""
    if status == "Accepted":
        return SubmitResult(dimension, LedgerState.ACCEPTED, record_id=item.usageEventId)
    if status == "Duplicate":
        return _conflict_result(dimension, item.error)
    if status == "Expired":
        # Not taken. Once every event of the hour says so the hour is settled as expired; alone (the window
        # closing between two calls) it is retried until the biller's own clock sees the window closed.
        return SubmitResult(dimension, LedgerState.FAILED, reason=_EXPIRED)
    if status in _PERMANENT_STATUSES:
        return SubmitResult(dimension, LedgerState.REJECTED, reason=f"{status}: {message}".rstrip(": "))
    if status == "Error":
        return SubmitResult(dimension, LedgerState.FAILED, reason=f"Error: {message}".rstrip(": "))
    return SubmitResult(dimension, LedgerState.SUBMITTED, reason=f"unknown status {status!r}")


def _conflict_result(dimension: str, conflict: _Conflict | None) -> SubmitResult:
    """Azure already holds an event for this hour: billed, under the original event's id."""
    accepted = conflict.additionalInfo.acceptedMessage if conflict and conflict.additionalInfo else None
    if accepted is None or not accepted.usageEventId:
        return SubmitResult(
            dimension, LedgerState.DUPLICATE, reason="Duplicate: Azure did not name the original usageEventId"
        )
    return SubmitResult(
        dimension,
        LedgerState.DUPLICATE,
        record_id=accepted.usageEventId,
        reason=f"Duplicate: Azure already holds quantity {accepted.quantity:g} for this hour"
        if accepted.quantity is not None
        else "Duplicate",
    )


def conflict_result(dimension: str, body: Any) -> SubmitResult:
    """The single-event API's HTTP 409 Conflict body (UsageEventConflictResponse), read like ``Duplicate``."""
    try:
        conflict = _Conflict.model_validate(body)
    except ValidationError:
        conflict = None
    return _conflict_result(dimension, conflict)


def _http_reason(status: int, body: Any) -> str:
    try:
        error = _BadRequest.model_validate(body)
    except ValidationError:
        return f"HTTP {status}"
    return f"HTTP {status} {error.code}: {error.message}".rstrip(": ")


async def create(
    stack: contextlib.AsyncExitStack, secret: SecretRead, attempts: int, pacer: Pacer | None = None
) -> AzureMeteringClient:
    """Build the adapter from the environment; its HTTP session and credential close with ``stack``."""
    settings = AzureSettings()
    tokens: TokenSource
    if settings.access_token is not None:
        tokens = FixedToken(settings.access_token.get_secret_value())
    else:
        credentials, reloader = await _client_credentials(settings, secret)
        entra = EntraTokens(
            credentials, lambda c: client_secret_credential(c, settings.authority_host), reloader
        )
        stack.push_async_callback(entra.close)
        tokens = entra
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=settings.timeout_seconds, sock_connect=min(5.0, settings.timeout_seconds)
        )
    )
    stack.push_async_callback(session.close)
    return AzureMeteringClient(
        session, tokens, endpoint=settings.metering_url, attempts=attempts, pacer=pacer
    )


async def _client_credentials(
    settings: AzureSettings, secret: SecretRead
) -> tuple[ClientCredentials, SecretReloader | None]:
    """The app's credentials: from the environment (fixed), or from a secret that is read again when Entra
    refuses them."""
    if settings.tenant_id and settings.client_id and settings.client_secret:
        fixed = ClientCredentials(
            tenant_id=settings.tenant_id, client_id=settings.client_id, client_secret=settings.client_secret
        )
        return fixed, None
    if not settings.credentials_secret_arn:
        raise ConfigurationError(
            "set AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET, BILLING_AZURE_CREDENTIALS_SECRET_ARN "
            "or BILLING_AZURE_ACCESS_TOKEN"
        )
    arn = settings.credentials_secret_arn
    raw = await asyncio.to_thread(secret, arn)
    read = functools.partial(asyncio.to_thread, functools.partial(secret, arn, fresh=True))
    try:
        return ClientCredentials.model_validate_json(raw), SecretReloader(read, raw)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        raise ConfigurationError(f"the Azure credentials secret lacks or misstates: {fields}") from None
