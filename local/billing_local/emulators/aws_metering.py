"""An emulator of the AWS Marketplace Metering Service's BatchMeterUsage (JSON 1.1 over HTTP).

It follows the documented behaviour that moto's stub leaves out: SigV4 authorisation required,
ProductCode required, 1..25 records, quantities 0..2147483647, timestamps within the last 6 hours
and not in the future, subscriptions per product, idempotency (an identical record is accepted
again with its original MeteringRecordId; the same customer, dimension and hour with another
quantity is a DuplicateRecord), dimensions known per product, and injected faults (throttling,
internal errors, unprocessed records, latency), and the account's request quota (``quota``: 10 a
second per account and region in AWS, Marketplace Metering Service quotas), answered with
ThrottlingException as AWS answers it.
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


@dataclass
class MeteringState:
    """What the emulator knows and holds; tests read it, the local stack fills it."""

    subscriptions: dict[str, set[str]] = field(default_factory=dict)  # product code -> customers
    dimensions: dict[str, set[str]] = field(default_factory=dict)  # product code -> dimensions ({} = any)
    records: dict[tuple[str, str, str, datetime], Record] = field(default_factory=dict)
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
        if request.headers.get("X-Amz-Target") != TARGET:
            return _error(400, "UnknownOperationException", "only BatchMeterUsage is emulated")
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
        return _batch_meter_usage(state, body, unprocessed=fault == "unprocessed")

    app = web.Application()
    app.router.add_post("/", handle)
    return app


def _batch_meter_usage(state: MeteringState, body: dict[str, Any], unprocessed: bool) -> web.Response:
    product = body.get("ProductCode")
    records = body.get("UsageRecords")
    if not product:
        return _error(400, "ValidationException", "ProductCode is required")
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_RECORDS:
        return _error(400, "ValidationException", f"UsageRecords must hold 1 to {MAX_RECORDS} records")
    if product not in state.subscriptions:
        return _error(400, "InvalidProductCodeException", f"unknown product code {product}")
    now = state.clock()
    results: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    for index, raw in enumerate(records):
        customer = raw.get("CustomerIdentifier") or raw.get("CustomerAWSAccountId")
        if bool(raw.get("CustomerIdentifier")) == bool(raw.get("CustomerAWSAccountId")):
            return _error(
                400, "ValidationException", "exactly one of CustomerIdentifier, CustomerAWSAccountId"
            )
        quantity = raw.get("Quantity", 0)
        if not isinstance(quantity, int) or not 0 <= quantity <= MAX_QUANTITY:
            return _error(400, "ValidationException", f"Quantity must be 0..{MAX_QUANTITY}")
        dimension = raw.get("Dimension", "")
        known = state.dimensions.get(product)
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
            for k in ("CustomerIdentifier", "CustomerAWSAccountId", "Dimension", "Quantity")
            if k in raw
        }
        echo["Timestamp"] = raw["Timestamp"]
        with state.lock:
            if customer not in state.subscriptions[product]:
                results.append({"UsageRecord": echo, "Status": "CustomerNotSubscribed"})
                continue
            # AWS meters by the hour: records in one hour for the same customer and dimension collide
            key = (product, customer, dimension, timestamp.replace(minute=0, second=0, microsecond=0))
            held = state.records.get(key)
            if held is None:
                held = Record(product, customer, dimension, timestamp, quantity, str(uuid.uuid4()))
                state.records[key] = held
                results.append({"UsageRecord": echo, "MeteringRecordId": held.record_id, "Status": "Success"})
            elif held.quantity == quantity and held.timestamp == timestamp:
                results.append({"UsageRecord": echo, "MeteringRecordId": held.record_id, "Status": "Success"})
            else:
                results.append({"UsageRecord": echo, "Status": "DuplicateRecord"})
    return web.json_response(
        {"Results": results, "UnprocessedRecords": left}, content_type="application/x-amz-json-1.1"
    )
