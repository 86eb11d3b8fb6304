"""AWS Marketplace's subscription news, built the way AWS delivers it, for local runs and tests.

- `agreement_event`: an ``aws.agreement-marketplace`` EventBridge event as the Lambda target receives
  it (AWS Marketplace Seller Guide, "Amazon EventBridge events": "Events for agreements", "Events for
  licenses"; the field layout of the documented examples).
- `sns_envelope` / `sqs_event`: a legacy SaaS SNS notification (Seller Guide, "Amazon SNS notifications
  for SaaS products") in SNS's JSON envelope (SNS Developer Guide, "Parsing message formats"), inside
  the SQS records a queue subscribed to the topic hands to Lambda (raw message delivery off).
  `SnsSigner` signs envelopes like SNS does (SignatureVersion 2, RSA-SHA256 over SNS's string to sign)
  with a local key and a self-signed certificate, for `aws_subscriptions.verify_sns_signature`.
- `registration_request`: the buyer's browser POST to the fulfillment URL (form field
  ``x-amzn-marketplace-token``) as API Gateway HTTP API (payload 2.0) hands it to Lambda; the token
  comes from the metering emulator's `MeteringState.issue_token`.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

REGION = "us-east-1"  # AWS Marketplace's events are delivered in us-east-1 only
SELLER_ACCOUNT = "123456789012"
# the topics AWS Marketplace gives the seller for a product (Seller Guide, SNS notifications for SaaS)
TOPIC_ARN = f"arn:aws:sns:{REGION}:287250355862:aws-mp-subscription-notification-billingdemo0001"
ENTITLEMENT_TOPIC_ARN = f"arn:aws:sns:{REGION}:287250355862:aws-mp-entitlement-notification-billingdemo0001"
SIGNING_CERT_URL = f"https://sns.{REGION}.amazonaws.com/SimpleNotificationService-local.pem"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def agreement_event(
    detail_type: str,
    *,
    agreement_id: str,
    account_id: str,
    at: datetime,
    license_arn: str | None = None,
    product_code: str | None = None,
    product_id: str = "prod-qtwveEXAMPLE",
    status: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """One ``aws.agreement-marketplace`` event (``detail_type`` e.g. "License Updated - Manufacturer")."""
    agreement: dict[str, Any] = {"id": agreement_id}
    if detail_type.startswith("Purchase Agreement Created") or detail_type.startswith(
        "Purchase Agreement Amended"
    ):
        intent = "NEW" if "Created" in detail_type else "AMEND"
        agreement |= {
            "intent": intent,
            "status": status or "ACTIVE",
            "acceptanceTime": _iso(start or at),
            "startTime": _iso(start or at),
            "endTime": _iso(end or (start or at) + timedelta(days=365)),
        }
    elif detail_type.startswith("Purchase Agreement Ended"):
        agreement["status"] = status or "CANCELLED"
    detail: dict[str, Any] = {
        "requestId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{detail_type}/{agreement_id}/{at}")),
        "catalog": "AWSMarketplace",
        "agreement": agreement,
    }
    if detail_type.startswith("License"):
        detail["product"] = {"code": product_code, "id": product_id}
        detail["license"] = {"arn": license_arn}
    detail |= {
        "acceptor": {"accountId": account_id},
        "proposer": {"accountId": SELLER_ACCOUNT},
        "offer": {"id": "offer-1234567890123"},
    }
    return {
        "version": "0",
        "id": event_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{detail_type}/{agreement_id}/{_iso(at)}")),
        "detail-type": detail_type,
        "source": "aws.agreement-marketplace",
        "account": SELLER_ACCOUNT,
        "time": _iso(at),
        "region": REGION,
        "resources": [f"arn:aws:aws-marketplace::aws:agreement:{agreement_id}"],
        "detail": detail,
    }


class SnsSigner:
    """Signs SNS envelopes as SNS does, with a local RSA key and a self-signed certificate."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com (local emulator)")])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )
        self.certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, envelope: dict[str, Any]) -> dict[str, Any]:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        from billing.adapters.aws_subscriptions import sns_string_to_sign

        signed = envelope | {"SignatureVersion": "2", "SigningCertURL": SIGNING_CERT_URL}
        signature = self._key.sign(sns_string_to_sign(signed), padding.PKCS1v15(), hashes.SHA256())
        return signed | {"Signature": base64.b64encode(signature).decode()}


def sns_envelope(
    action: str,
    customer_identifier: str,
    product_code: str,
    at: datetime,
    *,
    topic_arn: str | None = None,
    message_id: str | None = None,
    signer: SnsSigner | None = None,
    account_id: str | None = None,
) -> dict[str, Any]:
    """SNS's envelope of one SaaS subscription message (``action``: subscribe-success, ...);
    ``account_id``: the message's customer-aws-account-id (AWS added it to the SaaS messages in 2024)."""
    message: dict[str, Any] = {
        "action": action,
        "customer-identifier": customer_identifier,
        "product-code": product_code,
    }
    if account_id is not None:
        message["customer-aws-account-id"] = account_id
    if action != "entitlement-updated":
        message["isFreeTrialTermPresent"] = "false"
    topic_arn = topic_arn or (ENTITLEMENT_TOPIC_ARN if action == "entitlement-updated" else TOPIC_ARN)
    envelope: dict[str, Any] = {
        "Type": "Notification",
        "MessageId": message_id
        or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{action}/{customer_identifier}/{at}")),
        "TopicArn": topic_arn,
        "Message": json.dumps(message),
        "Timestamp": at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "SignatureVersion": "2",
        "Signature": "",
        "SigningCertURL": SIGNING_CERT_URL,
        "UnsubscribeURL": f"https://sns.{REGION}.amazonaws.com/?Action=Unsubscribe&SubscriptionArn={topic_arn}:0",
    }
    return signer.sign(envelope) if signer is not None else envelope


def sqs_event(*envelopes: dict[str, Any], queue: str = "billing-subscriptions") -> dict[str, Any]:
    """The SQS event Lambda receives from the queue subscribed to the topic: one record per envelope."""
    records = []
    for envelope in envelopes:
        body = json.dumps(envelope)
        sent = datetime.fromisoformat(envelope["Timestamp"].replace("Z", "+00:00"))
        millis = str(int(sent.timestamp() * 1000))
        records.append(
            {
                "messageId": str(uuid.uuid5(uuid.NAMESPACE_URL, envelope["MessageId"])),
                "receiptHandle": f"AQEB-local-{envelope['MessageId']}",
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": millis,
                    "SenderId": "AIDAIT2UOQQY3AUEKVGXU",
                    "ApproximateFirstReceiveTimestamp": millis,
                },
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{REGION}:{SELLER_ACCOUNT}:{queue}",
                "awsRegion": REGION,
            }
        )
    return {"Records": records}


def registration_request(
    token: str, tenant_id: str | None = None, *, at: datetime | None = None, base64_body: bool = True
) -> dict[str, Any]:
    """The fulfillment URL POST as API Gateway HTTP API (payload format 2.0) delivers it."""
    form = urlencode({"x-amzn-marketplace-token": token, **({"tenant_id": tenant_id} if tenant_id else {})})
    moment = at or datetime(2026, 11, 26, 13, 5, tzinfo=UTC)
    return {
        "version": "2.0",
        "routeKey": "POST /aws/register",
        "rawPath": "/aws/register",
        "rawQueryString": "",
        "headers": {
            "content-type": "application/x-www-form-urlencoded",
            "origin": "https://aws.amazon.com",
            "host": "subscriptions.example.com",
        },
        "requestContext": {
            "accountId": SELLER_ACCOUNT,
            "apiId": "local",
            "domainName": "subscriptions.example.com",
            "domainPrefix": "subscriptions",
            "http": {
                "method": "POST",
                "path": "/aws/register",
                "protocol": "HTTP/1.1",
                "sourceIp": "198.51.100.7",
                "userAgent": "Mozilla/5.0",
            },
            "requestId": str(uuid.uuid5(uuid.NAMESPACE_URL, token)),
            "routeKey": "POST /aws/register",
            "stage": "$default",
            "time": moment.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(moment.timestamp() * 1000),
        },
        "body": base64.b64encode(form.encode()).decode() if base64_body else form,
        "isBase64Encoded": base64_body,
    }
