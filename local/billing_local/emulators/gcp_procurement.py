"""An HTTP double of Google's Cloud Commerce Partner Procurement API
(``cloudcommerceprocurement.googleapis.com`` v1) and of a Pub/Sub push subscription delivering its
notifications, following the documented behaviour:

- Resources and methods (REST reference of ``providers.accounts`` and ``providers.entitlements``): ``GET
  /v1/providers/{p}/accounts/{a}``, ``POST …/accounts/{a}:approve`` (``{"approvalName": "signup"}``), ``GET
  /v1/providers/{p}/entitlements/{e}``, ``POST …/entitlements/{e}:approve``, ``:reject``,
  ``:approvePlanChange`` (``{"pendingPlanName": …}``, which must equal the entitlement's ``newPendingPlan``).
  An approval on an entitlement in another state is 400 FAILED_PRECONDITION; an unknown id is 404 NOT_FOUND;
  no bearer token is 401 UNAUTHENTICATED (the same token store as the Service Control double).
- Notifications (cloud.google.com/marketplace/docs/partners/integrated-saas/manage-entitlements and "Integrate
  your app"): the message data is JSON ``{"eventId", "eventType", "providerId", "entitlement": {"id",
  "updateTime", "newPlan"?}}`` or ``{…, "account": {"id", "updateTime"}}``: ids only, the state is read from
  the API. Event types used here: ACCOUNT_ACTIVE, ACCOUNT_DELETED, ENTITLEMENT_CREATION_REQUESTED,
  ENTITLEMENT_ACTIVE, ENTITLEMENT_PLAN_CHANGE_REQUESTED, ENTITLEMENT_PLAN_CHANGED,
  ENTITLEMENT_PLAN_CHANGE_CANCELLED, ENTITLEMENT_PENDING_CANCELLATION, ENTITLEMENT_CANCELLATION_REVERTED,
  ENTITLEMENT_CANCELLING, ENTITLEMENT_CANCELLED, ENTITLEMENT_DELETED.
- Push delivery (cloud.google.com/pubsub/docs/push and …/authenticate-push-subscriptions): a POST of
  ``{"message": {"data": base64(JSON), "messageId", "publishTime", "attributes"}, "subscription"}`` with
  ``Authorization: Bearer <OIDC token>``, an RS256 JWT signed by Google with ``iss``
  ``https://accounts.google.com``, ``aud`` the configured audience, ``email`` the push service account and
  ``email_verified`` true. Google publishes its keys at ``https://www.googleapis.com/oauth2/v1/certs`` as
  ``{kid: x509 PEM}`` (and at ``…/oauth2/v3/certs`` as a JWK Set); ``PushSigner`` signs with a local key,
  ``GET /oauth2/v1/certs`` and ``/oauth2/v3/certs`` serve its keys in those formats.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web

from billing_local.emulators.aws_events import SELLER_ACCOUNT  # the account the seller's API is in

GOOGLE_ISSUER = "https://accounts.google.com"


@dataclass
class Entitlement:
    """One order of a product by a Google billing account (Partner Procurement ``Entitlement``)."""

    id: str
    account: str
    product: str
    plan: str
    usage_reporting_id: str
    state: str = "ENTITLEMENT_ACTIVATION_REQUESTED"
    new_pending_plan: str = ""
    create_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    update_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    subscription_end_time: datetime | None = None
    cancellation_reason: str = ""

    def resource(self, provider: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": f"providers/{provider}/entitlements/{self.id}",
            "provider": provider,
            "account": f"providers/{provider}/accounts/{self.account}",
            "product": self.product,
            "productExternalName": self.product,
            "plan": self.plan,
            "usageReportingId": self.usage_reporting_id,
            "state": self.state,
            "createTime": _rfc3339(self.create_time),
            "updateTime": _rfc3339(self.update_time),
        }
        if self.new_pending_plan:
            body["newPendingPlan"] = self.new_pending_plan
        if self.subscription_end_time is not None:
            body["subscriptionEndTime"] = _rfc3339(self.subscription_end_time)
        if self.cancellation_reason:
            body["cancellationReason"] = self.cancellation_reason
        return body


@dataclass
class Procurement:
    """The Procurement API's state for one provider, the messages it has published, and customer actions."""

    provider: str = "emulated-provider"
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    entitlements: dict[str, Entitlement] = field(default_factory=dict)
    deleted: dict[str, Entitlement] = field(default_factory=dict)
    published: list[dict[str, Any]] = field(default_factory=list)  # message data, in publish order
    approvals: list[tuple[str, str]] = field(default_factory=list)  # (method, id) approvals received

    # customer actions on the Marketplace side: each changes the state and publishes the notification
    def sign_up(self, account: str) -> dict[str, Any]:
        now = self.clock()
        self.accounts[account] = {
            "name": f"providers/{self.provider}/accounts/{account}",
            "provider": self.provider,
            "state": "ACCOUNT_ACTIVE",
            "approvals": [{"name": "signup", "state": "PENDING", "updateTime": _rfc3339(now)}],
            "createTime": _rfc3339(now),
            "updateTime": _rfc3339(now),
        }
        return self._publish("ACCOUNT_ACTIVE", account={"id": account, "updateTime": _rfc3339(now)})

    def purchase(self, entitlement: str, account: str, product: str, plan: str) -> dict[str, Any]:
        now = self.clock()
        self.entitlements[entitlement] = Entitlement(
            id=entitlement,
            account=account,
            product=product,
            plan=plan,
            usage_reporting_id=f"project_number:{secrets.randbelow(10**12)}",
            create_time=now,
            update_time=now,
        )
        return self._entitlement_event("ENTITLEMENT_CREATION_REQUESTED", entitlement)

    def request_plan_change(self, entitlement: str, plan: str) -> dict[str, Any]:
        item = self._touch(entitlement, "ENTITLEMENT_PENDING_PLAN_CHANGE_APPROVAL")
        item.new_pending_plan = plan
        return self._entitlement_event("ENTITLEMENT_PLAN_CHANGE_REQUESTED", entitlement, newPlan=plan)

    def effect_plan_change(self, entitlement: str) -> dict[str, Any]:
        """The approved plan change takes effect (Google does this at the start of the next cycle)."""
        item = self._touch(entitlement, "ENTITLEMENT_ACTIVE")
        item.plan, item.new_pending_plan = item.new_pending_plan, ""
        return self._entitlement_event("ENTITLEMENT_PLAN_CHANGED", entitlement, newPlan=item.plan)

    def cancel(self, entitlement: str, *, at_period_end: datetime | None = None) -> dict[str, Any]:
        """Cancel now, or at ``at_period_end`` (ENTITLEMENT_PENDING_CANCELLATION until then)."""
        if at_period_end is not None:
            item = self._touch(entitlement, "ENTITLEMENT_PENDING_CANCELLATION")
            item.subscription_end_time = at_period_end
            return self._entitlement_event("ENTITLEMENT_PENDING_CANCELLATION", entitlement)
        item = self._touch(entitlement, "ENTITLEMENT_CANCELLED")
        item.cancellation_reason = "CUSTOMER_CANCELLED"
        return self._entitlement_event("ENTITLEMENT_CANCELLED", entitlement)

    def revert_cancellation(self, entitlement: str) -> dict[str, Any]:
        item = self._touch(entitlement, "ENTITLEMENT_ACTIVE")
        item.subscription_end_time = None
        return self._entitlement_event("ENTITLEMENT_CANCELLATION_REVERTED", entitlement)

    def delete(self, entitlement: str) -> dict[str, Any]:
        item = self.entitlements.pop(entitlement)
        item.update_time = self.clock()
        self.deleted[entitlement] = item
        return self._publish(
            "ENTITLEMENT_DELETED", entitlement={"id": entitlement, "updateTime": _rfc3339(item.update_time)}
        )

    def consumer_state(self, usage_reporting_id: str) -> str | None:
        """The state of the entitlement metered as ``usage_reporting_id`` (Service Control's consumerId);
        None when no entitlement ever had it."""
        for item in self.entitlements.values():
            if item.usage_reporting_id == usage_reporting_id:
                return item.state
        if any(item.usage_reporting_id == usage_reporting_id for item in self.deleted.values()):
            return "DELETED"
        return None

    def _touch(self, entitlement: str, state: str) -> Entitlement:
        item = self.entitlements[entitlement]
        item.state, item.update_time = state, self.clock()
        return item

    def _entitlement_event(self, event_type: str, entitlement: str, **extra: str) -> dict[str, Any]:
        item = self.entitlements[entitlement]
        return self._publish(
            event_type, entitlement={"id": entitlement, "updateTime": _rfc3339(item.update_time), **extra}
        )

    def _publish(self, event_type: str, **subject: Any) -> dict[str, Any]:
        data = {"eventId": str(uuid.uuid4()), "eventType": event_type, "providerId": self.provider, **subject}
        self.published.append(data)
        return data

    # the API's side
    def _get_entitlement(self, entitlement: str) -> tuple[int, Any]:
        item = self.entitlements.get(entitlement)
        if item is None:
            return _error(404, f"Entitlement {entitlement} not found")
        return 200, item.resource(self.provider)

    def _entitlement_method(self, entitlement: str, method: str, body: Any) -> tuple[int, Any]:
        item = self.entitlements.get(entitlement)
        if item is None:
            return _error(404, f"Entitlement {entitlement} not found")
        body = body if isinstance(body, dict) else {}
        if method in ("approve", "reject"):
            if item.state != "ENTITLEMENT_ACTIVATION_REQUESTED":
                return _error(400, f"entitlement is {item.state}", "FAILED_PRECONDITION")
            self.approvals.append((method, entitlement))
            if method == "approve":
                self._touch(entitlement, "ENTITLEMENT_ACTIVE")
                self._entitlement_event("ENTITLEMENT_ACTIVE", entitlement)
            else:
                self._touch(entitlement, "ENTITLEMENT_CANCELLED")
                self._entitlement_event("ENTITLEMENT_CANCELLED", entitlement)
            return 200, {}
        if method == "approvePlanChange":
            if item.state != "ENTITLEMENT_PENDING_PLAN_CHANGE_APPROVAL":
                return _error(400, f"entitlement is {item.state}", "FAILED_PRECONDITION")
            if body.get("pendingPlanName") != item.new_pending_plan:
                return _error(400, "pendingPlanName must be the entitlement's newPendingPlan")
            self.approvals.append((method, entitlement))
            self._touch(entitlement, "ENTITLEMENT_PENDING_PLAN_CHANGE")
            return 200, {}
        return _error(404, f"unknown method {method}")

    def _account_method(self, account: str, method: str, body: Any) -> tuple[int, Any]:
        item = self.accounts.get(account)
        if item is None:
            return _error(404, f"Account {account} not found")
        if method is None:
            return 200, item
        name = body.get("approvalName") if isinstance(body, dict) else None
        approval = next((a for a in item["approvals"] if a["name"] == name), None)
        if method != "approve" or approval is None:
            return _error(400, "approvalName must name one of the account's approvals")
        approval["state"] = "APPROVED"
        self.approvals.append(("accounts.approve", account))
        return 200, {}


def add_routes(
    app: web.Application, procurement: Procurement, authorized: Callable[[web.Request], bool]
) -> None:
    """Mount the Procurement API on ``app`` (tokens checked by ``authorized``)."""

    async def entitlements(request: web.Request) -> web.Response:
        if request.match_info["provider"] != procurement.provider:
            return _answer(*_error(403, "The caller does not have permission", "PERMISSION_DENIED"))
        if not authorized(request):
            return _answer(*_error(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED"))
        resource, _, method = request.match_info["call"].partition(":")
        if request.method == "GET" and not method:
            return _answer(*procurement._get_entitlement(resource))
        if request.method == "POST" and method:
            return _answer(*procurement._entitlement_method(resource, method, await _json(request)))
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])

    async def accounts(request: web.Request) -> web.Response:
        if request.match_info["provider"] != procurement.provider:
            return _answer(*_error(403, "The caller does not have permission", "PERMISSION_DENIED"))
        if not authorized(request):
            return _answer(*_error(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED"))
        resource, _, method = request.match_info["call"].partition(":")
        body = await _json(request) if request.method == "POST" else None
        return _answer(*procurement._account_method(resource, method or None, body))  # type: ignore[arg-type]

    app.router.add_route("*", "/v1/providers/{provider}/entitlements/{call}", entitlements)
    app.router.add_route("*", "/v1/providers/{provider}/accounts/{call}", accounts)


class PushSigner:
    """Signs Pub/Sub push requests the way Google does: an RS256 OIDC token from a key only it (here: this
    object) holds; ``certs()`` is the public half in the format of ``https://www.googleapis.com/oauth2/v1/certs``."""

    def __init__(
        self,
        audience: str,
        email: str = "marketplace-push@emulated-project.iam.gserviceaccount.com",
        subscription: str = "projects/emulated-project/subscriptions/procurement-push",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.audience, self.email, self.subscription, self._clock = audience, email, subscription, clock
        self.certs_requests = 0
        self._published: dict[str, Any] = {}  # kid -> private key, every key still published
        self.rotate()

    def rotate(self) -> None:
        """Sign with a new key from now on; the old ones stay published (Google rotates with an overlap)."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.kid = secrets.token_hex(20)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._published[self.kid] = self._key

    def certs(self) -> dict[str, str]:
        """``https://www.googleapis.com/oauth2/v1/certs``: key id -> x509 certificate (PEM)."""
        return {kid: _certificate(key) for kid, key in self._published.items()}

    def jwks(self) -> dict[str, Any]:
        """``https://www.googleapis.com/oauth2/v3/certs``: the same keys as a JWK Set."""
        from jwt.algorithms import RSAAlgorithm

        keys = []
        for kid, key in self._published.items():
            jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}

    def token(self, **overrides: Any) -> str:
        """The OIDC token; ``overrides`` replace claims (``None`` removes one), for tests of forgeries."""
        import jwt

        now = self._clock()
        claims: dict[str, Any] = {
            "iss": GOOGLE_ISSUER,
            "aud": self.audience,
            "azp": "1" + str(secrets.randbelow(10**20)),
            "sub": "1" + str(secrets.randbelow(10**20)),
            "email": self.email,
            "email_verified": True,
            "iat": int(now.timestamp()),
            "exp": int((now + timedelta(hours=1)).timestamp()),
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def envelope(self, data: dict[str, Any]) -> dict[str, Any]:
        """The push request body for one published message (``data`` is the notification JSON)."""
        message_id = str(secrets.randbelow(10**16))
        encoded = base64.b64encode(json.dumps(data).encode()).decode()
        return {
            "message": {
                "data": encoded,
                "messageId": message_id,
                "message_id": message_id,
                "publishTime": _rfc3339(self._clock()),
                "attributes": {},
            },
            "subscription": self.subscription,
        }

    def http_api_event(self, data: dict[str, Any], path: str = "/gcp/pubsub") -> dict[str, Any]:
        """The push of ``data`` as the Subscriptions function receives it from API Gateway."""
        return http_api_event(self.envelope(data), f"Bearer {self.token()}", path)

    async def push(
        self, session: aiohttp.ClientSession, url: str, data: dict[str, Any], token: str | None = None
    ) -> tuple[int, str]:
        """Deliver one message to ``url`` as Pub/Sub push does; the endpoint's status and body."""
        headers = {"Authorization": f"Bearer {token or self.token()}"}
        async with session.post(url, json=self.envelope(data), headers=headers) as response:
            return response.status, await response.text()


def add_certs_route(app: web.Application, signer: PushSigner) -> None:
    async def certs(request: web.Request) -> web.Response:
        signer.certs_requests += 1
        return web.json_response(signer.certs())

    async def jwks(request: web.Request) -> web.Response:
        signer.certs_requests += 1
        return web.json_response(signer.jwks())

    app.router.add_get("/oauth2/v1/certs", certs)
    app.router.add_get("/oauth2/v3/certs", jwks)


def _certificate(key: Any) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "emulated.securetoken.system.gserviceaccount.com")]
    )
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=14))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


async def _json(request: web.Request) -> Any:
    try:
        return await request.json() if await request.read() else {}
    except ValueError:
        return None


def _answer(status: int, body: Any) -> web.Response:
    return web.json_response(body, status=status)


def _error(status: int, message: str, name: str | None = None) -> tuple[int, dict[str, Any]]:
    names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}
    return status, {
        "error": {"code": status, "message": message, "status": name or names.get(status, "UNKNOWN")}
    }


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def http_api_event(
    body: dict[str, Any], authorization: str, path: str = "/gcp/pubsub", at: datetime | None = None
) -> dict[str, Any]:
    """A push request as API Gateway HTTP API (payload format 2.0) hands it to a Lambda function."""
    return _http_api_event(json.dumps(body), {"authorization": authorization}, path, "application/json", at)


def _http_api_event(
    body: str, headers: dict[str, str], path: str, content_type: str, at: datetime | None
) -> dict[str, Any]:
    moment = at or datetime.now(UTC)
    return {
        "version": "2.0",
        "routeKey": f"POST {path}",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": content_type, "host": "subscriptions.example.com", **headers},
        # every field API Gateway always sends (API Gateway Developer Guide, "HTTP API Lambda
        # integrations", payload format 2.0); the APM agent's capture_serverless reads accountId
        "requestContext": {
            "accountId": SELLER_ACCOUNT,
            "apiId": "local",
            "domainName": "subscriptions.example.com",
            "domainPrefix": "subscriptions",
            "http": {
                "method": "POST",
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "198.51.100.9",
                "userAgent": "APIs-Google; (+https://developers.google.com/webmasters/APIs-Google.html)",
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": f"POST {path}",
            "stage": "$default",
            "time": moment.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(moment.timestamp() * 1000),
        },
        "body": body,
        "isBase64Encoded": False,
    }
