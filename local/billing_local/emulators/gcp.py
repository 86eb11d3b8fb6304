"""An HTTP double of Google Service Control v1 (``services.check``/``services.report``) and Google's OAuth2
token endpoint, following the documented behaviour (see billing.adapters.gcp_service_control for sources).

- ``POST /token``: the JWT bearer grant a service-account key file's ``token_uri`` receives. The assertion's
  RS256 signature is verified against the public half of a key made by ``make_service_account_key``.
- ``/v1/providers/…`` (the Partner Procurement API) when ``procurement`` is set, ``GET /oauth2/v1/certs``
  (the push signer's certificate) when ``push_signer`` is set: billing_local.emulators.gcp_procurement.
- ``POST /v1/services/{service}:check`` and ``…:report``: a bearer token from ``/token`` (or a fixed one) is
  required, 401 UNAUTHENTICATED otherwise. A report is validated like Google does (unknown fields, missing
  times, duplicate metric values: 400 INVALID_ARGUMENT for the whole request); each operation is then
  answered on its own in ``reportErrors``. A repeated ``operationId`` is deduplicated: answered like the
  first report, counted once. Google rejects no late report; reports ending more than an hour before the
  clock are kept with ``late=True`` ("might not be reflected in partner reports").
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from billing_local.emulators.gcp_procurement import Procurement, PushSigner, add_certs_route, add_routes
from billing_local.emulators.quota import Quota

REPORT_WITHIN = timedelta(hours=1)
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # google-auth's ``aud``, whatever the token_uri
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPES = frozenset(
    {"https://www.googleapis.com/auth/servicecontrol", "https://www.googleapis.com/auth/cloud-platform"}
)
_INT64 = re.compile(r"-?\d{1,19}")
_OPERATION_FIELDS = frozenset(
    {
        "consumerId", "endTime", "importance", "labels", "logEntries", "metricValueSets", "operationId",
        "operationName", "quotaProperties", "resources", "startTime", "traceSpans", "userLabels",
    }
)  # fmt: skip
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_RPC_CODES = {"CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
              "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
              "ABORTED": 10, "INTERNAL": 13, "UNAVAILABLE": 14}  # fmt: skip


def make_service_account_key(
    token_uri: str, email: str = "biller@emulated-project.iam.gserviceaccount.com"
) -> dict[str, str]:
    """A fresh RSA service-account key file (as Google issues them) whose ``token_uri`` is ``token_uri``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": "emulated-project",
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }


@dataclass(frozen=True)
class GcpRecord:
    """One operation Service Control holds (one metric value)."""

    operation_id: str
    service_name: str
    consumer_id: str
    metric: str
    value: int
    start_time: datetime
    end_time: datetime
    user_labels: Mapping[str, str]
    received_at: datetime
    late: bool


@dataclass(frozen=True)
class Exchange:
    """One API request and the emulator's answer, for tests to inspect and validate."""

    method: str  # "check" or "report"
    service_name: str
    body: Any
    status: int
    response: Any


@dataclass
class GcpEmulator:
    """The emulator's state: configuration, what it holds, and the faults to inject next."""

    services: Mapping[str, Iterable[str] | None]  # service name -> its metric names (None: any)
    consumers: Mapping[str, Iterable[str]] = field(default_factory=dict)  # consumerId -> CheckError codes
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    token_lifetime: int = 3600  # seconds a token from /token is honoured
    advertised_lifetime: int | None = None  # the ``expires_in`` told to the client (default: the above)
    records: dict[str, GcpRecord] = field(default_factory=dict)  # by operationId
    resubmissions: list[str] = field(default_factory=list)  # operationIds reported again
    exchanges: list[Exchange] = field(default_factory=list)
    token_requests: int = 0
    fixed_tokens: set[str] = field(default_factory=set)
    # the Partner Procurement API (served beside Service Control, with the same tokens) and the key the
    # Pub/Sub push sender signs with (its certificate served at /oauth2/v1/certs)
    procurement: Procurement | None = None
    push_signer: PushSigner | None = None
    _public_keys: dict[str, Any] = field(default_factory=dict)
    _tokens: dict[str, float] = field(default_factory=dict)
    _http_faults: dict[str, deque[int]] = field(default_factory=dict)
    _operation_faults: dict[str, deque[str]] = field(default_factory=dict)
    _delays: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # calls a second per producer project (the service): past it, 429 RESOURCE_EXHAUSTED (Google counts
    # quota units, one per check and per reported operation; this counts calls); off by default
    quota: Quota = field(default_factory=Quota)

    def trust(self, key_file: Mapping[str, str]) -> None:
        """Accept token requests signed by ``key_file``'s private key (its public half is kept)."""
        from cryptography.hazmat.primitives import serialization

        private = serialization.load_pem_private_key(key_file["private_key"].encode(), password=None)
        self._public_keys[key_file["client_email"]] = private.public_key()

    def fail_next(self, method: str, *statuses: int) -> None:
        """Answer the next calls of ``method`` ("check", "report" or "token") with these HTTP statuses."""
        self._http_faults.setdefault(method, deque()).extend(statuses)

    def fail_operation(self, metric: str, *codes: str) -> None:
        """Answer the next reports of ``metric`` (its short name) with these reportError codes."""
        self._operation_faults.setdefault(metric, deque()).extend(codes)

    def delay(self, method: str, seconds: float) -> None:
        """Answer ``method`` only after ``seconds`` (the work is done first, as a slow network would)."""
        self._delays[method] = seconds

    def revoke_tokens(self) -> None:
        """Forget every token issued so far: the next call with one of them is 401."""
        self._tokens.clear()

    def calls(self, method: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.method == method]

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        if token in self.fixed_tokens:
            return True
        expires = self._tokens.get(token)
        return expires is not None and expires > time.time()

    def _fault(self, method: str) -> int | None:
        faults = self._http_faults.get(method)
        return faults.popleft() if faults else None

    def _issue_token(self) -> dict[str, Any]:
        token = "ya29.emulated-" + secrets.token_urlsafe(24)
        self._tokens[token] = time.time() + self.token_lifetime
        lifetime = self.token_lifetime if self.advertised_lifetime is None else self.advertised_lifetime
        return {"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}

    def _consumer_codes(self, consumer: str) -> list[str] | None:
        """The CheckError codes of a known consumer ([] when it may be billed); None when unknown. With the
        Procurement double, every entitlement's usageReportingId is a consumer: billable while the entitlement
        is active (a pending cancellation or plan change included); reports for a cancelled one are still
        taken (Google: usage after a cancellation is reported with a time before it)."""
        if consumer in self.consumers:
            return list(self.consumers[consumer])
        state = self.procurement.consumer_state(consumer) if self.procurement is not None else None
        if state is None:
            return None
        active = (
            "ENTITLEMENT_ACTIVE",
            "ENTITLEMENT_PENDING_CANCELLATION",
            "ENTITLEMENT_PENDING_PLAN_CHANGE",
            "ENTITLEMENT_PENDING_PLAN_CHANGE_APPROVAL",
        )
        return [] if state in active else ["SERVICE_NOT_ACTIVATED"]

    def _check(self, service: str, body: Any) -> tuple[int, Any]:
        operation = body.get("operation") if isinstance(body, dict) else None
        if not isinstance(operation, dict) or not operation.get("consumerId"):
            return _error(400, "CheckRequest.operation.consumerId is required")
        consumer = str(operation["consumerId"])
        answer: dict[str, Any] = {
            "operationId": operation.get("operationId", ""),
            "serviceConfigId": "emulated-1",
        }
        known = self._consumer_codes(consumer)
        codes = known if known is not None else ["NOT_FOUND"]
        if codes:
            answer["checkErrors"] = [
                {"code": code, "subject": f"project:{consumer}", "detail": f"emulated {code} for {consumer}"}
                for code in codes
            ]
        return 200, answer

    def _report(self, service: str, body: Any) -> tuple[int, Any]:
        operations = body.get("operations") if isinstance(body, dict) else None
        if not isinstance(operations, list) or set(body) - {"operations", "serviceConfigId"}:
            return _error(400, "Invalid JSON payload: ReportRequest.operations must be a list")
        parsed = []
        for index, operation in enumerate(operations):
            problem = _invalid_operation(operation)
            if problem:
                return _error(400, f"operations[{index}]: {problem}")
            parsed.append(operation)
        metrics = self.services[service]
        allowed = None if metrics is None else {f"{service}/{m}" for m in metrics}
        errors = []
        now = self.clock()
        with self._lock:
            for operation in parsed:
                op_id = operation["operationId"]
                value_set = operation["metricValueSets"][0]
                metric = value_set["metricName"]
                short = metric.removeprefix(f"{service}/")
                forced = self._operation_faults.get(short)
                if forced:
                    code = forced.popleft()
                    errors.append(_report_error(op_id, code, f"emulated {code}"))
                    continue
                if self._consumer_codes(operation["consumerId"]) is None:
                    errors.append(_report_error(op_id, "INVALID_ARGUMENT", "unknown consumerId"))
                    continue
                if allowed is not None and metric not in allowed:
                    errors.append(_report_error(op_id, "INVALID_ARGUMENT", f"unknown metric {metric}"))
                    continue
                if op_id in self.records:
                    self.resubmissions.append(op_id)  # deduplicated: answered like the first report
                    continue
                end = _timestamp(operation["endTime"])
                self.records[op_id] = GcpRecord(
                    operation_id=op_id,
                    service_name=service,
                    consumer_id=operation["consumerId"],
                    metric=short,
                    value=int(value_set["metricValues"][0]["int64Value"]),
                    start_time=_timestamp(operation["startTime"]),
                    end_time=end,
                    user_labels=dict(operation.get("userLabels", {})),
                    received_at=now,
                    late=now - end > REPORT_WITHIN,
                )
        answer: dict[str, Any] = {"serviceConfigId": "emulated-1", "serviceRolloutId": "emulated-rollout-1"}
        if errors:
            answer["reportErrors"] = errors
        return 200, answer


def create_app(emulator: GcpEmulator) -> web.Application:
    """The aiohttp application serving ``emulator``: /token and /v1/services/{service}:check|report."""

    async def token(request: web.Request) -> web.Response:
        emulator.token_requests += 1
        forced = emulator._fault("token")
        if forced is not None:
            return web.json_response({"error": "internal_failure"}, status=forced)
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        problem = _verify_assertion(str(form.get("assertion", "")), emulator._public_keys, str(request.url))
        if problem:
            return web.json_response({"error": "invalid_grant", "error_description": problem}, status=400)
        return web.json_response(emulator._issue_token())

    async def api(request: web.Request) -> web.Response:
        service, _, method = request.match_info["call"].rpartition(":")
        if method not in ("check", "report"):
            raise web.HTTPNotFound
        try:
            body = await request.json()
        except ValueError:
            body = None
        forced = emulator._fault(method)
        if forced is not None:
            status, answer = _error(forced, f"emulated HTTP {forced}")
        elif not emulator._authorized(request):
            status, answer = _error(401, "Request had invalid authentication credentials.")
        elif emulator.quota.admit(service) is not None:
            status, answer = _error(429, f"Quota exceeded for quota metric of service {service}")
        elif service not in emulator.services:
            status, answer = _error(403, f"Permission denied or service {service} not found")
        elif method == "check":
            status, answer = emulator._check(service, body)
        else:
            status, answer = emulator._report(service, body)
        emulator.exchanges.append(Exchange(method, service, body, status, answer))
        delay = emulator._delays.get(method)
        if delay:
            await asyncio.sleep(delay)
        return web.json_response(answer, status=status)

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_post("/v1/services/{call}", api)
    if emulator.procurement is not None:
        add_routes(app, emulator.procurement, emulator._authorized)
    if emulator.push_signer is not None:
        add_certs_route(app, emulator.push_signer)
    return app


def _invalid_operation(operation: Any) -> str | None:
    if not isinstance(operation, dict):
        return "not an Operation"
    unknown = set(operation) - _OPERATION_FIELDS
    if unknown:
        return f"Unknown name {sorted(unknown)[0]!r}"
    for name in ("operationId", "consumerId", "startTime", "endTime"):
        if not isinstance(operation.get(name), str) or not operation[name]:
            return f"{name} is required in a report"
    try:
        if _timestamp(operation["endTime"]) < _timestamp(operation["startTime"]):
            return "endTime is before startTime"
    except ValueError as exc:
        return f"invalid timestamp: {exc}"
    value_sets = operation.get("metricValueSets")
    if not isinstance(value_sets, list) or not value_sets:
        return "metricValueSets is required"
    seen = set()
    for value_set in value_sets:
        values = value_set.get("metricValues") if isinstance(value_set, dict) else None
        if (
            not isinstance(values, list)
            or len(values) != 1
            or not isinstance(value_set.get("metricName"), str)
        ):
            return "each MetricValueSet needs a metricName and one metricValue here"
        if value_set["metricName"] in seen:
            return "duplicated MetricValue: the entire request is rejected"
        seen.add(value_set["metricName"])
        int64 = values[0].get("int64Value") if isinstance(values[0], dict) else None
        if not isinstance(int64, str) or not _INT64.fullmatch(int64) or int(int64) < 0:
            return "int64Value must be a non-negative int64 in a JSON string"
    if len(value_sets) != 1:
        return "this emulator holds one metric per operation"
    return None


def _verify_assertion(assertion: str, keys: Mapping[str, Any], token_url: str) -> str | None:
    """Why the JWT bearer assertion is not acceptable, or None."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    try:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = json.loads(_b64decode(header_b64))
        claims = json.loads(_b64decode(payload_b64))
        signature = _b64decode(signature_b64)
    except ValueError:
        return "malformed assertion"
    if header.get("alg") != "RS256":
        return "alg must be RS256"
    key = keys.get(claims.get("iss", ""))
    if key is None:
        return f"unknown service account {claims.get('iss')!r}"
    try:
        key.verify(signature, f"{header_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return "invalid signature"
    if claims.get("aud") not in (GOOGLE_TOKEN_AUDIENCE, token_url):
        return f"unexpected audience {claims.get('aud')!r}"
    now = time.time()
    issued, expires = claims.get("iat"), claims.get("exp")
    if not isinstance(issued, int) or not isinstance(expires, int) or issued > now + 60 or expires < now - 60:
        return "assertion expired or not yet valid"
    if not SCOPES & set(str(claims.get("scope", "")).split()):
        return "scope must include servicecontrol or cloud-platform"
    return None


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _timestamp(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no offset")
    return moment.astimezone(UTC)


def _error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {
        "error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}
    }


def _report_error(operation_id: str, code: str, message: str) -> dict[str, Any]:
    return {"operationId": operation_id, "status": {"code": _RPC_CODES.get(code, 2), "message": message}}
