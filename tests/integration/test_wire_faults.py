"""What each marketplace adapter records when the connection fails, judged by what happened on the wire.

Each adapter talks through its real client library (aiobotocore for AWS, aiohttp for Google and Azure) to
the project's emulator of the marketplace (HTTP doubles that follow each marketplace's documented API, see
billing_local/emulators), with an aiohttp middleware in front that lets the emulator take the request and
then resets the connection (RST, ``billing_local.faults.reset_connection``) while the client reads the
answer. The marketplace then holds the record, so the adapter must say SUBMITTED (maybe taken: never
carried to another hour), not FAILED (certainly not taken). Only a connect that never happened (nothing
listening) may be FAILED.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aioboto3
import aiohttp
import pytest
from aiohttp import web
from botocore.config import Config

from billing.adapters.aws_metering import AwsMeteringClient
from billing.adapters.azure_metering import AzureMeteringClient
from billing.adapters.bearer_http import FixedToken
from billing.adapters.gcp_service_control import GcpServiceControlClient
from billing.domain.model import Customer, CustomerStatus, LedgerEntry, LedgerState, Marketplace, Period
from billing_local.emulators import aws_metering, azure, gcp
from billing_local.emulators.server import BackgroundServer
from billing_local.faults import reset_connection, with_middleware

PERIOD = Period(datetime(2026, 11, 26, 13, tzinfo=UTC))
NOW = PERIOD.end + timedelta(minutes=20)
TOKEN = "wire-fault-token"
PRODUCT = "prod-wire-0001"
SERVICE = "saas-wire.gcpmarketplace.example.com"
CONSUMER = "project_number:731942518844"
RESOURCE = "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"
CUSTOMERS = {
    "aws": Customer(
        "c-aws", Marketplace.AWS, CustomerStatus.ACTIVE, datetime(2026, 1, 1, tzinfo=UTC), None,
        aws_customer_identifier="aws-c1", aws_product_code=PRODUCT,
    ),
    "gcp": Customer(
        "c-gcp", Marketplace.GCP, CustomerStatus.ACTIVE, datetime(2026, 1, 1, tzinfo=UTC), None,
        gcp_usage_reporting_id=CONSUMER, gcp_service_name=SERVICE,
    ),
    "azure": Customer(
        "c-azure", Marketplace.AZURE, CustomerStatus.ACTIVE, datetime(2026, 1, 1, tzinfo=UTC), None,
        azure_resource_id=RESOURCE, azure_plan_id="gold",
    ),
}  # fmt: skip
DIMENSION = {"aws": "CapacityGbHours", "gcp": "api_calls", "azure": "api_calls"}
RESET = f"[Errno {errno.ECONNRESET}]"  # ECONNRESET: the peer sent RST, not FIN


class Resetter:
    """An aiohttp middleware: the emulator handles the request (takes it), then the connection is reset."""

    def __init__(self, paths: Callable[[str], bool]) -> None:
        self.paths = paths
        self.resets = 0

    def middleware(self) -> Any:
        @web.middleware
        async def reset(request: web.Request, handler: Any) -> web.StreamResponse:
            resetting = self.paths(request.path)
            response = await handler(request)
            if resetting:
                self.resets += 1
                reset_connection(request)
            return response

        return reset


class World:
    """One marketplace's emulator behind a Resetter, and what it holds."""

    def __init__(self, marketplace: str, resetter: Resetter) -> None:
        self.marketplace = marketplace
        self.resetter = resetter
        if marketplace == "aws":
            self.aws = aws_metering.MeteringState(clock=lambda: NOW)
            self.aws.add_product(PRODUCT, {DIMENSION["aws"]})
            self.aws.subscribe(PRODUCT, "aws-c1")
            self.app = with_middleware(aws_metering.create_app, resetter.middleware)(self.aws)
        elif marketplace == "gcp":
            self.gcp = gcp.GcpEmulator(
                services={SERVICE: {DIMENSION["gcp"]}}, consumers={CONSUMER: []}, clock=lambda: NOW,
                fixed_tokens={TOKEN},
            )  # fmt: skip
            self.app = with_middleware(gcp.create_app, resetter.middleware)(self.gcp)
        else:
            self.azure = azure.AzureEmulator(
                resources={RESOURCE: azure.AzureResource(plan_id="gold", dimensions={DIMENSION["azure"]})},
                clock=lambda: NOW,
                fixed_tokens={TOKEN},
            )
            self.app = with_middleware(azure.create_app, resetter.middleware)(self.azure)

    def held(self) -> int:
        """How many records the marketplace holds for the hour."""
        if self.marketplace == "aws":
            return len(self.aws.accepted())
        if self.marketplace == "gcp":
            return len(self.gcp.records)
        return len(self.azure.accepted)


@contextlib.asynccontextmanager
async def adapter(marketplace: str, url: str) -> AsyncIterator[Any]:
    """The real adapter, as bootstrap builds it, pointed at ``url``."""
    if marketplace == "aws":
        session = aioboto3.Session(
            aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        config = Config(retries={"mode": "standard", "total_max_attempts": 1})  # as bootstrap: one attempt
        async with session.client("meteringmarketplace", endpoint_url=url, config=config) as client:
            yield AwsMeteringClient(client, attempts=2)
        return
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5, sock_connect=2)) as http:
        if marketplace == "gcp":
            yield GcpServiceControlClient(http, FixedToken(TOKEN), endpoint=url, attempts=2)
        else:
            yield AzureMeteringClient(http, FixedToken(TOKEN), endpoint=url, attempts=2)


def entry(marketplace: str) -> LedgerEntry:
    return LedgerEntry(CUSTOMERS[marketplace].id, DIMENSION[marketplace], PERIOD, 7, LedgerState.SUBMITTED)


@contextlib.contextmanager
def serving(world: World) -> Iterator[str]:
    with BackgroundServer(world.app) as server:
        yield server.url


def _metering_call(path: str) -> bool:
    return not path.endswith(":check")  # Google's services.check is answered; the report is reset


@pytest.mark.parametrize("marketplace", ["aws", "gcp", "azure"])
async def test_a_connection_reset_while_reading_the_answer_leaves_the_record_submitted(
    marketplace: str,
) -> None:
    # Given the marketplace takes every metering request and the connection is then reset (RST)
    world = World(marketplace, Resetter(_metering_call))
    with serving(world) as url:
        async with adapter(marketplace, url) as client:
            # When the adapter submits one record
            (result,) = await client.submit(CUSTOMERS[marketplace], PERIOD, [entry(marketplace)])
    # Then the connection really was reset while reading (ECONNRESET, not a clean close), the marketplace
    # holds the record, and the adapter says it may have been taken: SUBMITTED, never FAILED
    assert world.resetter.resets >= 1
    assert RESET in (result.reason or "")
    assert world.held() == 1
    assert result.state is LedgerState.SUBMITTED


@pytest.mark.parametrize("marketplace", ["aws", "gcp", "azure"])
async def test_a_refused_connect_is_certainly_not_sent(marketplace: str) -> None:
    # Given a port nothing listens on (the connect is refused: not a byte of the request is written)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with adapter(marketplace, f"http://127.0.0.1:{port}") as client:
        # When the adapter submits one record
        (result,) = await client.submit(CUSTOMERS[marketplace], PERIOD, [entry(marketplace)])
    # Then it is FAILED: certainly not taken, safe to carry once the window closes
    assert result.state is LedgerState.FAILED, result.reason


async def test_a_reset_then_an_out_of_bounds_retry_is_not_settled_as_expired() -> None:
    # Given AWS takes the first BatchMeterUsage call and the connection is reset, and its 6-hour window
    # closes before the adapter's retry, which AWS refuses as TimestampOutOfBoundsException
    late = PERIOD.start + timedelta(hours=6, minutes=30)
    calls: list[str] = []

    def first_call(path: str) -> bool:
        calls.append(path)
        if len(calls) == 1:
            return True
        world.aws.clock = lambda: late
        return False

    world = World("aws", Resetter(first_call))
    with serving(world) as url:
        async with adapter("aws", url) as client:
            # When the adapter submits the hour
            (result,) = await client.submit(CUSTOMERS["aws"], PERIOD, [entry("aws")])
    # Then the hour is not settled as expired (no WindowExpiredError): AWS holds it, the record stays
    # SUBMITTED
    assert world.held() == 1
    assert result.state is LedgerState.SUBMITTED
    assert "TimestampOutOfBoundsException" in (result.reason or "")
    assert RESET in (result.reason or "")


OPERATION = {"gcp": "services.report", "azure": "batchUsageEvent"}


@pytest.mark.parametrize("marketplace", ["gcp", "azure"])
async def test_a_retry_log_line_names_the_customer_hour_marketplace_and_call(
    marketplace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Google's and Azure's retries reach the same log hook as AWS's (test_biller_aws checks the Biller's
    keys end to end): the line names whose hour, on which marketplace, and the call retried, not
    stamina's "<context block>"."""
    import json

    from billing import log_context
    from billing.entrypoints import biller as entrypoint  # installs the retry hook, as the handler does
    from testkit import captured_logs

    # Given the marketplace answers its first metering call 503 (unavailable: retried)
    world = World(marketplace, Resetter(lambda _: False))
    if marketplace == "gcp":
        world.gcp.fail_next("report", 503)
    else:
        world.azure.fail_next(503)
    stream = captured_logs(monkeypatch, entrypoint.logger)
    customer = CUSTOMERS[marketplace]
    with serving(world) as url:
        async with adapter(marketplace, url) as client:
            # When the adapter submits inside a bill (the Biller binds these keys)
            keys = {
                "customer_id": customer.id,
                "billing_hour": PERIOD.isoformat(),
                "marketplace": marketplace,
            }
            with log_context.bound(**keys):
                (result,) = await client.submit(customer, PERIOD, [entry(marketplace)])
    # Then the retry was logged with the bill's keys and the call's name, and the retry was taken
    assert result.state is LedgerState.ACCEPTED, result.reason
    logs = [json.loads(line) for line in stream.getvalue().splitlines()]
    (retry,) = [e for e in logs if e["message"] == "retrying after a transient error"]
    assert {k: retry.get(k) for k in (*keys, "retrying")} == {**keys, "retrying": OPERATION[marketplace]}
