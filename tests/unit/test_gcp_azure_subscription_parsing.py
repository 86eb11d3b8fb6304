"""The pure parts of the Google and Azure subscription adapters: push and webhook bodies in, events out."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from billing.adapters import azure_fulfillment as azure
from billing.adapters import gcp_procurement as gcp
from billing.domain.subscriptions import EventSource, LifecycleKind

T1 = "2026-11-26T13:10:00.000000Z"
T2 = "2026-11-26T13:40:00.000000Z"


def push(data: Any) -> bytes:
    encoded = base64.b64encode(json.dumps(data).encode()).decode()
    return json.dumps({"message": {"data": encoded, "messageId": "1", "publishTime": T2}}).encode()


def notice(event_type: str = "ENTITLEMENT_ACTIVE", update_time: str = T1, **extra: str) -> gcp.Notification:
    data = {
        "eventId": f"ev-{event_type}",
        "eventType": event_type,
        "providerId": "p",
        "entitlement": {"id": "ent-1", "updateTime": update_time, **extra},
    }
    return gcp.parse_push(push(data))


def entitlement(state: str, update_time: str = T2, **extra: str) -> dict[str, Any]:
    return {
        "name": "providers/p/entitlements/ent-1",
        "account": "providers/p/accounts/acct-1",
        "plan": "standard",
        "usageReportingId": "project_number:42",
        "productExternalName": "saas.example.com",
        "state": state,
        "updateTime": update_time,
        **extra,
    }


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{}",
        b'{"message": {"data": "not base64!"}}',
        push([1, 2]),
        push({"eventType": "ENTITLEMENT_ACTIVE", "entitlement": {"id": "e"}}),  # no eventId
        push({"eventId": "1", "eventType": "X"}),  # neither entitlement nor account
        push({"eventId": "1", "eventType": "X", "entitlement": {"id": "e"}, "account": {"id": "a"}}),
        push({"eventId": "1", "eventType": "X", "entitlement": {"id": "../accounts/a"}}),
        push({"eventId": "1", "eventType": "X", "entitlement": {"id": "e", "updateTime": "yesterday"}}),
    ],
)
def test_a_push_that_is_not_a_procurement_notice_is_400(body):
    with pytest.raises(gcp.PushRejectedError) as refused:
        gcp.parse_push(body)
    assert refused.value.status == 400


def test_the_entitlement_state_decides_the_kind():
    expected = {
        "ENTITLEMENT_ACTIVATION_REQUESTED": LifecycleKind.REQUESTED,
        "ENTITLEMENT_ACTIVE": LifecycleKind.ACTIVE,
        "ENTITLEMENT_PENDING_PLAN_CHANGE_APPROVAL": LifecycleKind.ACTIVE,
        "ENTITLEMENT_PENDING_PLAN_CHANGE": LifecycleKind.ACTIVE,
        "ENTITLEMENT_CANCELLED": LifecycleKind.ENDED,
        "ENTITLEMENT_SUSPENDED": LifecycleKind.SUSPENDED,
    }
    for state, kind in expected.items():
        event = gcp.lifecycle_event(notice("ENTITLEMENT_CREATION_REQUESTED"), entitlement(state))
        assert event is not None
        assert event.kind is kind, state
        assert event.source is EventSource.GCP_PUBSUB
        assert event.identity.gcp_usage_reporting_id == "project_number:42"
        assert event.identity.gcp_account_id == "acct-1"
    assert gcp.lifecycle_event(notice(), entitlement("SOMETHING_NEW")) is None


def test_a_pending_cancellation_ends_at_the_subscription_end_or_not_yet():
    end = "2026-12-01T00:00:00Z"
    ending = gcp.lifecycle_event(
        notice(), entitlement("ENTITLEMENT_PENDING_CANCELLATION", subscriptionEndTime=end)
    )
    assert ending is not None
    assert (ending.kind, ending.effective_at) == (LifecycleKind.ENDING, datetime(2026, 12, 1, tzinfo=UTC))
    # no end known: billing goes on until Google sends the cancellation itself
    unknown = gcp.lifecycle_event(notice(), entitlement("ENTITLEMENT_PENDING_CANCELLATION"))
    assert unknown is not None
    assert unknown.kind is LifecycleKind.ACTIVE


def test_a_plan_change_notice_names_its_plan_and_time():
    event = gcp.lifecycle_event(
        notice("ENTITLEMENT_PLAN_CHANGED", newPlan="premium"),
        entitlement("ENTITLEMENT_ACTIVE", plan="enterprise"),
    )
    assert event is not None
    assert (event.kind, event.plan, event.effective_at) == (
        LifecycleKind.PLAN_CHANGED,
        "premium",
        datetime(2026, 11, 26, 13, 10, tzinfo=UTC),
    )


def test_a_vanished_entitlement_ends_only_on_its_deletion_notice():
    assert gcp.lifecycle_event(notice("ENTITLEMENT_ACTIVE"), None) is None
    deleted = gcp.lifecycle_event(notice("ENTITLEMENT_DELETED", update_time=T2), None)
    assert deleted is not None
    assert (deleted.kind, deleted.effective_at) == (
        LifecycleKind.ENDED,
        datetime(2026, 11, 26, 13, 40, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"[]",
        b'{"id": "op", "action": "Suspend"}',
        b'{"id": "op", "subscriptionId": "s/../x", "action": "Suspend"}',
        b'{"id": 7, "subscriptionId": "s", "action": "Suspend"}',
    ],
)
def test_a_webhook_body_without_ids_is_400(body):
    with pytest.raises(azure.RequestRejectedError) as refused:
        azure.parse_webhook(body)
    assert refused.value.status == 400


def test_operations_map_to_lifecycle_kinds():
    operation = {
        "id": "op-1",
        "subscriptionId": "AB-CD",
        "planId": "gold",
        "quantity": "25",  # Microsoft's own example sends it as a string
        "timeStamp": "2019-04-15T20:17:31.7350641Z",  # seven fractional digits, as Microsoft sends them
    }
    kinds = {
        "Subscribe": LifecycleKind.ACTIVE,
        "Renew": LifecycleKind.ACTIVE,
        "Reinstate": LifecycleKind.REINSTATED,
        "Suspend": LifecycleKind.SUSPENDED,
        "Unsubscribe": LifecycleKind.ENDED,
        "ChangePlan": LifecycleKind.PLAN_CHANGED,
        "ChangeQuantity": LifecycleKind.QUANTITY_CHANGED,
    }
    for action, kind in kinds.items():
        event = azure.lifecycle_event({**operation, "action": action})
        assert event.kind is kind
        assert event.key.subject_id == "ab-cd"
        assert (event.plan, event.quantity) == ("gold", 25)
        assert event.effective_at == datetime(2019, 4, 15, 20, 17, 31, 735064, tzinfo=UTC)
        assert event.event_id == "operation:op-1"
