"""Parsing AWS Marketplace's subscription news (billing.adapters.aws_subscriptions).

The inputs are the samples in events/ (built by billing_local.emulators.aws_events after AWS's
documented examples; events/AWS-SOURCES.md names the pages) and AWS's own printed examples.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from billing.adapters.aws_subscriptions import (
    MalformedEventError,
    NotALifecycleChange,
    UnknownAgreementError,
    license_id,
    license_subject,
    parse_eventbridge,
    parse_sns_message,
    parse_sqs_record,
    registration_form,
    signing_cert_url_ok,
    verify_sns_signature,
)
from billing.domain.model import Marketplace, Period
from billing.domain.subscriptions import (
    EventSource,
    LifecycleKind,
    SubjectKey,
    SubscriptionStatus,
    apply,
    billable_during,
    fold,
    initial,
)
from billing_local.emulators.aws_events import (
    TOPIC_ARN,
    SnsSigner,
    agreement_event,
    registration_request,
    sns_envelope,
    sqs_event,
)

EVENTS = Path(__file__).resolve().parents[2] / "events"
LICENSE = "arn:aws:license-manager::794222239362:license:l-e52ca6f38bf84d0fafb8802ca15ac11a"
AGREEMENT = "agmt-4mwg1nevbokzw95eca5797ixs"
SUBJECT = SubjectKey(Marketplace.AWS, "l-e52ca6f38bf84d0fafb8802ca15ac11a")
LEGACY = SubjectKey(Marketplace.AWS, "X01EXAMPLEX/billingdemo0001")
TOPICS = {
    TOPIC_ARN,
    "arn:aws:sns:us-east-1:287250355862:aws-mp-entitlement-notification-billingdemo0001",
}


def sample(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return doc


def known(agreement_id: str) -> str | None:
    return LICENSE if agreement_id == AGREEMENT else None


def utc(hour: int, minute: int) -> datetime:
    return datetime(2026, 11, 26, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "kind", "effective"),
    [
        ("aws-agreement-created.json", LifecycleKind.ACTIVE, utc(11, 58)),
        ("aws-license-updated.json", LifecycleKind.ACTIVE, utc(11, 59)),
        ("aws-agreement-amended.json", LifecycleKind.PLAN_CHANGED, utc(12, 30)),
        ("aws-agreement-ended.json", LifecycleKind.ENDING, utc(14, 20)),
        ("aws-license-deprovisioned.json", LifecycleKind.ENDED, utc(14, 21)),
    ],
)
def test_every_agreement_event_sample_parses_to_its_license_subject(
    name: str, kind: LifecycleKind, effective: datetime
) -> None:
    raw = sample(name)
    event = parse_eventbridge(raw, known)
    assert (event.key, event.kind, event.effective_at) == (SUBJECT, kind, effective)
    assert event.event_id == f"eventbridge:{raw['id']}"
    assert event.ordering == datetime.fromisoformat(raw["time"])
    assert event.source is EventSource.AWS_AGREEMENT
    assert event.identity.aws_account_id == "845735284135"
    # what links the license-less agreement events to the license (the store's lookup)
    assert event.identity.aws_agreement_id == AGREEMENT
    assert event.raw == raw


def test_license_events_carry_the_metering_identity() -> None:
    event = parse_eventbridge(sample("aws-license-updated.json"))
    assert (event.identity.aws_license_arn, event.identity.aws_product_code) == (LICENSE, "billingdemo0001")


def test_awss_own_printed_license_example_is_the_same_subject_without_an_arn_to_meter_by() -> None:
    # AWS's "License Updated - Manufacturer" example prints the ARN without "arn:" and ":license:"
    printed = sample("aws-license-updated.json")
    printed["detail"]["license"]["arn"] = (
        "aws:license-manager:us-east-1:123456789012:l-e52ca6f38bf84d0fafb8802ca15ac11a"
    )
    event = parse_eventbridge(printed)
    assert event.key == SUBJECT
    assert event.identity.aws_license_arn is None  # never overrides the ARN ResolveCustomer gave
    assert license_id(LICENSE) == license_id(printed["detail"]["license"]["arn"])


def test_an_agreement_event_for_an_unknown_agreement_is_retried_later() -> None:
    with pytest.raises(UnknownAgreementError) as unknown:
        parse_eventbridge(sample("aws-agreement-ended.json"), lambda _: None)
    assert unknown.value.agreement_id == AGREEMENT


@pytest.mark.parametrize("status", ["RENEWED", "REPLACED"])
def test_an_agreement_ended_by_renewal_is_not_an_end(status: str) -> None:
    raw = sample("aws-agreement-ended.json")
    raw["detail"]["agreement"]["status"] = status
    with pytest.raises(NotALifecycleChange):
        parse_eventbridge(raw, known)


@pytest.mark.parametrize("status", ["CANCELLED", "EXPIRED", "TERMINATED"])
def test_an_agreement_cancelled_expired_or_terminated_is_ending(status: str) -> None:
    raw = sample("aws-agreement-ended.json")
    raw["detail"]["agreement"]["status"] = status
    assert parse_eventbridge(raw, known).kind is LifecycleKind.ENDING


def test_other_detail_types_change_no_subject() -> None:
    raw = sample("aws-agreement-created.json") | {"detail-type": "Purchase Agreement Created - Proposer"}
    with pytest.raises(NotALifecycleChange):
        parse_eventbridge(raw, known)


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: e.update(source="aws.marketplacecatalog"),
        lambda e: e.pop("id"),
        lambda e: e.update(time="yesterday"),
        lambda e: e.update(time="2026-11-26T11:59:00"),  # no zone
        lambda e: e["detail"].pop("license"),
        lambda e: e["detail"]["agreement"].pop("id"),
        lambda e: e["detail"]["acceptor"].update(accountId="12345"),
        lambda e: e["detail"]["license"].update(arn="not-a-license"),
    ],
)
def test_malformed_agreement_events_are_refused(damage: Any) -> None:
    raw = copy.deepcopy(sample("aws-license-updated.json"))
    damage(raw)
    with pytest.raises(MalformedEventError):
        parse_eventbridge(raw, known)


@pytest.mark.parametrize(
    ("action", "kind", "effective"),
    [
        ("subscribe-success", LifecycleKind.ACTIVE, utc(11, 50)),
        ("subscribe-fail", LifecycleKind.ENDED, utc(11, 51)),
        ("unsubscribe-pending", LifecycleKind.ENDING, utc(14, 20)),
        ("unsubscribe-success", LifecycleKind.ENDED, utc(15, 20)),
        ("entitlement-updated", LifecycleKind.PLAN_CHANGED, utc(12, 40)),
    ],
)
def test_every_sns_sample_parses_to_its_legacy_subject(
    action: str, kind: LifecycleKind, effective: datetime
) -> None:
    (record,) = sample(f"aws-sns-{action}.json")["Records"]
    event = parse_sqs_record(record, TOPICS)
    envelope = json.loads(record["body"])
    assert (event.key, event.kind, event.effective_at) == (LEGACY, kind, effective)
    assert event.event_id == f"sns:{envelope['MessageId']}"
    assert event.source is EventSource.AWS_SNS
    assert (event.identity.aws_customer_identifier, event.identity.aws_product_code) == (
        "X01EXAMPLEX",
        "billingdemo0001",
    )
    assert event.raw == envelope


def test_awss_printed_sns_message_with_its_stray_space_is_the_same_subject() -> None:
    # the Seller Guide prints "customer-identifier": " X01EXAMPLEX"
    envelope = sns_envelope("subscribe-success", " X01EXAMPLEX", "billingdemo0001", utc(11, 50))
    assert parse_sns_message(envelope, TOPICS).key == LEGACY


def test_an_sns_message_from_another_topic_is_refused() -> None:
    envelope = sns_envelope(
        "unsubscribe-success",
        "X01EXAMPLEX",
        "billingdemo0001",
        utc(11, 50),
        topic_arn="arn:aws:sns:us-east-1:1:evil",
    )
    with pytest.raises(MalformedEventError, match="unexpected topic"):
        parse_sns_message(envelope, TOPICS)


def test_a_raw_delivery_body_is_read_with_the_sqs_message_id_and_time() -> None:
    (record,) = sample("aws-sns-unsubscribe-pending.json")["Records"]
    envelope = json.loads(record["body"])
    raw_record = record | {"body": envelope["Message"]}
    event = parse_sqs_record(raw_record, TOPICS)
    assert (event.key, event.kind, event.event_id) == (
        LEGACY,
        LifecycleKind.ENDING,
        f"sns:{record['messageId']}",
    )
    assert event.effective_at == utc(14, 20)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        json.dumps({"Type": "Notification", "MessageId": "m", "Timestamp": "2026-11-26T11:50:00Z"}),
    ],
)
def test_malformed_sqs_bodies_are_refused(body: str) -> None:
    (record,) = sample("aws-sns-subscribe-success.json")["Records"]
    with pytest.raises(MalformedEventError):
        parse_sqs_record(record | {"body": body}, None)


def test_an_unknown_sns_action_is_refused() -> None:
    envelope = sns_envelope("subscribe-maybe", "X01EXAMPLEX", "billingdemo0001", utc(11, 50))
    with pytest.raises(MalformedEventError, match="unknown SaaS SNS action"):
        parse_sns_message(envelope, TOPICS)


# -- idempotence and order ----------------------------------------------------------------------------


def _license_story() -> list[Any]:
    names = [
        "aws-agreement-created.json",
        "aws-license-updated.json",
        "aws-agreement-amended.json",
        "aws-agreement-ended.json",
        "aws-license-deprovisioned.json",
    ]
    return [parse_eventbridge(sample(n), known) for n in names]


def test_parsing_is_deterministic_so_a_redelivered_event_is_the_same_event() -> None:
    assert _license_story() == _license_story()
    (record,) = sample("aws-sns-unsubscribe-pending.json")["Records"]
    assert parse_sqs_record(record, TOPICS) == parse_sqs_record(copy.deepcopy(record), TOPICS)


def test_replayed_and_reordered_license_events_give_one_state() -> None:
    story = _license_story()
    expected = fold(SUBJECT, story)
    # billed from the license's start to its deprovisioning at 14:21, not after
    assert billable_during(expected, Period(utc(13, 0)))
    assert billable_during(expected, Period(utc(14, 0)))
    assert not billable_during(expected, Period(utc(15, 0)))
    assert expected.ends_at == utc(14, 20)  # the agreement's end: ENDING at 14:20, then deprovisioned
    assert expected.identity.aws_license_arn == LICENSE
    for order in itertools.permutations(story):
        state = initial(SUBJECT)
        for event in (*order, *order):  # every event twice
            state = apply(state, event)
        assert (state.timeline, state.identity, state.ends_at) == (
            expected.timeline,
            expected.identity,
            expected.ends_at,
        )


def test_replayed_and_reordered_sns_messages_give_one_state() -> None:
    actions = ["subscribe-success", "entitlement-updated", "unsubscribe-pending", "unsubscribe-success"]
    story = [parse_sqs_record(sample(f"aws-sns-{a}.json")["Records"][0], TOPICS) for a in actions]
    expected = fold(LEGACY, story)
    assert expected.ends_at == utc(14, 20)  # billing stops when unsubscribe-pending arrives
    assert expected.status is SubscriptionStatus.ENDED
    for order in itertools.permutations(story):
        assert fold(LEGACY, [*order, *reversed(order)]).timeline == expected.timeline


# -- SNS signatures ----------------------------------------------------------------------------------


def test_a_signed_sns_message_verifies_and_a_tampered_one_does_not() -> None:
    signer = SnsSigner()
    envelope = sns_envelope(
        "unsubscribe-pending", "X01EXAMPLEX", "billingdemo0001", utc(14, 20), signer=signer
    )
    assert verify_sns_signature(envelope, signer.certificate_pem)
    tampered = envelope | {"Message": envelope["Message"].replace("unsubscribe-pending", "subscribe-success")}
    assert not verify_sns_signature(tampered, signer.certificate_pem)
    assert not verify_sns_signature(envelope, SnsSigner().certificate_pem)  # someone else's key
    elsewhere = envelope | {"SigningCertURL": "https://sns.evil.example.com/cert.pem"}
    assert not verify_sns_signature(elsewhere, signer.certificate_pem)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem", True),
        ("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem", True),
        ("http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem", False),
        ("https://sns.us-east-1.amazonaws.com.evil.com/x.pem", False),
        ("https://evil.com/sns.us-east-1.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com:8443/x.pem", False),
    ],
)
def test_only_snss_own_certificate_urls_are_trusted(url: str, ok: bool) -> None:
    assert signing_cert_url_ok(url) is ok


def test_a_local_certificate_host_can_be_allowed_explicitly() -> None:
    assert signing_cert_url_ok("https://sns.local.test/x.pem", re.compile(r"^sns\.local\.test$"))


# -- registration form --------------------------------------------------------------------------------


def test_the_registration_sample_gives_its_token_and_tenant() -> None:
    form = registration_form(sample("aws-registration.json"))
    assert (form.token, form.tenant_id) == ("example-token-issued-by-the-aws-emulator", "tenant-0001")


def test_a_plain_form_body_and_a_tenant_in_the_query_are_read() -> None:
    request = registration_request("tok", base64_body=False) | {"queryStringParameters": {"tenant_id": "t-9"}}
    form = registration_form(request)
    assert (form.token, form.tenant_id) == ("tok", "t-9")


@pytest.mark.parametrize(
    "request_",
    [
        registration_request("tok") | {"body": base64.b64encode(b"other=1").decode()},
        registration_request("tok") | {"body": "%%%not base64"},
        registration_request("tok", "tenant with spaces"),
        registration_request("tok") | {"requestContext": {"http": {"method": "GET"}}},
        registration_request("tok", base64_body=False)
        | {"body": "x-amzn-marketplace-token=a&x-amzn-marketplace-token=b"},
    ],
)
def test_malformed_registration_requests_are_refused(request_: dict[str, Any]) -> None:
    with pytest.raises(MalformedEventError):
        registration_form(request_)


def test_license_subject_is_keyed_by_the_license_id() -> None:
    assert license_subject(LICENSE) == SUBJECT
    built = agreement_event(
        "License Updated - Manufacturer",
        agreement_id=AGREEMENT,
        account_id="845735284135",
        at=utc(11, 59) + timedelta(seconds=1),
        license_arn=LICENSE,
        product_code="billingdemo0001",
    )
    assert parse_eventbridge(built).key == SUBJECT
    assert sqs_event()["Records"] == []
