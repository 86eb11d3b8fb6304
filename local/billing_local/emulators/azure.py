"""An HTTP double of the Azure Marketplace metered billing API and of the Entra ID token endpoint, following
the documented behaviour (see billing.adapters.azure_metering for the sources).

- ``POST /api/batchUsageEvent`` and ``POST /api/usageEvent`` (``api-version=2018-08-31``): a bearer token is
  required; without a valid one the answer is 403, as Microsoft documents ("The authorization token isn't
  provided, is invalid or expired"). A batch holds 1 to 25 events (400 otherwise); each event is answered on
  its own: ``Accepted``, ``Duplicate`` (one event per resource, dimension and hour; the answer carries the
  original event in ``error.additionalInfo.acceptedMessage``), ``Expired`` (``effectiveStartTime`` more than
  24 hours before the clock), ``ResourceNotFound``, ``ResourceNotAuthorized``, ``ResourceNotActive``,
  ``InvalidDimension``, ``InvalidQuantity`` (<= 0), ``BadArgument``, and ``Error`` when injected. The single
  event API answers a duplicate with 409 Conflict and the same ``additionalInfo``.
- The SaaS fulfillment API and the webhook signer's JWK Set when ``fulfillment``/``webhook_signer`` are set
  (billing_local.emulators.azure_fulfillment).
- ``POST /{tenant}/oauth2/v2.0/token`` (client credentials, scope ``<marketplace resource>/.default``, what
  azure-identity sends) and the v1 ``POST /{tenant}/oauth2/token`` (``resource=…``, what Microsoft's
  marketplace pages show). azure-identity accepts only an https authority, so this app is served over TLS by
  ``HttpsServer`` with a certificate from ``self_signed_certificate``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import secrets
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import web

from billing_local.emulators.azure_fulfillment import Fulfillment, WebhookSigner, add_jwks_route, add_routes
from billing_local.emulators.quota import Quota
from billing_local.emulators.server import BackgroundServer

if TYPE_CHECKING:
    from pathlib import Path

API_VERSION = "2018-08-31"
MARKETPLACE_RESOURCE = "20e940b3-4c77-4b0b-9a53-9e16a1b010a7"
WINDOW = timedelta(hours=24)
BATCH_LIMIT = 25
NO_TIME = "0001-01-01T00:00:00Z"  # the messageTime Microsoft shows on events it did not accept


@dataclass
class AzureResource:
    """A SaaS subscription (resourceId) or managed app (resourceUri) the publisher may meter."""

    plan_id: str
    dimensions: Iterable[str]
    status: str = "Subscribed"  # anything else answers ResourceNotActive
    authorized: bool = True  # False: published with another Entra app id (ResourceNotAuthorized)
    # when an Unsubscribed resource ended: usage for hours that began before it is still taken (below)
    ended_at: datetime | None = None


@dataclass(frozen=True)
class AzureUsageEvent:
    """An event the marketplace holds."""

    usage_event_id: str
    resource_key: str
    resource_field: str  # "resourceId" or "resourceUri"
    plan_id: str
    dimension: str
    quantity: float
    effective_start_time: str  # as sent
    hour: datetime
    message_time: datetime

    def message(self, status: str = "Accepted") -> dict[str, Any]:
        """The event as the API shows it (UsageEventOkResponse)."""
        return {
            "usageEventId": self.usage_event_id,
            "status": status,
            "messageTime": self.message_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            self.resource_field: self.resource_key,
            "quantity": self.quantity,
            "dimension": self.dimension,
            "effectiveStartTime": self.effective_start_time,
            "planId": self.plan_id,
        }


@dataclass(frozen=True)
class Exchange:
    """One metering request and the emulator's answer, for tests to inspect and validate."""

    path: str
    query: Mapping[str, str]
    body: Any
    status: int
    response: Any


@dataclass(frozen=True)
class _Outcome:
    status: str
    message: str = ""
    event: AzureUsageEvent | None = None  # the accepted event, or the original one for Duplicate


@dataclass
class AzureEmulator:
    """The emulator's state: configuration, what it holds, and the faults to inject next."""

    resources: Mapping[str, AzureResource]  # by resourceId (lowercase) or resourceUri
    tenant_id: str = "00000000-0000-0000-0000-0000000000aa"
    clients: Mapping[str, str] = field(default_factory=dict)  # Entra app client id -> client secret
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    token_lifetime: int = 3600  # seconds a token is honoured
    advertised_lifetime: int | None = None  # the ``expires_in`` told to the client (default: the above)
    accepted: dict[tuple[str, str, datetime], AzureUsageEvent] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    token_requests: int = 0
    fixed_tokens: set[str] = field(default_factory=set)
    # the SaaS fulfillment API (same host and tokens as metering) and the key the webhook sender signs with
    # (its JWK Set at /{tenant}/discovery/v2.0/keys)
    fulfillment: Fulfillment | None = None
    webhook_signer: WebhookSigner | None = None
    _tokens: dict[str, float] = field(default_factory=dict)
    _http_faults: deque[int] = field(default_factory=deque)
    _item_faults: dict[str, deque[str]] = field(default_factory=dict)
    _delay: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # calls a second per publisher (the bearer token's app): past it, 429 Too Many Requests with
    # Retry-After, the generic Azure throttle (Microsoft documents no rate for this API); off by default
    quota: Quota = field(default_factory=Quota)

    def fail_next(self, *statuses: int) -> None:
        """Answer the next metering calls with these HTTP statuses."""
        self._http_faults.extend(statuses)

    def force_status(self, dimension: str, *statuses: str) -> None:
        """Answer the next events of ``dimension`` with these statuses (e.g. ``Error``)."""
        self._item_faults.setdefault(dimension, deque()).extend(statuses)

    def delay(self, seconds: float) -> None:
        """Answer metering calls only after ``seconds`` (the events are recorded first)."""
        self._delay = seconds

    def revoke_tokens(self) -> None:
        """Forget every token issued so far: the next call with one of them is 403."""
        self._tokens.clear()

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        if token in self.fixed_tokens:
            return True
        expires = self._tokens.get(token)
        return expires is not None and expires > time.time()

    def _issue_token(self) -> tuple[str, int]:
        token = "eyJ.emulated." + secrets.token_urlsafe(24)
        self._tokens[token] = time.time() + self.token_lifetime
        return token, self.token_lifetime if self.advertised_lifetime is None else self.advertised_lifetime

    def _evaluate(self, event: Any) -> _Outcome:
        """Decide one usage event as the metering service does, recording it if accepted."""
        if not isinstance(event, dict):
            return _Outcome("BadArgument", "a usage event is a JSON object")
        forced = self._item_faults.get(str(event.get("dimension")))
        if forced:
            return _Outcome(forced.popleft(), "injected by the emulator")
        resource_id, resource_uri = event.get("resourceId"), event.get("resourceUri")
        if (resource_id is None) == (resource_uri is None):
            return _Outcome("BadArgument", "Only use resourceUri or resourceId, but never both.")
        dimension, plan_id, quantity = event.get("dimension"), event.get("planId"), event.get("quantity")
        if not isinstance(dimension, str) or not dimension:
            return _Outcome("BadArgument", "The dimension is required.")
        if not isinstance(plan_id, str) or not plan_id:
            return _Outcome("BadArgument", "The planId is required.")
        if isinstance(quantity, bool) or not isinstance(quantity, int | float):
            return _Outcome("BadArgument", "The quantity is required.")
        try:
            effective = _timestamp(str(event.get("effectiveStartTime")))
        except ValueError:
            return _Outcome("BadArgument", "The effectiveStartTime is not a date-time.")
        key = str(resource_id).lower() if resource_id is not None else str(resource_uri)
        resource = self.resources.get(key)
        if resource is None:
            return _Outcome("ResourceNotFound", f"resource {key} not found")
        if not resource.authorized:
            return _Outcome("ResourceNotAuthorized", "not authorized to emit usage for this resource")
        if resource.status != "Subscribed" and not _before_the_end(resource, effective):
            return _Outcome("ResourceNotActive", f"the resource is {resource.status}")
        if plan_id != resource.plan_id:
            return _Outcome("BadArgument", f"planId {plan_id} is not the resource's plan")
        if dimension not in set(resource.dimensions):
            return _Outcome("InvalidDimension", f"dimension {dimension} is not in plan {plan_id}")
        if quantity <= 0:
            return _Outcome("InvalidQuantity", "The quantity must be greater than 0.")
        now = self.clock()
        if effective < now - WINDOW:
            return _Outcome("Expired", "The effectiveStartTime is more than 24 hours in the past.")
        if effective > now:
            return _Outcome("BadArgument", "The effectiveStartTime is in the future.")
        hour = effective.replace(minute=0, second=0, microsecond=0)
        with self._lock:
            original = self.accepted.get((key, dimension, hour))
            if original is not None:
                return _Outcome("Duplicate", "This usage event already exist.", original)
            recorded = AzureUsageEvent(
                usage_event_id=str(uuid.uuid4()),
                resource_key=key,
                resource_field="resourceId" if resource_id is not None else "resourceUri",
                plan_id=plan_id,
                dimension=dimension,
                quantity=float(quantity),
                effective_start_time=str(event["effectiveStartTime"]),
                hour=hour,
                message_time=now,
            )
            self.accepted[(key, dimension, hour)] = recorded
        return _Outcome("Accepted", event=recorded)


def create_app(emulator: AzureEmulator) -> web.Application:
    """The metering API: ``/api/batchUsageEvent`` and ``/api/usageEvent``."""

    async def batch(request: web.Request) -> web.Response:
        status, answer, body = await _gate(emulator, request)
        if status == 200:
            events = body.get("request") if isinstance(body, dict) else None
            if not isinstance(events, list) or not events:
                status, answer = (
                    400,
                    _bad_request("BadArgument", "The request must hold 1 to 25 usage events."),
                )
            elif len(events) > BATCH_LIMIT:
                status, answer = (
                    400,
                    _bad_request("BadArgument", "The batch contained more than 25 usage events."),
                )
            else:
                results = [_item(event, emulator._evaluate(event)) for event in events]
                answer = {"count": len(results), "result": results}
        return await _answer(emulator, request, body, status, answer)

    async def single(request: web.Request) -> web.Response:
        status, answer, body = await _gate(emulator, request)
        if status == 200:
            outcome = emulator._evaluate(body)
            if outcome.status == "Accepted" and outcome.event is not None:
                answer = outcome.event.message()
            elif outcome.status == "Duplicate" and outcome.event is not None:
                status, answer = 409, _conflict(outcome.event)
            elif outcome.status == "Error":
                status, answer = 500, _bad_request("Error", outcome.message)
            else:
                status, answer = 400, _bad_request(outcome.status, outcome.message)
        return await _answer(emulator, request, body, status, answer)

    app = web.Application()
    app.router.add_post("/api/batchUsageEvent", batch)
    app.router.add_post("/api/usageEvent", single)
    if emulator.fulfillment is not None:
        add_routes(app, emulator.fulfillment, emulator._authorized)
    if emulator.webhook_signer is not None:
        add_jwks_route(app, emulator.webhook_signer)
    return app


def create_token_app(emulator: AzureEmulator) -> web.Application:
    """The Entra ID token endpoint for client credentials (v2.0 scope and v1 resource forms)."""

    async def token(request: web.Request) -> web.Response:
        emulator.token_requests += 1
        form = await request.post()
        if request.match_info["tenant"] != emulator.tenant_id:
            return _oauth_error(400, "invalid_request", "AADSTS90002: Tenant not found.")
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "client_credentials only")
        client_id, client_secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        if emulator.clients.get(client_id) != client_secret or not client_secret:
            return _oauth_error(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
        v2 = request.path.endswith("/v2.0/token")
        wanted = f"{MARKETPLACE_RESOURCE}/.default" if v2 else MARKETPLACE_RESOURCE
        if form.get("scope" if v2 else "resource") != wanted:
            return _oauth_error(400, "invalid_scope", f"expected {wanted}")
        access_token, lifetime = emulator._issue_token()
        answer: dict[str, Any] = {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime}
        if not v2:  # v1 answers carry strings and the resource
            answer = {k: str(v) for k, v in answer.items()} | {
                "expires_on": str(int(time.time()) + lifetime),
                "resource": MARKETPLACE_RESOURCE,
            }
        answer["access_token"] = access_token
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/{tenant}/oauth2/v2.0/token", token)
    app.router.add_post("/{tenant}/oauth2/token", token)
    return app


class HttpsServer(BackgroundServer):
    """BackgroundServer over TLS: azure-identity refuses an authority that is not https."""

    def __init__(self, app: web.Application, certificate: Path, key: Path) -> None:
        super().__init__(app)
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.load_cert_chain(certificate, key)

    async def _start(self) -> str:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl)
        await site.start()
        return f"https://{self._host}:{self._runner.addresses[0][1]}"


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throwaway certificate for ``host`` (and localhost) and its key, as PEM files in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "emulator-cert.pem", directory / "emulator-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def _gate(emulator: AzureEmulator, request: web.Request) -> tuple[int, Any, Any]:
    """Faults, token and api-version first; (200, None, body) when the request may be evaluated."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    forced = emulator._http_faults.popleft() if emulator._http_faults else None
    if forced is not None:
        return forced, _bad_request("Error", f"injected HTTP {forced}"), body
    if not emulator._authorized(request):
        return (
            403,
            _bad_request("Forbidden", "The authorization token isn't provided, is invalid or expired."),
            body,
        )
    wait = emulator.quota.admit(request.headers.get("Authorization", ""))
    if wait is not None:
        raise web.HTTPTooManyRequests(
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
            text=json.dumps(_bad_request("TooManyRequests", "Too many requests; retry after Retry-After.")),
            content_type="application/json",
        )
    if request.query.get("api-version") != API_VERSION:
        return 400, _bad_request("BadArgument", f"api-version must be {API_VERSION}"), body
    if body is None:
        return 400, _bad_request("BadArgument", "The request body is not JSON."), body
    return 200, None, body


async def _answer(
    emulator: AzureEmulator, request: web.Request, body: Any, status: int, answer: Any
) -> web.Response:
    emulator.exchanges.append(Exchange(request.path, dict(request.query), body, status, answer))
    if emulator._delay:
        await asyncio.sleep(emulator._delay)
    return web.json_response(answer, status=status)


def _before_the_end(resource: AzureResource, effective: datetime) -> bool:
    """Usage of an unsubscribed resource for an hour that began before the unsubscription. Microsoft documents
    events "against an active resource (subscribed)" and a 24-hour delay for every event ("if a usage event
    occurs at 1 PM on a day, you have until 1 PM on the next day", metered billing FAQ); this double reads the
    two together as the project does: the hours the customer was subscribed stay billable for 24 hours, the
    final partial hour included, and nothing after the end is taken. Not confirmed against Azure itself."""
    if resource.status != "Unsubscribed" or resource.ended_at is None:
        return False
    return effective.replace(minute=0, second=0, microsecond=0) < resource.ended_at


def _item(event: Any, outcome: _Outcome) -> dict[str, Any]:
    """One ``result`` item of the batch answer (UsageBatchEventOkMessage)."""
    if outcome.status == "Accepted" and outcome.event is not None:
        return outcome.event.message()
    item: dict[str, Any] = {"status": outcome.status, "messageTime": NO_TIME}
    if isinstance(event, dict):
        echoed = ("resourceId", "resourceUri", "quantity", "dimension", "effectiveStartTime", "planId")
        item |= {k: event[k] for k in echoed if k in event}
    if outcome.status == "Duplicate" and outcome.event is not None:
        item["error"] = _conflict(outcome.event)
    else:
        item["error"] = {"message": outcome.message, "code": outcome.status}
    return item


def _conflict(original: AzureUsageEvent) -> dict[str, Any]:
    """UsageEventConflictResponse: the event already held, under its original usageEventId."""
    return {
        "additionalInfo": {"acceptedMessage": original.message("Duplicate")},
        "message": "This usage event already exist.",
        "code": "Conflict",
    }


def _bad_request(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "target": "usageEventRequest", "details": []}


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _timestamp(text: str) -> datetime:
    # Microsoft's examples carry no offset ("2018-12-01T08:30:14"): the time is UTC
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
