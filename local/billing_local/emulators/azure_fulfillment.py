"""An HTTP double of the Azure Marketplace SaaS fulfillment API v2 (``api-version=2018-08-31``) and of the
webhook Microsoft calls on the publisher, following Microsoft Learn ("SaaS fulfillment APIs version 2",
"Implementing a webhook on the SaaS service"):

- ``POST /api/saas/subscriptions/resolve`` with ``x-ms-marketplace-token`` (the landing page's ``token``
  query parameter): 200 ``{"id", "subscriptionName", "offerId", "planId", "quantity", "subscription": {…}}``;
  an unknown token is 400.
- ``GET /api/saas/subscriptions/{id}``: the subscription (``saasSubscriptionStatus`` PendingFulfillmentStart,
  Subscribed, Suspended or Unsubscribed; ``beneficiary``/``purchaser`` with ``tenantId``).
- ``POST /api/saas/subscriptions/{id}/activate`` ``{"planId", "quantity"}``: PendingFulfillmentStart ->
  Subscribed (again on a Subscribed one: 200, nothing changes); the plan must be the purchased one (400).
- ``GET /api/saas/subscriptions/{id}/operations/{operationId}``: the operation (``id``, ``activityId``,
  ``subscriptionId``, ``offerId``, ``publisherId``, ``planId``, ``quantity``, ``action``, ``timeStamp``,
  ``status`` NotStarted/InProgress/Failed/Succeeded/Conflict); 404 if there is no such operation for it.
- ``PATCH /api/saas/subscriptions/{id}/operations/{operationId}`` ``{"status": "Success"|"Failure"}``: answers
  a ChangePlan/ChangeQuantity in progress (Success applies it, Failure leaves the subscription as it was);
  an operation no longer in progress is 409.
- Every call needs the marketplace bearer token (403 otherwise, as the metering API) and the api-version
  (400).
- The webhook: a POST of the operation (plus ``subscription``) with ``Authorization: Bearer <JWT>`` issued by
  Microsoft Entra ID to the marketplace's first-party app (``appid`` 20e940b3-…) for the publisher's app
  (``aud`` its client id), ``iss`` ``https://sts.windows.net/{tenant}/``. ``WebhookSigner`` signs it with a
  local RSA key whose JWK is served at ``GET /{tenant}/discovery/v2.0/keys`` (Entra's JWKS format).
  ChangePlan/ChangeQuantity start InProgress: the publisher answers by PATCH within 10 seconds, or Microsoft
  accepts the change (``auto_accept``). Suspend, Reinstate, Renew and Unsubscribe are done when notified.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from billing_local.emulators.gcp_procurement import _http_api_event

API_VERSION = "2018-08-31"
MARKETPLACE_APP_ID = "20e940b3-4c77-4b0b-9a53-9e16a1b010a7"
_STATUS_AFTER = {
    "Subscribe": "Subscribed",  # auto-activation: Microsoft activates the subscription and notifies
    "Suspend": "Suspended",
    "Reinstate": "Subscribed",
    "Renew": "Subscribed",
    "Unsubscribe": "Unsubscribed",
}


class MeteredResource(Protocol):
    """billing_local.emulators.azure.AzureResource, as far as a subscription keeps it in step."""

    status: str
    plan_id: str
    ended_at: datetime | None


@dataclass
class SaasSubscription:
    id: str
    offer_id: str
    plan_id: str
    quantity: int | None
    beneficiary_tenant: str
    status: str = "PendingFulfillmentStart"
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    ended_at: datetime | None = None  # when it was unsubscribed

    def resource(self, publisher: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "name": f"subscription {self.id[:8]}",
            "publisherId": publisher,
            "offerId": self.offer_id,
            "planId": self.plan_id,
            "beneficiary": {"emailId": "user@customer.example", "objectId": str(uuid.uuid4()),
                            "tenantId": self.beneficiary_tenant, "puid": "1"},
            "purchaser": {"emailId": "user@customer.example", "objectId": str(uuid.uuid4()),
                          "tenantId": self.beneficiary_tenant, "puid": "1"},
            "allowedCustomerOperations": ["Delete", "Update", "Read"],
            "sessionMode": "None",
            "isFreeTrial": False,
            "isTest": False,
            "sandboxType": "None",
            "saasSubscriptionStatus": self.status,
            "created": _time(self.created),
        }  # fmt: skip
        if self.quantity is not None:
            body["quantity"] = self.quantity
        return body


@dataclass
class Operation:
    id: str
    subscription_id: str
    action: str
    plan_id: str
    quantity: int | None
    time_stamp: datetime
    status: str
    activity_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def resource(self, publisher: str, offer: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "activityId": self.activity_id,
            "subscriptionId": self.subscription_id,
            "offerId": offer,
            "publisherId": publisher,
            "planId": self.plan_id,
            "action": self.action,
            "timeStamp": _time(self.time_stamp),
            "status": self.status,
        }
        if self.quantity is not None:
            body["quantity"] = self.quantity
        return body


@dataclass
class Fulfillment:
    """The fulfillment API's state, what the publisher did, and the customer's actions (each returns the
    webhook payload Microsoft would send)."""

    publisher_id: str = "emulated-publisher"
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    subscriptions: dict[str, SaasSubscription] = field(default_factory=dict)
    operations: dict[str, Operation] = field(default_factory=dict)
    purchase_tokens: dict[str, str] = field(default_factory=dict)  # landing page token -> subscription id
    patches: list[tuple[str, str, datetime]] = field(default_factory=list)  # (operation id, status, when)
    activations: list[str] = field(default_factory=list)
    # metering resources (billing_local.emulators.azure) kept in step: status and plan follow the subscription
    resources: Mapping[str, MeteredResource] = field(default_factory=dict)

    def purchase(self, offer: str, plan: str, quantity: int | None = None, tenant: str | None = None) -> str:
        """A customer buys on Azure: a pending subscription, and the landing page token (to resolve)."""
        subscription = SaasSubscription(
            id=str(uuid.uuid4()),
            offer_id=offer,
            plan_id=plan,
            quantity=quantity,
            beneficiary_tenant=tenant or str(uuid.uuid4()),
            created=self.clock(),
        )
        self.subscriptions[subscription.id] = subscription
        token = secrets.token_urlsafe(48)
        self.purchase_tokens[token] = subscription.id
        return token

    def notify(
        self, subscription_id: str, action: str, *, plan: str | None = None, quantity: int | None = None
    ) -> dict[str, Any]:
        """The customer (or Microsoft) acts on a subscription; the webhook payload for it."""
        subscription = self.subscriptions[subscription_id]
        changing = action in ("ChangePlan", "ChangeQuantity")
        operation = Operation(
            id=str(uuid.uuid4()),
            subscription_id=subscription_id,
            action=action,
            plan_id=plan or subscription.plan_id,
            quantity=quantity if quantity is not None else subscription.quantity,
            time_stamp=self.clock(),
            status="InProgress" if changing else "Succeeded",
        )
        self.operations[operation.id] = operation
        if action in _STATUS_AFTER:
            subscription.status = _STATUS_AFTER[action]
            subscription.ended_at = operation.time_stamp if action == "Unsubscribe" else None
            self._sync(subscription)
        return self.webhook_payload(operation.id)

    def webhook_payload(self, operation_id: str) -> dict[str, Any]:
        operation = self.operations[operation_id]
        subscription = self.subscriptions[operation.subscription_id]
        body = operation.resource(self.publisher_id, subscription.offer_id)
        body["operationRequestSource"] = "Azure"
        body["subscription"] = subscription.resource(self.publisher_id)
        return body

    def auto_accept(self, operation_id: str) -> None:
        """No answer within 10 seconds: Microsoft goes ahead with the change."""
        self._complete(self.operations[operation_id], success=True)

    def _complete(self, operation: Operation, *, success: bool) -> None:
        operation.status = "Succeeded" if success else "Failed"
        if success:
            subscription = self.subscriptions[operation.subscription_id]
            subscription.plan_id, subscription.quantity = operation.plan_id, operation.quantity
            self._sync(subscription)

    def _sync(self, subscription: SaasSubscription) -> None:
        resource = self.resources.get(subscription.id.lower())
        if resource is not None:
            resource.status, resource.plan_id = subscription.status, subscription.plan_id
            resource.ended_at = subscription.ended_at

    # the API's side
    def _resolve(self, token: str | None) -> tuple[int, Any]:
        subscription_id = self.purchase_tokens.get(token or "")
        if subscription_id is None:
            return 400, {"error": {"code": "BadArgument", "message": "The marketplace token is invalid."}}
        subscription = self.subscriptions[subscription_id]
        body: dict[str, Any] = {
            "id": subscription.id,
            "subscriptionName": f"subscription {subscription.id[:8]}",
            "offerId": subscription.offer_id,
            "planId": subscription.plan_id,
            "subscription": subscription.resource(self.publisher_id),
        }
        if subscription.quantity is not None:
            body["quantity"] = subscription.quantity
        return 200, body

    def _activate(self, subscription_id: str, body: Any) -> tuple[int, Any]:
        subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            return 404, _error("NotFound", "subscription not found")
        if not isinstance(body, dict) or body.get("planId") != subscription.plan_id:
            return 400, _error("BadArgument", "planId must be the subscription's plan")
        if subscription.status not in ("PendingFulfillmentStart", "Subscribed"):
            return 400, _error("BadArgument", f"the subscription is {subscription.status}")
        subscription.status = "Subscribed"
        self.activations.append(subscription_id)
        self._sync(subscription)
        return 200, {}

    def _operation(self, subscription_id: str, operation_id: str) -> Operation | None:
        operation = self.operations.get(operation_id)
        if operation is None or operation.subscription_id.lower() != subscription_id.lower():
            return None
        return operation

    def _patch(self, subscription_id: str, operation_id: str, body: Any) -> tuple[int, Any]:
        operation = self._operation(subscription_id, operation_id)
        if operation is None:
            return 404, _error("NotFound", "operation not found")
        status = body.get("status") if isinstance(body, dict) else None
        if status not in ("Success", "Failure"):
            return 400, _error("BadArgument", "status must be Success or Failure")
        if operation.status != "InProgress":
            return 409, _error("Conflict", f"the operation is {operation.status}")
        self.patches.append((operation_id, status, self.clock()))
        self._complete(operation, success=status == "Success")
        return 200, {}


def add_routes(
    app: web.Application, fulfillment: Fulfillment, authorized: Callable[[web.Request], bool]
) -> None:
    """Mount the SaaS fulfillment API on ``app`` (bearer tokens checked by ``authorized``)."""

    def gate(request: web.Request) -> web.Response | None:
        if not authorized(request):
            refusal = "The authorization token isn't provided, is invalid or expired."
            return web.json_response(_error("Forbidden", refusal), status=403)
        if request.query.get("api-version") != API_VERSION:
            return web.json_response(_error("BadArgument", f"api-version must be {API_VERSION}"), status=400)
        return None

    async def resolve(request: web.Request) -> web.Response:
        refused = gate(request)
        if refused is not None:
            return refused
        return _answer(*fulfillment._resolve(request.headers.get("x-ms-marketplace-token")))

    async def subscription(request: web.Request) -> web.Response:
        refused = gate(request)
        if refused is not None:
            return refused
        found = fulfillment.subscriptions.get(request.match_info["id"])
        if found is None:
            return _answer(404, _error("NotFound", "subscription not found"))
        return _answer(200, found.resource(fulfillment.publisher_id))

    async def activate(request: web.Request) -> web.Response:
        refused = gate(request)
        if refused is not None:
            return refused
        return _answer(*fulfillment._activate(request.match_info["id"], await _json(request)))

    async def operation(request: web.Request) -> web.Response:
        refused = gate(request)
        if refused is not None:
            return refused
        subscription_id, operation_id = request.match_info["id"], request.match_info["operation"]
        if request.method == "PATCH":
            return _answer(*fulfillment._patch(subscription_id, operation_id, await _json(request)))
        found = fulfillment._operation(subscription_id, operation_id)
        if found is None:
            return _answer(404, _error("NotFound", "operation not found"))
        offer = fulfillment.subscriptions[found.subscription_id].offer_id
        return _answer(200, found.resource(fulfillment.publisher_id, offer))

    app.router.add_post("/api/saas/subscriptions/resolve", resolve)
    app.router.add_get("/api/saas/subscriptions/{id}", subscription)
    app.router.add_post("/api/saas/subscriptions/{id}/activate", activate)
    app.router.add_route("GET", "/api/saas/subscriptions/{id}/operations/{operation}", operation)
    app.router.add_route("PATCH", "/api/saas/subscriptions/{id}/operations/{operation}", operation)


class WebhookSigner:
    """Signs webhook calls the way Entra ID issues Microsoft's token: RS256, ``kid`` in the header, the public
    key served as a JWK Set by ``add_jwks_route``."""

    def __init__(self, tenant_id: str, audience: str, app_id: str = MARKETPLACE_APP_ID) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.tenant_id, self.audience, self.app_id = tenant_id, audience, app_id
        self.kid = secrets.token_urlsafe(16)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        from jwt.algorithms import RSAAlgorithm

        jwk = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "kty": "RSA"}]}

    def token(self, **overrides: Any) -> str:
        """The bearer token (real time: the verifier checks exp against its own clock); ``overrides``
        replace claims (``None`` removes one), for tests of forgeries."""
        import jwt

        now = datetime.now(UTC)
        claims: dict[str, Any] = {
            "aud": self.audience,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int((now + timedelta(hours=1)).timestamp()),
            "appid": self.app_id,
            "appidacr": "2",
            "idp": f"https://sts.windows.net/{self.tenant_id}/",
            "oid": str(uuid.uuid4()),
            "sub": str(uuid.uuid4()),
            "tid": self.tenant_id,
            "ver": "1.0",
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def http_api_event(self, payload: Mapping[str, Any], path: str = "/azure/webhook") -> dict[str, Any]:
        """The webhook call as the Subscriptions function receives it from API Gateway."""
        headers = {"authorization": f"Bearer {self.token()}"}
        return _http_api_event(json.dumps(dict(payload)), headers, path, "application/json", None)

    async def send(
        self, session: aiohttp.ClientSession, url: str, payload: Mapping[str, Any], token: str | None = None
    ) -> tuple[int, str]:
        """Call the publisher's webhook as Microsoft does; its status and body."""
        headers = {"Authorization": f"Bearer {token or self.token()}"}
        async with session.post(url, json=dict(payload), headers=headers) as response:
            return response.status, await response.text()


def landing_page_event(token: str, tenant_id: str, path: str = "/azure/register") -> dict[str, Any]:
    """The seller's landing page posting the purchase token (and the seller's tenant id) to the Subscriptions
    function, as API Gateway hands it over."""
    body = urlencode({"token": token, "tenant_id": tenant_id})
    return _http_api_event(body, {}, path, "application/x-www-form-urlencoded", None)


def add_jwks_route(app: web.Application, signer: WebhookSigner) -> None:
    async def keys(request: web.Request) -> web.Response:
        if request.match_info["tenant"] != signer.tenant_id:
            return web.json_response({"error": "invalid_tenant"}, status=400)
        return web.json_response(signer.jwks())

    app.router.add_get("/{tenant}/discovery/v2.0/keys", keys)


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def _answer(status: int, body: Any) -> web.Response:
    return web.json_response(body, status=status)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
