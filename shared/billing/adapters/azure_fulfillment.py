"""Azure Marketplace SaaS subscriptions: the fulfillment v2 webhook and the landing page's resolve + activate,
turned into ``LifecycleEvent``s.

Sources (Microsoft Learn, partner-center/marketplace-offers):

- "Implementing a webhook on the SaaS service": Microsoft POSTs ChangePlan, ChangeQuantity, Renew, Suspend,
  Unsubscribe and Reinstate (and Subscribe) to the publisher's webhook. "The SaaS service is required to call
  the Get Operation API to validate and authorize the webhook call and payload data before taking action";
  ChangePlan/ChangeQuantity are answered by "PATCH with success" or "PATCH with failure OR respond with 4xx
  (within 10 seconds)", and are auto-accepted when nothing is answered in 10 seconds; the other actions are
  already done when notified ("Respond with HTTP 200"). The webhook carries a bearer JWT issued by Microsoft
  Entra ID: its signature checks against the tenant's signing keys (JWKS), ``aud`` is the publisher's Entra
  app (client) id, ``iss`` the tenant (``https://sts.windows.net/{tenant}/``; the v2 form
  ``https://login.microsoftonline.com/{tenant}/v2.0`` is taken too), and the caller (``appid`` in v1 tokens,
  ``azp`` in v2) is the marketplace's first-party app ``20e940b3-4c77-4b0b-9a53-9e16a1b010a7``.
- "SaaS fulfillment APIs v2" (``api-version=2018-08-31``): ``POST /api/saas/subscriptions/resolve`` with
  ``x-ms-marketplace-token``, ``POST /api/saas/subscriptions/{id}/activate`` ``{"planId", "quantity"}``,
  ``GET``/``PATCH /api/saas/subscriptions/{id}/operations/{operationId}``; the bearer token is the one the
  metering API takes (resource 20e940b3-…), so the metering adapter's credentials are reused.

The token is checked with PyJWT (``PyJWKClient`` + ``jwt.decode``): azure-identity acquires tokens but
validates none, and PyJWT[crypto] is already in the layer (msal depends on it), well kept, and does the
JWKS fetch, key caching and claim checks this needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.adapters.bearer_http import FixedToken, MaybeSentError, NotSentError, TokenSource, request_json
from billing.domain.model import Marketplace
from billing.domain.subscriptions import EventSource, Identity, LifecycleEvent, LifecycleKind, SubjectKey

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable

    from billing.adapters.bearer_http import SecretRead

logger = logging.getLogger(__name__)

API_VERSION = "2018-08-31"
MARKETPLACE_APP_ID = "20e940b3-4c77-4b0b-9a53-9e16a1b010a7"
ANSWER_WITHIN = 10.0  # seconds Azure waits for the answer to a ChangePlan/ChangeQuantity
_REFRESH_ON = (401, 403)  # the fulfillment API refuses an expired token with 403, like metering
_KINDS = {
    "Subscribe": LifecycleKind.ACTIVE,
    "Renew": LifecycleKind.ACTIVE,
    "Reinstate": LifecycleKind.REINSTATED,
    "Suspend": LifecycleKind.SUSPENDED,
    "Unsubscribe": LifecycleKind.ENDED,
    "ChangePlan": LifecycleKind.PLAN_CHANGED,
    "ChangeQuantity": LifecycleKind.QUANTITY_CHANGED,
}
_CHANGES = frozenset({"ChangePlan", "ChangeQuantity"})
# An event that only links a tenant: REGISTERED once the contract has it (asked for by subs-aws); until then a
# PLAN_CHANGED with no plan, dimensions or quantity, which moves neither status nor plan.
_LINK_ONLY = getattr(LifecycleKind, "REGISTERED", LifecycleKind.PLAN_CHANGED)


class RequestRejectedError(Exception):
    """Refused with ``status`` (400 malformed or a declined change, 401/403 unverifiable); nothing written."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class FulfillmentUnavailableError(Exception):
    """The fulfillment API or Entra's keys gave no usable answer: answer 503, Microsoft calls again."""


class WebhookSettings(BaseSettings):
    """Who may call the webhook, and what to answer a plan or quantity change."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    tenant_id: str = Field(validation_alias="BILLING_AZURE_WEBHOOK_TENANT_ID", min_length=1)
    client_id: str = Field(validation_alias="BILLING_AZURE_WEBHOOK_AUDIENCE", min_length=1)
    jwks_url: str | None = Field(default=None, validation_alias="BILLING_AZURE_WEBHOOK_JWKS_URL")
    caller_app_id: str = Field(default=MARKETPLACE_APP_ID, validation_alias="BILLING_AZURE_WEBHOOK_CALLER")
    accept_changes: bool = Field(default=True, validation_alias="BILLING_AZURE_ACCEPT_CHANGES")
    # the whole answer to a change (read the operation, PATCH it) must finish inside Azure's 10 seconds
    answer_within: float = Field(
        default=8.0, gt=0, le=ANSWER_WITHIN, validation_alias="BILLING_AZURE_ANSWER_WITHIN"
    )
    fulfillment_url: str = Field(
        default="https://marketplaceapi.microsoft.com", validation_alias="BILLING_AZURE_FULFILLMENT_URL"
    )

    @property
    def keys_url(self) -> str:
        return self.jwks_url or f"https://login.microsoftonline.com/{self.tenant_id}/discovery/v2.0/keys"


class WebhookTokenVerifier:
    """Checks the webhook's Entra bearer token; keys fetched from the JWKS URL and cached by PyJWT."""

    def __init__(self, settings: WebhookSettings) -> None:
        import jwt

        self._settings = settings
        self._issuers = (
            f"https://sts.windows.net/{settings.tenant_id}/",
            f"https://login.microsoftonline.com/{settings.tenant_id}/v2.0",
        )
        self._keys = jwt.PyJWKClient(settings.keys_url, cache_jwk_set=True, lifespan=3600, timeout=5)

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """The token's verified claims; RequestRejectedError(401/403) or FulfillmentUnavailableError."""
        import jwt

        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestRejectedError(401, "no bearer token")
        try:
            key = self._keys.get_signing_key_from_jwt(token.strip())
        except jwt.PyJWKClientConnectionError as exc:
            raise FulfillmentUnavailableError(f"Entra's signing keys could not be read: {exc}") from exc
        except (jwt.PyJWKClientError, jwt.PyJWTError) as exc:
            raise RequestRejectedError(401, f"the token's key is unknown: {type(exc).__name__}") from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token.strip(),
                key.key,
                algorithms=["RS256"],
                audience=self._settings.client_id,
                issuer=self._issuers,
                options={"require": ["exp", "iat", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise RequestRejectedError(401, f"the token does not verify: {type(exc).__name__}") from None
        caller = claims.get("appid") or claims.get("azp")
        if caller != self._settings.caller_app_id or claims.get("tid", self._settings.tenant_id) != (
            self._settings.tenant_id
        ):
            raise RequestRejectedError(403, "the token is not the marketplace's")
        return claims

    async def verify_async(self, authorization: str | None) -> dict[str, Any]:
        return await asyncio.to_thread(self.verify, authorization)


@dataclass(frozen=True)
class WebhookCall:
    """What the webhook body says; only ids are trusted, the rest is read back from the Operations API."""

    operation_id: str
    subscription_id: str
    action: str
    body: Mapping[str, Any]


def parse_webhook(body: bytes | str) -> WebhookCall:
    try:
        data = json.loads(body)
    except ValueError:
        raise RequestRejectedError(400, "the webhook body is not JSON") from None
    if not isinstance(data, dict):
        raise RequestRejectedError(400, "the webhook body is not a JSON object")
    values = [data.get(name) for name in ("id", "subscriptionId", "action")]
    if not all(isinstance(v, str) and v and "/" not in v and "?" not in v for v in values):
        raise RequestRejectedError(400, "the webhook body lacks id, subscriptionId or action")
    operation_id, subscription_id, action = values
    return WebhookCall(str(operation_id), str(subscription_id), str(action), data)


class FulfillmentClient:
    """The SaaS fulfillment API v2 calls this needs."""

    def __init__(self, session: aiohttp.ClientSession, tokens: TokenSource, endpoint: str) -> None:
        self._session = session
        self._tokens = tokens
        self._base = f"{endpoint.rstrip('/')}/api/saas/subscriptions"

    async def operation(self, subscription_id: str, operation_id: str) -> dict[str, Any] | None:
        status, body = await self._call("GET", f"/{subscription_id}/operations/{operation_id}")
        if status in (400, 404):
            return None
        return self._ok(status, body, "Get operation")

    async def answer(self, subscription_id: str, operation_id: str, *, success: bool) -> int:
        """PATCH the operation Success or Failure; the HTTP status (409: no longer in progress)."""
        body = {"status": "Success" if success else "Failure"}
        status, _ = await self._call("PATCH", f"/{subscription_id}/operations/{operation_id}", body)
        return status

    async def resolve(self, marketplace_token: str) -> dict[str, Any] | None:
        """The purchase the landing page token names; None when Microsoft does not know the token."""
        status, body = await self._call(
            "POST", "/resolve", None, headers={"x-ms-marketplace-token": marketplace_token}
        )
        if status in (400, 404):
            return None
        return self._ok(status, body, "Resolve")

    async def activate(self, subscription_id: str, plan_id: str, quantity: int | None) -> None:
        body: dict[str, Any] = {"planId": plan_id}
        if quantity is not None:
            body["quantity"] = quantity
        status, answer = await self._call("POST", f"/{subscription_id}/activate", body)
        self._ok(status, answer if isinstance(answer, dict) else {}, "Activate")

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        url = f"{self._base}{path}?api-version={API_VERSION}"
        try:
            return await request_json(self._session, method, url, body, self._tokens, _REFRESH_ON, headers)
        except (NotSentError, MaybeSentError) as exc:
            raise FulfillmentUnavailableError(f"{method} {path}: {exc}") from exc

    @staticmethod
    def _ok(status: int, body: Any, call: str) -> dict[str, Any]:
        if status != 200 or not isinstance(body, dict):
            raise FulfillmentUnavailableError(f"{call}: HTTP {status}")
        return body


def lifecycle_event(
    operation: Mapping[str, Any], source: EventSource = EventSource.AZURE_WEBHOOK
) -> LifecycleEvent:
    """The lifecycle event of a verified, completed (or accepted) operation."""
    subscription_id = str(operation["subscriptionId"])
    moment = _time(operation.get("timeStamp"))
    quantity = operation.get("quantity")
    return LifecycleEvent(
        key=SubjectKey(Marketplace.AZURE, subscription_id.lower()),
        kind=_KINDS[str(operation["action"])],
        effective_at=moment,
        ordering=moment,
        event_id=f"operation:{operation['id']}",
        source=source,
        plan=operation.get("planId") or None,
        quantity=int(quantity) if isinstance(quantity, int | str) and str(quantity).isdigit() else None,
        identity=Identity(azure_subscription_id=subscription_id.lower()),
        raw={"operation": dict(operation)},
    )


class AzureSubscriptions:
    """The webhook and the landing page registration."""

    def __init__(
        self,
        settings: WebhookSettings,
        client: FulfillmentClient,
        verifier: WebhookTokenVerifier,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        decide: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._verifier = verifier
        self._clock = clock
        self._monotonic = monotonic
        self._decide = decide or (lambda operation: settings.accept_changes)

    async def receive(self, authorization: str | None, body: bytes | str) -> list[LifecycleEvent]:
        """The events of one webhook call. Raises RequestRejectedError (answer its status; nothing written)
        or FulfillmentUnavailableError (answer 503)."""
        started = self._monotonic()
        await self._verifier.verify_async(authorization)
        call = parse_webhook(body)
        operation = await self._client.operation(call.subscription_id, call.operation_id)
        if (
            operation is None
            or str(operation.get("subscriptionId", "")).lower() != call.subscription_id.lower()
            or operation.get("action") != call.action
        ):
            raise RequestRejectedError(403, "the Operations API does not confirm this call")
        action, status = operation.get("action"), operation.get("status")
        if action not in _KINDS:
            logger.warning("unknown SaaS webhook action", extra={"action": action})
            return []
        if action in _CHANGES and status == "InProgress":
            if not await self._answer(call, operation, started):
                # declined: PATCHed Failure (or, failing that, the 4xx Microsoft also takes as a refusal)
                raise RequestRejectedError(400, f"{action} declined")
        elif status not in ("Succeeded", "InProgress"):
            return []  # failed or conflicting: nothing changed on Azure's side
        return [lifecycle_event(operation)]

    async def _answer(self, call: WebhookCall, operation: Mapping[str, Any], started: float) -> bool:
        """Accept or decline a change inside Azure's window; True when accepted (or auto-accepted)."""
        accept = self._decide(operation)
        remaining = self._settings.answer_within - (self._monotonic() - started)
        if remaining <= 0:
            # too late to answer: Azure has decided or is deciding itself (asyncio.timeout(0) would still let
            # the PATCH be written before the cancellation is delivered)
            logger.warning("SaaS operation not answered in time", extra={"operation": call.operation_id})
            return True
        try:
            async with asyncio.timeout(remaining):
                status = await self._client.answer(call.subscription_id, call.operation_id, success=accept)
        except (TimeoutError, FulfillmentUnavailableError) as exc:
            # no answer known in time: Azure accepts the change itself after 10 seconds unless our PATCH
            # (which may have arrived) declined it
            logger.warning("SaaS operation not answered in time", extra={"error": str(exc)})
            return accept
        if status == 409:
            # already completed (a repeated call): what it became is on the operation
            again = await self._client.operation(call.subscription_id, call.operation_id)
            return again is not None and again.get("status") == "Succeeded"
        return accept

    async def register(self, marketplace_token: str, tenant_id: str) -> LifecycleEvent:
        """The landing page: resolve the purchase token, activate the subscription, link it to ``tenant_id``.
        RequestRejectedError(403) for a token Microsoft does not know."""
        if not marketplace_token or len(marketplace_token) > 4096:
            raise RequestRejectedError(400, "no marketplace token")
        if not tenant_id or len(tenant_id) > 256 or not tenant_id.isprintable():
            raise RequestRejectedError(400, "a tenant id is 1 to 256 printable characters")
        resolved = await self._client.resolve(marketplace_token)
        if resolved is None or not isinstance(resolved.get("id"), str) or not resolved.get("planId"):
            raise RequestRejectedError(403, "the marketplace token does not resolve")
        subscription_id = resolved["id"].lower()
        quantity = resolved.get("quantity")
        quantity = quantity if isinstance(quantity, int) else None
        subscription = resolved.get("subscription")
        status = subscription.get("saasSubscriptionStatus") if isinstance(subscription, dict) else None
        now = self._clock()
        common: dict[str, Any] = {
            "key": SubjectKey(Marketplace.AZURE, subscription_id),
            "effective_at": now,
            "ordering": now,
            "source": EventSource.AZURE_REGISTRATION,
            "tenant_id": tenant_id,
            "identity": Identity(azure_subscription_id=subscription_id),
            "raw": {"resolve": resolved},
        }
        if status == "PendingFulfillmentStart":
            await self._client.activate(subscription_id, str(resolved["planId"]), quantity)
            return LifecycleEvent(
                kind=LifecycleKind.ACTIVE,
                event_id=f"activate:{subscription_id}",
                plan=str(resolved["planId"]),
                quantity=quantity,
                **common,
            )
        # Already activated (the landing page visited again), suspended or unsubscribed: only the tenant link
        # is news. An ACTIVE stamped now would be newer than a Suspend or Unsubscribe and revive the
        # subscription; a link-only event changes no status and no plan.
        return LifecycleEvent(kind=_LINK_ONLY, event_id=f"register:{subscription_id}:{tenant_id}", **common)


async def create(
    stack: contextlib.AsyncExitStack, secret: SecretRead, clock: Callable[[], datetime] | None = None
) -> AzureSubscriptions:
    """Build from the environment: the metering adapter's marketplace credentials (the same resource), the
    webhook's tenant/audience; the HTTP session and credential close with ``stack``."""
    from billing.adapters.azure_metering import (
        AzureSettings,
        EntraTokens,
        _client_credentials,
        client_secret_credential,
    )

    settings, marketplace = WebhookSettings(), AzureSettings()
    tokens: TokenSource
    if marketplace.access_token is not None:
        tokens = FixedToken(marketplace.access_token.get_secret_value())
    else:
        credentials, reloader = await _client_credentials(marketplace, secret)
        entra = EntraTokens(
            credentials, lambda c: client_secret_credential(c, marketplace.authority_host), reloader
        )
        stack.push_async_callback(entra.close)
        tokens = entra
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.answer_within))
    stack.push_async_callback(session.close)
    client = FulfillmentClient(session, tokens, settings.fulfillment_url)
    verifier = WebhookTokenVerifier(settings)
    if clock is None:
        return AzureSubscriptions(settings, client, verifier)
    return AzureSubscriptions(settings, client, verifier, clock=clock)


def _time(value: Any) -> datetime:
    if not isinstance(value, str) or not value:
        raise FulfillmentUnavailableError("the operation has no timeStamp")
    # Microsoft's examples carry no offset ("2018-12-01T00:00:00"): the time is UTC
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
