"""`billing demo`'s lifecycle part (billing_local.lifecycle) on the test stack: each marketplace's customer
subscribes through the marketplace's own events, is billed, and gets its final partial hour billed at once
after unsubscribing mid-hour; nothing after the end is sent."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from billing_local.lifecycle import lifecycle_demo
from billing_local.stack import LocalStack

pytestmark = pytest.mark.e2e


async def test_demo_lifecycle_bills_each_marketplaces_final_partial_hour(stack: Any) -> None:
    from billing_local.emulators.azure import AzureEmulator
    from billing_local.emulators.gcp import GcpEmulator

    local = LocalStack(
        database_url=stack.database_url,
        moto_url="",
        queue_url=stack.queues.url,
        dlq_url=stack.queues.dlq_url,
        metering=stack.metering,
        metering_url=stack.metering_url,
        gcp=GcpEmulator(services={}),
        azure=AzureEmulator(resources={}),
        queue=stack.queues.settings,
    )
    done = await lifecycle_demo(local, datetime(2026, 11, 26, 14, 40, tzinfo=UTC))
    tenants = ("demo-aws-tenant", "gcp-demo-entitlement", "demo-azure-tenant")
    # the lifecycle runs from 11:00: billed for 11:00, unsubscribed at 12:25, final bill for 12:00
    assert sorted(done.billed) == sorted(f"{t} 11:00" for t in tenants)
    assert sorted(done.final) == sorted(f"{t} 12:00 (final, up to the end instant)" for t in tenants)
    assert done.held == {m: [(11, 7), (12, 3)] for m in ("aws", "gcp", "azure")}
