"""An emulator of the AWS Marketplace Metering Service's BatchMeterUsage and ResolveCustomer (JSON 1.1).

It follows the documented behaviour that moto's stub leaves out: SigV4 authorisation required,
two identities (AWS Marketplace Metering API reference, 2026, BatchMeterUsage and UsageRecord: a
legacy request carries ProductCode and CustomerIdentifier/CustomerAWSAccountId records; a license-based
one carries LicenseArn + CustomerAWSAccountId records and NO ProductCode; AWS bills both if both are sent
for one customer and hour, so this emulator refuses a request that mixes them, and `double_billed()`
reports an account billed both ways for one hour across requests; a LicenseArn that is unknown, of
another account, or past its final-metering hour is InvalidLicenseException), 1..25 records,
quantities 0..2147483647, timestamps within the last 6 hours
and not in the future, subscriptions per product, idempotency (an identical record is accepted
again with its original MeteringRecordId; the same customer, dimension and hour with another
quantity is a DuplicateRecord), dimensions known per product, and injected faults (throttling,
internal errors, unprocessed records, latency), and the account's request quota (``quota``: 10 a
second per account and region in AWS, Marketplace Metering Service quotas), answered with
ThrottlingException as AWS answers it.

ResolveCustomer (API reference, ResolveCustomer): tokens are the ones `issue_token` handed out (what
AWS Marketplace posts to the seller's fulfillment URL as ``x-amzn-marketplace-token``); an unknown one
is InvalidTokenException, one redeemed before or older than `token_ttl` is ExpiredTokenException (the
reference: "the buyer has resubmitted the registration token, or your application has held on to the
registration token for too long"). A license-based answer has CustomerAWSAccountId, LicenseArn,
ProductCode and Metadata.AgreementId and no CustomerIdentifier ("For new SaaS product integrations, this
field is not populated"); a legacy one has CustomerIdentifier, CustomerAWSAccountId and ProductCode.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from billing_local.emulators.quota import Quota

TARGET = "AWSMPMeteringService.BatchMeterUsage"
RESOLVE_TARGET = "AWSMPMeteringService.ResolveCustomer"
# AWS Marketplace Seller Guide, "Managing SaaS subscription events with Amazon EventBridge": License
# Deprovisioned starts a 1-hour final reporting window; after it, usage for the license is refused.
FINAL_METERING = timedelta(hours=1)
MAX_RECORDS = 25
MAX_QUANTITY = 2_147_483_647
WINDOW = timedelta(hours=6)


@dataclass(frozen=True)
class Record:
    product_code: str
    customer: str
    dimension: str
    timestamp: datetime
    quantity: int
    record_id: str
    license_arn: str | None = None  # set for a license-based record (customer is then the account id)


@dataclass
class License:
    """A license AWS granted an account for a product (one per agreement since Concurrent Agreements)."""

    arn: str
    account_id: str
    product_code: str
    agreement_id: str
    ended_at: datetime | None = None  # License Deprovisioned: the final hour's window runs from here


@dataclass
class MeteringState:
    """What the emulator knows and holds; tests read it, the local stack fills it."""

    subscriptions: dict[str, set[str]] = field(default_factory=dict)  # product code -> customers
    dimensions: dict[str, set[str]] = field(default_factory=dict)  # product code -> dimensions ({} = any)
    records: dict[tuple[str, str, str, datetime], Record] = field(default_factory=dict)
    licenses: dict[str, License] = field(default_factory=dict)
    unsubscribed: dict[tuple[str, str], datetime] = field(default_factory=dict)  # legacy: pending end
    customer_accounts: dict[str, str] = field(default_factory=dict)  # CustomerIdentifier -> account id
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)  # registration token -> answer
    token_issued: dict[str, datetime] = field(default_factory=dict)
    redeemed: set[str] = field(default_factory=set)
    token_ttl: timedelta = timedelta(hours=1)
    last_bodies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))  # as received
    clock: Any = field(default=lambda: datetime.now(UTC))
    latency_s: float = 0.0
    jitter_s: float = 0.0
    # faults to inject, one per call, in order: "throttle", "internal", "unprocessed", "timeout"
    faults: deque[str] = field(default_factory=deque)
    fault_rate: float = 0.0  # random faults (chaos runs), drawn from fault_kinds
    fault_kinds: tuple[str, ...] = ("throttle", "internal")
    calls: int = 0
    # BatchMeterUsage requests a second per account (off unless a rate is given)
    quota: Quota = field(default_factory=Quota)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_product(self, product_code: str, dimensions: set[str] | None = None) -> None:
        with self.lock:
            self.subscriptions.setdefault(product_code, set())
            if dimensions:
                self.dimensions[product_code] = set(dimensions)

    def subscribe(self, product_code: str, customer: str) -> None:
        with self.lock:
            self.subscriptions.setdefault(product_code, set()).add(customer)

    def unsubscribe(self, product_code: str, customer: str, at: datetime) -> None:
        """unsubscribe-pending at ``at``: usage up to it is accepted for FINAL_METERING more ("you have
        one hour to meter any remaining usage", Seller Guide, SaaS subscriptions), then the customer is
        CustomerNotSubscribed."""
        with self.lock:
            self.unsubscribed[(product_code, customer)] = at

    def add_license(
        self, product_code: str, account_id: str, license_arn: str, agreement_id: str | None = None
    ) -> License:
        """Grant ``account_id`` a license for the product (what accepting an agreement does)."""
        with self.lock:
            self.subscriptions.setdefault(product_code, set())
            held = License(
                license_arn, account_id, product_code, agreement_id or f"agmt-{uuid.uuid4().hex[:25]}"
            )
            self.licenses[license_arn] = held
            return held

    def deprovision(self, license_arn: str, at: datetime) -> None:
        """License Deprovisioned at ``at``: usage up to it is accepted for FINAL_METERING more."""
        with self.lock:
            self.licenses[license_arn].ended_at = at

    def issue_token(
        self,
        product_code: str,
        account_id: str,
        *,
        license_arn: str | None = None,
        customer_identifier: str | None = None,
        token: str | None = None,
    ) -> str:
        """A registration token as AWS posts it to the fulfillment URL; ResolveCustomer redeems it once.

        ``token``: this text instead of a random one (`billing invoke` accepts a sample event's token)."""
        token = token or uuid.uuid4().hex + uuid.uuid4().hex
        answer: dict[str, Any] = {"CustomerAWSAccountId": account_id, "ProductCode": product_code}
        if license_arn is not None:
            held = self.licenses.get(license_arn) or self.add_license(product_code, account_id, license_arn)
            answer |= {"LicenseArn": license_arn, "Metadata": {"AgreementId": held.agreement_id}}
        else:
            identifier = customer_identifier or f"cust-{uuid.uuid4().hex[:11]}"
            answer["CustomerIdentifier"] = identifier
            self.subscribe(product_code, identifier)
            with self.lock:
                self.customer_accounts[identifier] = account_id
        with self.lock:
            self.tokens[token] = answer
            self.token_issued[token] = self.clock()
        return token

    def double_billed(self) -> list[tuple[str, str, datetime]]:
        """(account, product, hour) that AWS would bill twice: by a license and by the legacy identity."""
        with self.lock:
            by_license = {
                (r.customer, self.licenses[r.license_arn].product_code, key[3])
                for key, r in self.records.items()
                if r.license_arn is not None
            }
            legacy = {
                (self.customer_accounts.get(r.customer, r.customer), r.product_code, key[3])
                for key, r in self.records.items()
                if r.license_arn is None
            }
        return sorted(by_license & legacy)

    def accepted(self) -> list[Record]:
        with self.lock:
            return list(self.records.values())


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"__type": code, "message": message},
        status=status,
        headers={"x-amzn-ErrorType": code},
        content_type="application/x-amz-json-1.1",
    )


def _parse_timestamp(value: Any) -> datetime:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def create_app(state: MeteringState) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if not request.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256 "):
            return _error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        target = request.headers.get("X-Amz-Target")
        if target not in (TARGET, RESOLVE_TARGET):
            return _error(400, "UnknownOperationException", "only BatchMeterUsage and ResolveCustomer")
        state.calls += 1
        # the quota is per account: SigV4's "Credential=<access key id>/<date>/<region>/..." names it
        credential = request.headers["Authorization"].partition("Credential=")[2].split("/", 1)[0]
        if state.quota.admit(credential) is not None:
            # throttled before anything is processed; AWS sends no Retry-After with it
            return _error(400, "ThrottlingException", "Rate exceeded")
        if state.latency_s or state.jitter_s:
            await asyncio.sleep(state.latency_s + state.rng.uniform(0, state.jitter_s))
        fault = state.faults.popleft() if state.faults else None
        if fault is None and state.fault_rate and state.rng.random() < state.fault_rate:
            fault = state.rng.choice(state.fault_kinds)
        if fault == "throttle":
            return _error(400, "ThrottlingException", "Rate exceeded")
        if fault == "internal":
            return _error(500, "InternalServiceErrorException", "An internal error occurred")
        if fault == "timeout":
            await asyncio.sleep(3600)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "SerializationException", "body is not JSON")
        state.last_bodies.append(body)
        if target == RESOLVE_TARGET:
            return _resolve_customer(state, body)
        return _batch_meter_usage(state, body, unprocessed=fault == "unprocessed")

    app = web.Application()
    app.router.add_post("/", handle)
    return app


def _resolve_customer(state: MeteringState, body: dict[str, Any]) -> web.Response:
    token = body.get("RegistrationToken")
    if not isinstance(token, str) or not token:
        return _error(400, "ValidationException", "RegistrationToken is required")
    with state.lock:
        answer = state.tokens.get(token)
        if answer is None:
            return _error(400, "InvalidTokenException", "Registration token is invalid")
        if token in state.redeemed or state.clock() - state.token_issued[token] > state.token_ttl:
            return _error(400, "ExpiredTokenException", "Registration token has expired")
        state.redeemed.add(token)
    return web.json_response(answer, content_type="application/x-amz-json-1.1")


def _license_refusal(state: MeteringState, records: list[Any], now: datetime) -> web.Response | None:
    """A license-based request's records: LicenseArn + CustomerAWSAccountId, no CustomerIdentifier."""
    for raw in records:
        arn, account = raw.get("LicenseArn"), raw.get("CustomerAWSAccountId")
        if not arn:
            return _error(
                400, "ValidationException", "ProductCode is required for records without LicenseArn"
            )
        if raw.get("CustomerIdentifier") or not account:
            return _error(
                400,
                "ValidationException",
                "a LicenseArn record carries CustomerAWSAccountId, not CustomerIdentifier",
            )
        held = state.licenses.get(arn)
        if held is None or held.account_id != account:
            return _error(400, "InvalidLicenseException", f"license {arn} is unknown or not this customer's")
        if held.ended_at is not None and (
            now > held.ended_at + FINAL_METERING or _parse_timestamp(raw.get("Timestamp")) > held.ended_at
        ):
            return _error(
                400, "InvalidLicenseException", f"usage is outside license {arn}'s activation period"
            )
    return None


def _batch_meter_usage(state: MeteringState, body: dict[str, Any], unprocessed: bool) -> web.Response:
    product = body.get("ProductCode")
    records = body.get("UsageRecords")
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_RECORDS:
        return _error(400, "ValidationException", f"UsageRecords must hold 1 to {MAX_RECORDS} records")
    now = state.clock()
    if product and any(isinstance(r, dict) and r.get("LicenseArn") for r in records):
        # the reference: "do NOT include ProductCode" with LicenseArn; AWS would bill both identities
        return _error(400, "ValidationException", "LicenseArn records must be sent without ProductCode")
    if not product:
        refused = _license_refusal(state, records, now)
        if refused is not None:
            return refused
    elif product not in state.subscriptions:
        return _error(400, "InvalidProductCodeException", f"unknown product code {product}")
    results: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    for index, raw in enumerate(records):
        license_arn = raw.get("LicenseArn")
        customer = raw.get("CustomerIdentifier") or raw.get("CustomerAWSAccountId")
        if not license_arn and bool(raw.get("CustomerIdentifier")) == bool(raw.get("CustomerAWSAccountId")):
            return _error(
                400, "ValidationException", "exactly one of CustomerIdentifier, CustomerAWSAccountId"
            )
        record_product: str = state.licenses[license_arn].product_code if license_arn else str(product)
        quantity = raw.get("Quantity", 0)
        if not isinstance(quantity, int) or not 0 <= quantity <= MAX_QUANTITY:
            return _error(400, "ValidationException", f"Quantity must be 0..{MAX_QUANTITY}")
        dimension = raw.get("Dimension", "")
        known = state.dimensions.get(record_product)
        if known and dimension not in known:
            return _error(400, "InvalidUsageDimensionException", f"unknown dimension {dimension}")
        timestamp = _parse_timestamp(raw["Timestamp"])
        if timestamp > now + timedelta(minutes=5) or timestamp < now - WINDOW:
            return _error(400, "TimestampOutOfBoundsException", "timestamp is outside the allowed window")
        if unprocessed and index % 2 == 1:
            left.append(raw)
            continue
        echo = {
            k: raw[k]
            for k in ("CustomerIdentifier", "CustomerAWSAccountId", "LicenseArn", "Dimension", "Quantity")
            if k in raw
        }
        echo["Timestamp"] = raw["Timestamp"]
        with state.lock:
            ended = state.unsubscribed.get((record_product, customer))
            if not license_arn and (
                customer not in state.subscriptions[record_product]
                or (ended is not None and (timestamp > ended or now > ended + FINAL_METERING))
            ):
                results.append({"UsageRecord": echo, "Status": "CustomerNotSubscribed"})
                continue
            # AWS meters by the hour: records in one hour for the same subject and dimension collide;
            # a license is its own subject (several licenses of one account are billed separately)
            hour = timestamp.replace(minute=0, second=0, microsecond=0)
            key = (
                (license_arn, customer, dimension, hour)
                if license_arn
                else (record_product, customer, dimension, hour)
            )
            held = state.records.get(key)
            if held is None:
                held = Record(
                    record_product, customer, dimension, timestamp, quantity, str(uuid.uuid4()), license_arn
                )
                state.records[key] = held
                results.append({"UsageRecord": echo, "MeteringRecordId": held.record_id, "Status": "Success"})
            elif held.quantity == quantity and held.timestamp == timestamp:
                results.append({"UsageRecord": echo, "MeteringRecordId": held.record_id, "Status": "Success"})
            else:
                results.append({"UsageRecord": echo, "Status": "DuplicateRecord"})
    return web.json_response(
        {"Results": results, "UnprocessedRecords": left}, content_type="application/x-amz-json-1.1"
    )
