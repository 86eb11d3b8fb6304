"""AWS Marketplace subscription news -> :class:`LifecycleEvent` (pure parsing, plus the registration call).

Three inputs, each documented by AWS (sources named where they are used):

- Amazon EventBridge events from ``aws.agreement-marketplace`` (SaaS listings since 2026; AWS Marketplace
  Seller Guide, "Amazon EventBridge events", sections "Events for agreements" and "Events for licenses",
  and "Managing SaaS subscription events with Amazon EventBridge"). They reach the default bus of
  **us-east-1 only**: a stack in another Region needs a rule in us-east-1 that forwards them (an
  EventBridge rule whose target is the other Region's bus), or this function deployed in us-east-1.
- The legacy SaaS SNS topics (``aws-mp-subscription-notification-<code>``,
  ``aws-mp-entitlement-notification-<code>``; Seller Guide, "Amazon SNS notifications for SaaS
  products"), delivered to an SQS queue subscribed to the topic: the SQS body is SNS's JSON envelope
  (raw message delivery off, SNS's default), whose ``Message`` is the marketplace's JSON.
- The fulfillment URL POST (form field ``x-amzn-marketplace-token``; Seller Guide, "Onboarding
  customers to your SaaS product"), resolved with ResolveCustomer.

Subjects (SubjectKey.subject_id): a license subject is keyed by its License Manager license id
(``l-<hex>``, the last part of the LicenseArn): AWS's own examples print the ARN of the same license in
two shapes (``arn:aws:license-manager::<acct>:license:l-…`` from ResolveCustomer, ``aws:license-manager:
<region>:<acct>:l-…`` in the EventBridge examples), and the id is what both share. The full ARN, as
metering needs it, is taken into the identity only from a well-formed ARN (ResolveCustomer, or an event
whose ARN is one). A legacy subject is ``"<CustomerIdentifier>/<ProductCode>"``.

Trust: EventBridge's default bus only carries AWS's events for ``aws.*`` sources (no one else can put
an ``aws.`` source on it). The SNS path is trusted by the queue policy: the queue accepts
``sqs:SendMessage`` only from the seller's topic ARN (``aws:SourceArn`` condition), so the parser also
checks the envelope's ``TopicArn`` against the configured topics; `verify_sns_signature` additionally
checks SNS's own signature when the certificate is at hand (optional: see its docstring).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from billing.domain.errors import PermanentError, TransientError
from billing.domain.model import Marketplace
from billing.domain.subscriptions import EventSource, Identity, LifecycleEvent, LifecycleKind, SubjectKey

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping

AGREEMENT_SOURCE = "aws.agreement-marketplace"
AGREEMENT_CREATED = "Purchase Agreement Created - Manufacturer"
AGREEMENT_AMENDED = "Purchase Agreement Amended - Manufacturer"
AGREEMENT_ENDED = "Purchase Agreement Ended - Manufacturer"
LICENSE_UPDATED = "License Updated - Manufacturer"
LICENSE_DEPROVISIONED = "License Deprovisioned - Manufacturer"
DETAIL_TYPES = (AGREEMENT_CREATED, AGREEMENT_AMENDED, AGREEMENT_ENDED, LICENSE_UPDATED, LICENSE_DEPROVISIONED)
# "Purchase Agreement Ended" is also sent when an agreement is renewed or replaced (Seller Guide, Events
# for agreements): the license lives on under the new agreement, so those are not an end.
_NOT_AN_END = frozenset({"RENEWED", "REPLACED"})

SNS_ACTIONS = (
    "subscribe-success",
    "subscribe-fail",
    "unsubscribe-pending",
    "unsubscribe-success",
    "entitlement-updated",
)
REGISTRATION_TOKEN_FIELD = "x-amzn-marketplace-token"
TENANT_FIELD = "tenant_id"
_TENANT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # billing.domain.messages.CustomerId
_LICENSE_ID = re.compile(r"(?:^|[:/])(l-[0-9A-Za-z]{8,64})$")
_LICENSE_ARN = re.compile(
    r"^arn:aws[a-z-]*:license-manager:[a-z0-9-]*:\d{12}:license[:/]l-[0-9A-Za-z]{8,64}$"
)
_ACCOUNT_ID = re.compile(r"^\d{12}$")


class MalformedEventError(PermanentError):
    """The input is not a well-formed event of the kinds handled here (HTTP 400; a queue's DLQ)."""

    status = 400


class NotALifecycleChange(Exception):  # an outcome to acknowledge, not a failure
    """A well-formed event that changes no subject (acknowledge it; log it): another detail type, or an
    agreement ended by renewal/replacement."""


class UnknownAgreementError(TransientError):
    """An agreement event for an agreement whose license is not known yet (its License Updated event or
    registration has not been recorded). Retrying later can succeed: let the delivery be retried."""

    def __init__(self, agreement_id: str) -> None:
        super().__init__(f"no license known for AWS agreement {agreement_id}")
        self.agreement_id = agreement_id


class RegistrationRefusedError(PermanentError):
    """The registration token does not verify (forged, expired or already redeemed): HTTP 401."""

    status = 401


class RegistrationUnavailableError(TransientError):
    """ResolveCustomer could not answer (throttled, AWS error, network): HTTP 503, the page may retry."""

    status = 503


def license_id(arn: str) -> str:
    """The ``l-…`` license id inside a LicenseArn, whatever shape the ARN is printed in."""
    match = _LICENSE_ID.search(arn.strip())
    if match is None:
        raise MalformedEventError(f"not a license ARN: {arn!r}")
    return match.group(1)


def license_subject(arn: str) -> SubjectKey:
    """The billing subject of an AWS license (2026 listings: one per agreement)."""
    return SubjectKey(Marketplace.AWS, license_id(arn))


def legacy_subject(customer_identifier: str, product_code: str) -> SubjectKey:
    """The billing subject of a legacy (CustomerIdentifier + ProductCode) customer."""
    return SubjectKey(Marketplace.AWS, f"{customer_identifier.strip()}/{product_code.strip()}")


def _identity(**values: str | None) -> Identity:
    # Identity gains fields as the contract grows (aws_agreement_id): pass only those it has
    known = Identity.__dataclass_fields__
    return Identity(**{k: v for k, v in values.items() if k in known and v})


def _well_formed_arn(arn: str | None) -> str | None:
    return arn if arn and _LICENSE_ARN.match(arn.strip()) else None


def _time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise MalformedEventError(f"{what} is not a timestamp")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedEventError(f"{what} is not a timestamp: {value!r}") from None
    if moment.tzinfo is None:
        raise MalformedEventError(f"{what} has no time zone: {value!r}")
    return moment


def _text(mapping: Any, *path: str) -> str | None:
    node = mapping
    for step in path:
        if not isinstance(node, dict):
            return None
        node = node.get(step)
    return node.strip() if isinstance(node, str) and node.strip() else None


# -- EventBridge ---------------------------------------------------------------------------------------


def parse_eventbridge(
    event: Mapping[str, Any], license_for_agreement: Callable[[str], str | None] | None = None
) -> LifecycleEvent:
    """An ``aws.agreement-marketplace`` event as a LifecycleEvent.

    License events carry the license ARN; agreement events carry only the agreement id, so the subject
    is found with ``license_for_agreement`` (the store's agreement -> license ARN, from an earlier
    License Updated event or registration); unknown -> UnknownAgreementError.

    Kinds (Seller Guide, "Managing SaaS subscription events with Amazon EventBridge"):
    License Updated: provisioned or updated -> ACTIVE from the event time. License Deprovisioned: the
    entitlement ended; "this event marks the start of a 1-hour final reporting window" -> ENDED at the
    event time. Purchase Agreement Created -> ACTIVE from the agreement's startTime. Ended (cancelled,
    expired, terminated) -> ENDING at the event time; renewed/replaced -> NotALifecycleChange. Amended ->
    PLAN_CHANGED with no plan (kept in the history: the event does not say what changed; DescribeAgreement
    would).
    """
    if not isinstance(event, dict) or event.get("source") != AGREEMENT_SOURCE:
        raise MalformedEventError(f"not an {AGREEMENT_SOURCE} event")
    detail_type = event.get("detail-type")
    if detail_type not in DETAIL_TYPES:
        raise NotALifecycleChange(f"{detail_type!r} changes no billing subject")
    event_id = _text(event, "id")
    if event_id is None:
        raise MalformedEventError("the event has no id")
    at = _time(event.get("time"), "time")
    detail = event.get("detail")
    agreement_id = _text(detail, "agreement", "id")
    account_id = _text(detail, "acceptor", "accountId")
    if agreement_id is None:
        raise MalformedEventError(f"{detail_type} without detail.agreement.id")
    if account_id is not None and not _ACCOUNT_ID.match(account_id):
        raise MalformedEventError(f"acceptor account id {account_id!r} is not 12 digits")
    arn = _text(detail, "license", "arn")
    if detail_type in (LICENSE_UPDATED, LICENSE_DEPROVISIONED):
        if arn is None:
            raise MalformedEventError(f"{detail_type} without detail.license.arn")
    else:
        arn = license_for_agreement(agreement_id) if license_for_agreement is not None else None
        if arn is None:
            raise UnknownAgreementError(agreement_id)
    kind = LifecycleKind.ACTIVE
    effective = at
    if detail_type == LICENSE_DEPROVISIONED:
        kind = LifecycleKind.ENDED
    elif detail_type == AGREEMENT_CREATED:
        start = _text(detail, "agreement", "startTime")
        effective = _time(start, "agreement.startTime") if start else at
    elif detail_type == AGREEMENT_AMENDED:
        kind = LifecycleKind.PLAN_CHANGED
    elif detail_type == AGREEMENT_ENDED:
        status = (_text(detail, "agreement", "status") or "").upper()
        if status in _NOT_AN_END:
            raise NotALifecycleChange(f"agreement {agreement_id} ended as {status}: its license continues")
        kind = LifecycleKind.ENDING
    return LifecycleEvent(
        key=license_subject(arn),
        kind=kind,
        effective_at=effective,
        ordering=at,
        event_id=f"eventbridge:{event_id}",
        source=EventSource.AWS_AGREEMENT,
        identity=_identity(
            aws_account_id=account_id,
            aws_license_arn=_well_formed_arn(arn),
            aws_product_code=_text(detail, "product", "code"),
            aws_agreement_id=agreement_id,
        ),
        raw=dict(event),
    )


# -- SNS through SQS -----------------------------------------------------------------------------------


def parse_sns_message(
    envelope: Mapping[str, Any], topic_arns: Collection[str] | None = None
) -> LifecycleEvent:
    """A legacy SaaS SNS notification (SNS's JSON envelope) as a LifecycleEvent.

    Kinds (Seller Guide, "Amazon SNS notifications for SaaS products"): subscribe-success -> ACTIVE;
    subscribe-fail -> ENDED (never billable); unsubscribe-pending -> ENDING at the message time ("you have
    one hour to meter any remaining usage"); unsubscribe-success -> ENDED; entitlement-updated ->
    PLAN_CHANGED with no plan (the message carries none: GetEntitlements says what changed).
    ``topic_arns``: when given, a message from any other topic is refused.
    """
    if not isinstance(envelope, dict) or envelope.get("Type") != "Notification":
        raise MalformedEventError("not an SNS notification envelope")
    topic = envelope.get("TopicArn")
    if topic_arns is not None and topic not in topic_arns:
        raise MalformedEventError(f"SNS message from an unexpected topic {topic!r}")
    message_id = _text(envelope, "MessageId")
    if message_id is None:
        raise MalformedEventError("the SNS envelope has no MessageId")
    at = _time(envelope.get("Timestamp"), "Timestamp")
    try:
        message = json.loads(envelope.get("Message") or "")
    except (TypeError, ValueError):
        raise MalformedEventError("the SNS Message is not JSON") from None
    return _sns_event(message, message_id, at, dict(envelope))


def _sns_event(message: Any, message_id: str, at: datetime, raw: dict[str, Any]) -> LifecycleEvent:
    action = _text(message, "action")
    if action not in SNS_ACTIONS:
        raise MalformedEventError(f"unknown SaaS SNS action {action!r}")
    identifier = _text(message, "customer-identifier")
    product_code = _text(message, "product-code")
    if identifier is None or product_code is None:
        raise MalformedEventError(f"{action} without customer-identifier and product-code")
    kind = {
        "subscribe-success": LifecycleKind.ACTIVE,
        "subscribe-fail": LifecycleKind.ENDED,
        "unsubscribe-pending": LifecycleKind.ENDING,
        "unsubscribe-success": LifecycleKind.ENDED,
        "entitlement-updated": LifecycleKind.PLAN_CHANGED,
    }[action]
    account_id = _text(message, "customer-aws-account-id")
    return LifecycleEvent(
        key=legacy_subject(identifier, product_code),
        kind=kind,
        effective_at=at,
        ordering=at,
        event_id=f"sns:{message_id}",
        source=EventSource.AWS_SNS,
        identity=_identity(
            aws_customer_identifier=identifier,
            aws_product_code=product_code,
            aws_account_id=account_id if account_id and _ACCOUNT_ID.match(account_id) else None,
        ),
        raw=raw,
    )


def parse_sqs_record(record: Mapping[str, Any], topic_arns: Collection[str] | None = None) -> LifecycleEvent:
    """One SQS record of the queue subscribed to the SaaS topic: SNS's envelope in the body (SNS's
    default); with raw message delivery turned on, the body is the marketplace's JSON itself, identified
    by the SQS message id and SentTimestamp (no topic to check then: the queue policy is the only guard).
    """
    body = record.get("body") if isinstance(record, dict) else None
    try:
        doc = json.loads(body) if isinstance(body, str) else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise MalformedEventError("the SQS body is not a JSON object")
    if doc.get("Type") == "Notification":
        return parse_sns_message(doc, topic_arns)
    message_id = _text(record, "messageId")
    sent = _text(record, "attributes", "SentTimestamp")
    if message_id is None or sent is None or not sent.isdigit():
        raise MalformedEventError("a raw SQS message without messageId / SentTimestamp")
    at = datetime.fromtimestamp(int(sent) / 1000, tz=UTC)
    return _sns_event(doc, message_id, at, dict(record))


_SNS_CERT_HOST = re.compile(r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")


def signing_cert_url_ok(url: str, host_pattern: re.Pattern[str] = _SNS_CERT_HOST) -> bool:
    """Whether a SigningCertURL is SNS's own (https, ``sns.<region>.amazonaws.com``): a forged message
    would otherwise name a certificate of the forger's own (SNS Developer Guide, "Verifying the
    signatures of Amazon SNS messages")."""
    parts = urlsplit(url)
    return parts.scheme == "https" and bool(host_pattern.match(parts.hostname or "")) and parts.port is None


def sns_string_to_sign(envelope: Mapping[str, Any]) -> bytes:
    """SNS's canonical string for a Notification: the named fields in this order, "name\\nvalue\\n"
    each, Subject only when present (SNS Developer Guide, "Verifying the signatures")."""
    names = [
        "Message",
        "MessageId",
        *(["Subject"] if "Subject" in envelope else []),
        "Timestamp",
        "TopicArn",
        "Type",
    ]
    return "".join(f"{name}\n{envelope[name]}\n" for name in names).encode()


def verify_sns_signature(
    envelope: Mapping[str, Any], certificate_pem: bytes, host_pattern: re.Pattern[str] = _SNS_CERT_HOST
) -> bool:
    """Whether ``envelope`` was signed by the holder of ``certificate_pem`` (fetched by the caller from
    the envelope's SigningCertURL, which must pass `signing_cert_url_ok`): SignatureVersion 1 is
    RSA-SHA1, 2 is RSA-SHA256, over `sns_string_to_sign`. Optional on the SQS path (the queue policy
    already admits only the seller's topic); the ``cryptography`` package does the RSA check.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    if not signing_cert_url_ok(str(envelope.get("SigningCertURL", "")), host_pattern):
        return False
    algorithm: hashes.HashAlgorithm
    if envelope.get("SignatureVersion") == "1":
        algorithm = hashes.SHA1()  # SNS SignatureVersion 1 is SHA1withRSA
    elif envelope.get("SignatureVersion") == "2":
        algorithm = hashes.SHA256()
    else:
        return False
    try:
        signature = base64.b64decode(str(envelope.get("Signature", "")), validate=True)
        key = x509.load_pem_x509_certificate(certificate_pem).public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(signature, sns_string_to_sign(envelope), padding.PKCS1v15(), algorithm)
    except (InvalidSignature, ValueError, KeyError, binascii.Error):
        return False
    return True


# -- Registration (fulfillment URL) --------------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationForm:
    token: str
    tenant_id: str | None  # chosen by the seller's sign-up page; None: derived from the subject


def registration_form(http_event: Mapping[str, Any]) -> RegistrationForm:
    """The token (and optional tenant id) of an API Gateway HTTP API (payload 2.0) POST to the
    fulfillment URL. AWS Marketplace posts ``x-amzn-marketplace-token`` as an
    ``application/x-www-form-urlencoded`` field; ``tenant_id`` may come as a form field or a query
    parameter (the seller's sign-up page adds it after signing the buyer in). Malformed -> 400."""
    method = _text(http_event, "requestContext", "http", "method")
    if method is not None and method.upper() != "POST":
        raise MalformedEventError("the fulfillment URL takes a POST")
    raw = http_event.get("body") or ""
    if not isinstance(raw, str):
        raise MalformedEventError("the body is not text")
    if http_event.get("isBase64Encoded"):
        try:
            raw = base64.b64decode(raw, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise MalformedEventError("the body is not base64 text") from None
    form = parse_qs(raw, keep_blank_values=False, max_num_fields=20)
    tokens = form.get(REGISTRATION_TOKEN_FIELD, [])
    if len(tokens) != 1 or not tokens[0].strip() or len(tokens[0]) > 4096:
        raise MalformedEventError(f"exactly one {REGISTRATION_TOKEN_FIELD} form field is required")
    query = http_event.get("queryStringParameters") or {}
    tenants = form.get(TENANT_FIELD) or (
        [query[TENANT_FIELD]] if isinstance(query, dict) and query.get(TENANT_FIELD) else []
    )
    tenant = tenants[0].strip() if tenants else None
    if tenant is not None and not _TENANT_ID.match(tenant):
        raise MalformedEventError("tenant_id must be 1 to 128 of A-Z a-z 0-9 . _ : -")
    return RegistrationForm(tokens[0].strip(), tenant)


def derived_tenant_id(answer: Mapping[str, Any]) -> str:
    """The tenant id of a buyer who registered without one: stable for the subject (a second
    registration of the same subject links the same tenant)."""
    if answer.get("LicenseArn"):
        return f"aws-{answer['CustomerAWSAccountId']}-{license_id(str(answer['LicenseArn']))}"
    return f"aws-{answer['CustomerIdentifier']}"[:128]


# A registration links a subject to a tenant and gives its identity; it does not make the subject
# billable. AWS: "don't activate the customer's account until you receive subscribe-success" (Seller
# Guide, SNS notifications for SaaS products), and for 2026 listings the entitlement is what License
# Updated - Manufacturer announces. Nor may it revive a subject that has ended (a stale page posting
# later): REGISTERED leaves the status timeline alone.
REGISTRATION_KIND = LifecycleKind.REGISTERED


async def register(form: RegistrationForm, client: Any, now: datetime) -> LifecycleEvent:
    """Resolve the token with ResolveCustomer (``client``: an aiobotocore meteringmarketplace client
    with the shipped 2026 model) and link the subject to a tenant (no status change: REGISTRATION_KIND).

    InvalidTokenException / ExpiredTokenException (a forged, stale or reused token) ->
    RegistrationRefusedError (401, nothing written); any other failure -> RegistrationUnavailableError.
    The answer (Metering API reference, ResolveCustomer, 2026): license-based listings get
    CustomerAWSAccountId + LicenseArn (+ Metadata.AgreementId) and no CustomerIdentifier; legacy ones
    CustomerIdentifier + ProductCode.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        answer = await client.resolve_customer(RegistrationToken=form.token)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "Unknown")
        if code in ("InvalidTokenException", "ExpiredTokenException", "ValidationException"):
            raise RegistrationRefusedError(f"ResolveCustomer refused the token: {code}") from None
        raise RegistrationUnavailableError(f"ResolveCustomer failed: {code}") from None
    except (BotoCoreError, OSError, TimeoutError) as exc:
        raise RegistrationUnavailableError(f"ResolveCustomer failed: {type(exc).__name__}") from None
    account = answer.get("CustomerAWSAccountId")
    arn = answer.get("LicenseArn")
    product = answer.get("ProductCode")
    identifier = answer.get("CustomerIdentifier")
    if arn:
        if not account:
            raise RegistrationUnavailableError("ResolveCustomer returned a LicenseArn without an account id")
        key = license_subject(arn)
    elif identifier and product:
        key = legacy_subject(identifier, product)
    else:
        raise RegistrationUnavailableError(
            "ResolveCustomer returned neither a license nor a customer identifier"
        )
    tenant = form.tenant_id or derived_tenant_id(answer)
    # the registration of a subject to a tenant is one fact: the same link registered again is a replay
    return LifecycleEvent(
        key=key,
        kind=REGISTRATION_KIND,
        effective_at=now,
        ordering=now,
        event_id=f"aws-registration:{key.subject_id}:{tenant}",
        source=EventSource.AWS_REGISTRATION,
        tenant_id=tenant,
        identity=_identity(
            aws_account_id=account,
            aws_license_arn=arn,
            aws_customer_identifier=identifier if not arn else None,
            aws_product_code=product,
            aws_agreement_id=_text(answer, "Metadata", "AgreementId"),
        ),
        raw={k: v for k, v in answer.items() if k != "ResponseMetadata"},
    )
