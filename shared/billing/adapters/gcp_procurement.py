"""Google Cloud Marketplace subscriptions: Procurement notifications by Pub/Sub push, read back from the
Partner Procurement API (``cloudcommerceprocurement.googleapis.com/v1``) and turned into ``LifecycleEvent``s.

Sources (Google's documentation):

- Push authentication (cloud.google.com/pubsub/docs/authenticate-push-subscriptions): the request carries
  ``Authorization: Bearer <OIDC token>`` signed by Google; the receiver verifies the signature against
  Google's public certificates, the ``aud`` it configured on the subscription, ``iss``
  (``accounts.google.com`` or ``https://accounts.google.com``), and ``email`` (the subscription's service
  account) with ``email_verified``. google-auth's ``id_token.verify_token`` does the signature,
  ``exp``/``iat`` and audience; the rest is here.
- Push body (cloud.google.com/pubsub/docs/push): ``{"message": {"data": base64, "messageId", "publishTime",
  "attributes"}, "subscription"}``; any 2xx acknowledges, anything else is redelivered.
- Notifications (…/marketplace/docs/partners/integrated-saas/manage-entitlements, "Integrate your app"): the
  data is JSON ``{"eventId", "eventType", "providerId", "entitlement": {"id", "updateTime", "newPlan"?}}`` or
  ``{…, "account": {"id", "updateTime"}}``. It carries ids only: "your app must get the latest state from the
  Partner Procurement API". The documented event types are ``EVENT_TYPES``. "If you've turned on multiple
  orders of the same product ... your app's event handling logic [must] respond to the ENTITLEMENT_ID instead
  of the ACCOUNT_ID": one billing subject per entitlement, metered under the entitlement's
  ``usageReportingId``.
- Entitlement (REST reference ``providers.entitlements``): ``state`` is one of
  ENTITLEMENT_ACTIVATION_REQUESTED, ENTITLEMENT_ACTIVE, ENTITLEMENT_PENDING_CANCELLATION,
  ENTITLEMENT_CANCELLED, ENTITLEMENT_PENDING_PLAN_CHANGE, ENTITLEMENT_PENDING_PLAN_CHANGE_APPROVAL,
  ENTITLEMENT_SUSPENDED; ``:approve`` answers a creation request, ``:approvePlanChange`` (``pendingPlanName``
  = ``newPendingPlan``) a plan change request; accounts have a ``signup`` approval answered by
  ``accounts/{id}:approve``.
- A pending cancellation runs to the end of the billing cycle: the entitlement's ``subscriptionEndTime``.

Since every notification is answered from the entitlement as it is now, a replayed or late notification yields
the entitlement's current state with its current ``updateTime`` (the ordering), which ``apply`` already holds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.adapters.bearer_http import (
    FixedToken,
    MaybeSentError,
    NotSentError,
    SecretRead,
    SecretReloader,
    TokenSource,
    request_json,
)
from billing.domain.errors import ConfigurationError
from billing.domain.model import Marketplace
from billing.domain.subscriptions import EventSource, Identity, LifecycleEvent, LifecycleKind, SubjectKey

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
EVENT_TYPES = frozenset(
    {
        "ACCOUNT_ACTIVE", "ACCOUNT_DELETED", "ACCOUNT_CREATION_REQUESTED",  # the last one deprecated
        "ENTITLEMENT_CREATION_REQUESTED", "ENTITLEMENT_OFFER_ACCEPTED", "ENTITLEMENT_ACTIVE",
        "ENTITLEMENT_PLAN_CHANGE_REQUESTED", "ENTITLEMENT_PLAN_CHANGED", "ENTITLEMENT_PLAN_CHANGE_CANCELLED",
        "ENTITLEMENT_PENDING_CANCELLATION", "ENTITLEMENT_CANCELLATION_REVERTED", "ENTITLEMENT_CANCELLING",
        "ENTITLEMENT_CANCELLED", "ENTITLEMENT_RENEWED", "ENTITLEMENT_OFFER_ENDED", "ENTITLEMENT_DELETED",
    }
)  # fmt: skip
_REFRESH_ON = (401,)


class PushRejectedError(Exception):
    """The push request is refused with ``status`` (400 malformed, 401/403 unverifiable; nothing written)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ProcurementUnavailableError(Exception):
    """The Procurement API gave no usable answer: the push is answered 503 and Pub/Sub delivers it again."""


class PushSettings(BaseSettings):
    """What a genuine push request must carry (the push subscription's settings)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    audience: str = Field(validation_alias="BILLING_GCP_PUSH_AUDIENCE", min_length=1)
    service_account: str = Field(validation_alias="BILLING_GCP_PUSH_SERVICE_ACCOUNT", min_length=1)
    certs_url: str = Field(default=GOOGLE_CERTS_URL, validation_alias="BILLING_GCP_PUSH_CERTS_URL")


class ProcurementSettings(BaseSettings):
    """Where the Partner Procurement API is, as whom, and which requests are approved automatically."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    url: str = Field(
        default="https://cloudcommerceprocurement.googleapis.com",
        validation_alias="BILLING_GCP_PROCUREMENT_URL",
    )
    provider_id: str = Field(validation_alias="BILLING_GCP_PROVIDER_ID", min_length=1)
    approve_accounts: bool = Field(default=False, validation_alias="BILLING_GCP_APPROVE_ACCOUNTS")
    approve_entitlements: bool = Field(default=False, validation_alias="BILLING_GCP_APPROVE_ENTITLEMENTS")
    approve_plan_changes: bool = Field(default=False, validation_alias="BILLING_GCP_APPROVE_PLAN_CHANGES")
    timeout_seconds: float = Field(default=10.0, gt=0, validation_alias="BILLING_GCP_TIMEOUT_SECONDS")


@dataclass(frozen=True)
class Notification:
    """One Procurement notification, as delivered."""

    event_id: str
    event_type: str
    provider_id: str
    entitlement_id: str | None
    account_id: str | None
    update_time: datetime | None
    message_id: str
    publish_time: datetime | None
    data: Mapping[str, Any]


def bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise PushRejectedError(401, "no bearer token")
    return token.strip()


class CachedCerts:
    """A google-auth transport for ``id_token.verify_token`` that keeps Google's certificates for a while.

    Without it every push costs a TLS connection and a GET of the certificates. Google rotates its keys with
    an overlap, so a cached set verifies new tokens for days; a token under a key not yet cached fails once,
    and ``forget`` lets the caller fetch the set again (at most once a minute, so forged key ids cost little).
    """

    def __init__(
        self, ttl: float = 3600.0, monotonic: Callable[[], float] = time.monotonic, request: Any = None
    ) -> None:
        self._ttl = ttl
        self._monotonic = monotonic
        self._request = request
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, url: str, method: str = "GET", **kwargs: Any) -> Any:
        with self._lock:
            hit = self._cache.get(url) if method == "GET" else None
        if hit is not None and self._monotonic() - hit[0] < self._ttl:
            return hit[1]
        if self._request is None:
            from google.auth.transport.requests import Request

            self._request = Request()
        kwargs.setdefault("timeout", 10)
        response = self._request(url, method=method, **kwargs)
        if method == "GET" and response.status == 200:
            with self._lock:
                self._cache[url] = (self._monotonic(), response)
        return response

    def forget(self, url: str, older_than: float = 60.0) -> bool:
        """Drop the cached set if it is older than ``older_than`` seconds; whether it was dropped."""
        with self._lock:
            hit = self._cache.get(url)
            if hit is None or self._monotonic() - hit[0] < older_than:
                return False
            del self._cache[url]
            return True


def verify_push_token(
    authorization: str | None, settings: PushSettings, request: Any = None
) -> Mapping[str, Any]:
    """The verified claims of the push request's OIDC token; PushRejectedError(401/403) otherwise.

    ``request`` is a google-auth transport (default: a fresh ``CachedCerts``). Synchronous: it fetches the
    certificates over HTTP, so async callers run it in a thread (``verify_push_token_async``)."""
    token = bearer(authorization)
    certs = request if request is not None else CachedCerts()
    try:
        claims = _verify_signature(token, settings, certs)
    except PushRejectedError:
        if not isinstance(certs, CachedCerts) or not certs.forget(settings.certs_url):
            raise
        claims = _verify_signature(token, settings, certs)  # signed with a key newer than the cached set?
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise PushRejectedError(401, "the push token was not issued by Google")
    if claims.get("email") != settings.service_account or claims.get("email_verified") is not True:
        raise PushRejectedError(403, "the push token is not the push subscription's service account")
    return claims


def _verify_signature(token: str, settings: PushSettings, request: Any) -> Mapping[str, Any]:
    import jwt
    from google.auth import exceptions as auth_exceptions
    from google.oauth2 import id_token

    try:
        claims: Mapping[str, Any] = id_token.verify_token(
            token, request, audience=settings.audience, certs_url=settings.certs_url
        )
    except auth_exceptions.TransportError as exc:
        raise ProcurementUnavailableError(f"Google's certificates could not be read: {exc}") from exc
    except (ValueError, auth_exceptions.GoogleAuthError, jwt.PyJWTError) as exc:
        # google-auth raises ValueError subclasses for a bad signature, an unknown key id, a wrong audience
        # and an expired token with x509 certificates; with a JWK Set it lets PyJWT's own errors through
        raise PushRejectedError(401, f"the push token does not verify: {type(exc).__name__}") from None
    return claims


async def verify_push_token_async(
    authorization: str | None, settings: PushSettings, request: Any = None
) -> Mapping[str, Any]:
    return await asyncio.to_thread(verify_push_token, authorization, settings, request)


def parse_push(body: bytes | str) -> Notification:
    """The notification in a push request body; PushRejectedError(400) when it is not one."""
    try:
        envelope = json.loads(body)
        message = envelope["message"]
        data = json.loads(base64.b64decode(message["data"], validate=True))
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise PushRejectedError(400, "not a Pub/Sub push request holding a JSON notification") from None
    if not isinstance(data, dict):
        raise PushRejectedError(400, "the notification is not a JSON object")
    event_id, event_type = data.get("eventId"), data.get("eventType")
    if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str) or not event_type:
        raise PushRejectedError(400, "the notification lacks eventId or eventType")
    subject = data.get("entitlement") if isinstance(data.get("entitlement"), dict) else None
    account = data.get("account") if isinstance(data.get("account"), dict) else None
    if (subject is None) == (account is None):
        raise PushRejectedError(400, "a notification names one entitlement or one account")
    identified = subject or account or {}
    subject_id = identified.get("id")
    if not isinstance(subject_id, str) or not subject_id or "/" in subject_id:
        raise PushRejectedError(400, "the notification's id is missing or not an id")
    try:
        update_time = _time(identified.get("updateTime"))
        publish_time = _time(message.get("publishTime"))
    except ValueError:
        raise PushRejectedError(400, "a time in the notification is not RFC 3339") from None
    return Notification(
        event_id=event_id,
        event_type=event_type,
        provider_id=str(data.get("providerId", "")),
        entitlement_id=subject_id if subject is not None else None,
        account_id=subject_id if account is not None else None,
        update_time=update_time,
        message_id=str(message.get("messageId") or message.get("message_id") or ""),
        publish_time=publish_time,
        data=data,
    )


class ProcurementClient:
    """The Partner Procurement API calls this needs, over aiohttp with a bearer token."""

    def __init__(
        self, session: aiohttp.ClientSession, tokens: TokenSource, endpoint: str, provider_id: str
    ) -> None:
        self._session = session
        self._tokens = tokens
        self._base = f"{endpoint.rstrip('/')}/v1/providers/{provider_id}"

    async def entitlement(self, entitlement_id: str) -> dict[str, Any] | None:
        """The entitlement as it is now; None when Google no longer has it (deleted)."""
        status, body = await self._call("GET", f"/entitlements/{entitlement_id}")
        if status == 404:
            return None
        return self._ok(status, body, "entitlements.get")

    async def account(self, account_id: str) -> dict[str, Any] | None:
        status, body = await self._call("GET", f"/accounts/{account_id}")
        if status == 404:
            return None
        return self._ok(status, body, "accounts.get")

    async def approve_entitlement(self, entitlement_id: str) -> None:
        self._ok(
            *await self._call("POST", f"/entitlements/{entitlement_id}:approve", {}), "entitlements.approve"
        )

    async def approve_plan_change(self, entitlement_id: str, pending_plan: str) -> None:
        status, body = await self._call(
            "POST", f"/entitlements/{entitlement_id}:approvePlanChange", {"pendingPlanName": pending_plan}
        )
        self._ok(status, body, "entitlements.approvePlanChange")

    async def approve_account(self, account_id: str) -> None:
        status, body = await self._call("POST", f"/accounts/{account_id}:approve", {"approvalName": "signup"})
        self._ok(status, body, "accounts.approve")

    async def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        try:
            return await request_json(
                self._session, method, self._base + path, body, self._tokens, _REFRESH_ON
            )
        except (NotSentError, MaybeSentError) as exc:
            raise ProcurementUnavailableError(f"{method} {path}: {exc}") from exc

    @staticmethod
    def _ok(status: int, body: Any, call: str) -> dict[str, Any]:
        if status != 200 or not isinstance(body, dict):
            raise ProcurementUnavailableError(f"{call}: HTTP {status}")
        return body


def lifecycle_event(
    notification: Notification, entitlement: Mapping[str, Any] | None
) -> LifecycleEvent | None:
    """The lifecycle event a notification means, given the entitlement as read after it (None: deleted).

    The kind follows the entitlement's state, not the notification's type: the state is what holds now."""
    entitlement_id = notification.entitlement_id
    if entitlement_id is None:
        return None
    key = SubjectKey(Marketplace.GCP, entitlement_id)
    raw: dict[str, Any] = {"notification": dict(notification.data), "entitlement": entitlement}
    if entitlement is None:
        # Gone. Only the deletion notice itself says when: any other notice read now is older (a replay or a
        # late delivery) and its time is not an end. Google deletes only a cancelled entitlement, so it was
        # over no later than the deletion (the cancellation notice, if seen, ends it earlier).
        moment = notification.update_time or notification.publish_time
        if notification.event_type != "ENTITLEMENT_DELETED" or moment is None:
            return None
        return LifecycleEvent(
            key=key,
            kind=LifecycleKind.ENDED,
            effective_at=moment,
            ordering=moment,
            event_id=notification.event_id,
            source=EventSource.GCP_PUBSUB,
            identity=Identity(gcp_entitlement_id=entitlement_id),
            raw=raw,
        )
    state = entitlement.get("state")
    updated = _time(entitlement.get("updateTime")) or notification.update_time
    if updated is None:
        raise ProcurementUnavailableError("the entitlement has no updateTime")
    effective = ordering = updated
    plan = entitlement.get("plan") or None
    kind: LifecycleKind
    if state == "ENTITLEMENT_ACTIVATION_REQUESTED":
        kind = LifecycleKind.REQUESTED
    elif state in (
        "ENTITLEMENT_ACTIVE",
        "ENTITLEMENT_PENDING_PLAN_CHANGE",
        "ENTITLEMENT_PENDING_PLAN_CHANGE_APPROVAL",
    ):
        # a requested or approved plan change is not in force yet: the current plan stays
        changed = notification.event_type == "ENTITLEMENT_PLAN_CHANGED"
        kind = LifecycleKind.PLAN_CHANGED if changed else LifecycleKind.ACTIVE
        noticed = notification.update_time
        if noticed is not None and noticed <= updated:
            # the change this notice is about happened at the notice's updateTime: delivered late (after
            # a later change of the entitlement), billing or the new plan must not start later than it did
            effective = ordering = noticed
            notice_plan = notification.data.get("entitlement", {}).get("newPlan")
            if changed and isinstance(notice_plan, str) and notice_plan:
                plan = notice_plan
    elif state == "ENTITLEMENT_PENDING_CANCELLATION":
        end = _time(entitlement.get("subscriptionEndTime"))
        # billed until the end of the billing cycle; with no end time known it stays active until Google
        # sends the cancellation itself
        kind, effective = (LifecycleKind.ENDING, end) if end is not None else (LifecycleKind.ACTIVE, updated)
    elif state == "ENTITLEMENT_CANCELLED":
        kind = LifecycleKind.ENDED
    elif state == "ENTITLEMENT_SUSPENDED":
        kind = LifecycleKind.SUSPENDED
    else:
        logger.warning("unknown entitlement state", extra={"state": state, "entitlement": entitlement_id})
        return None
    account = str(entitlement.get("account") or "").rsplit("/", 1)[-1] or None
    return LifecycleEvent(
        key=key,
        kind=kind,
        effective_at=effective,
        ordering=ordering,
        event_id=notification.event_id,
        source=EventSource.GCP_PUBSUB,
        plan=plan,
        identity=Identity(
            gcp_entitlement_id=entitlement_id,
            gcp_account_id=account,
            gcp_usage_reporting_id=entitlement.get("usageReportingId") or None,
            gcp_service_name=entitlement.get("productExternalName") or entitlement.get("product") or None,
        ),
        raw=raw,
    )


class GcpSubscriptions:
    """A verified push in, the lifecycle events it means out (approving requests when configured)."""

    def __init__(
        self,
        push: PushSettings,
        procurement: ProcurementSettings,
        client: ProcurementClient,
        verify: Callable[
            [str | None, PushSettings, Any], Awaitable[Mapping[str, Any]]
        ] = verify_push_token_async,
        certs: CachedCerts | None = None,
    ) -> None:
        self._push = push
        self._settings = procurement
        self._client = client
        self._verify = verify
        self._certs = certs or CachedCerts()  # kept across pushes (a warm Lambda environment)

    async def receive(self, authorization: str | None, body: bytes | str) -> list[LifecycleEvent]:
        """The events of one push request. Raises PushRejectedError (answer its status, write nothing) or
        ProcurementUnavailableError (answer 503: Pub/Sub delivers it again)."""
        await self._verify(authorization, self._push, self._certs)
        notification = parse_push(body)
        if notification.provider_id and notification.provider_id != self._settings.provider_id:
            raise PushRejectedError(403, "the notification is for another provider")
        if notification.event_type not in EVENT_TYPES:
            logger.warning("unknown Procurement event type", extra={"event_type": notification.event_type})
        if notification.account_id is not None:
            await self._account(notification.account_id)
            return []
        assert notification.entitlement_id is not None  # parse_push: one of the two
        entitlement = await self._client.entitlement(notification.entitlement_id)
        if entitlement is not None:
            await self._approve(notification.entitlement_id, entitlement)
        event = lifecycle_event(notification, entitlement)
        return [event] if event is not None else []

    async def _account(self, account_id: str) -> None:
        if not self._settings.approve_accounts:
            return
        account = await self._client.account(account_id)
        approvals = account.get("approvals", []) if account else []
        if any(a.get("name") == "signup" and a.get("state") == "PENDING" for a in approvals):
            await self._client.approve_account(account_id)

    async def _approve(self, entitlement_id: str, entitlement: Mapping[str, Any]) -> None:
        state = entitlement.get("state")
        if state == "ENTITLEMENT_ACTIVATION_REQUESTED" and self._settings.approve_entitlements:
            await self._client.approve_entitlement(entitlement_id)
        elif (
            state == "ENTITLEMENT_PENDING_PLAN_CHANGE_APPROVAL"
            and self._settings.approve_plan_changes
            and entitlement.get("newPendingPlan")
        ):
            await self._client.approve_plan_change(entitlement_id, str(entitlement["newPendingPlan"]))


async def create(stack: contextlib.AsyncExitStack, secret: SecretRead) -> GcpSubscriptions:
    """Build from the environment; the HTTP session and credentials close with ``stack``. The service account
    is the one Service Control uses (GOOGLE_APPLICATION_CREDENTIALS / BILLING_GCP_CREDENTIALS_SECRET_ARN,
    read again when refused), with the cloud-platform scope the Procurement API asks for."""
    from billing.adapters.gcp_service_control import GcpSettings, ServiceAccountTokens, _key_info

    push, procurement, credentials = PushSettings(), ProcurementSettings(), GcpSettings()
    tokens: TokenSource
    if credentials.access_token is not None:
        tokens = FixedToken(credentials.access_token.get_secret_value())
    else:
        read: Callable[[], Awaitable[str]]
        if credentials.credentials_file is not None:
            read = functools.partial(asyncio.to_thread, credentials.credentials_file.read_text)
        elif credentials.credentials_secret_arn:
            arn = credentials.credentials_secret_arn
            read = functools.partial(asyncio.to_thread, functools.partial(secret, arn, fresh=True))
        else:
            raise ConfigurationError(
                "set GOOGLE_APPLICATION_CREDENTIALS, BILLING_GCP_CREDENTIALS_SECRET_ARN "
                "or BILLING_GCP_ACCESS_TOKEN"
            )
        raw = await read()
        account = ServiceAccountTokens(
            _key_info(raw),
            timeout=procurement.timeout_seconds,
            reloader=SecretReloader(read, raw),
            scopes=(SCOPE,),
        )
        stack.callback(account.close)
        tokens = account
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=procurement.timeout_seconds))
    stack.push_async_callback(session.close)
    client = ProcurementClient(session, tokens, procurement.url, procurement.provider_id)
    return GcpSubscriptions(push, procurement, client)


def _time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError("not a time")
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("a time without offset")
    return moment.astimezone(UTC)
