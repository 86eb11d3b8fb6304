"""The state an AWS subscription sample assumes, put in place on the embedded stack by `billing invoke`.

AWS names a subscription's license in some events only: an agreement event (Purchase Agreement Created,
Amended, Ended) carries just the agreement id, and the Subscriptions function finds its license through
an earlier License Updated event of the same agreement (AWS Marketplace Seller Guide, "Amazon
EventBridge events"); without one it raises UnknownAgreementError and EventBridge delivers the event
again later. A registration POST carries a token only AWS Marketplace issued. A fresh local stack has
neither, so before such an event is invoked the store records the agreement's License Updated event
(built as AWS delivers it, one minute before the event) and the AWS emulator knows the license, or the
emulator treats the posted token as one it issued. Each thing done is returned as a note to print.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from billing_local.stack import LocalStack

# the demo buyer and product (billing_local.lifecycle, billing_local.seed)
BUYER_ACCOUNT = "845735284135"
LICENSE_ACCOUNT = "794222239362"  # the account AWS License Manager writes in license ARNs it returns


def _license_arn(seed: str) -> str:
    # a stable l-… id per agreement (or token), so invoking the same sample twice names one license
    digest = hashlib.sha256(seed.encode()).hexdigest()[:32]
    return f"arn:aws:license-manager::{LICENSE_ACCOUNT}:license:l-{digest}"


def prepare_subscription_state(stack: LocalStack, event: Any) -> list[str]:
    """Put in place what ``event`` assumes AWS had sent or issued before; what was done, as notes."""
    if not isinstance(event, dict):
        return []
    if event.get("source") == "aws.agreement-marketplace":
        return asyncio.run(_license_for_agreement(stack, event))
    context = event.get("requestContext")
    http = context.get("http") if isinstance(context, dict) else None
    if isinstance(http, dict) and str(http.get("path", "")).endswith("/aws/register"):
        return _issued_token(stack, event)
    return []


async def _license_for_agreement(stack: LocalStack, event: dict[str, Any]) -> list[str]:
    from billing.adapters.aws_subscriptions import AGREEMENT_SOURCE, LICENSE_UPDATED, parse_eventbridge
    from billing.adapters.postgres import create_pool
    from billing.adapters.postgres_subscriptions import PostgresSubscriptionRepository
    from billing_local.emulators.aws_events import agreement_event
    from billing_local.seed import AWS_PRODUCT_CODE

    detail = event.get("detail")
    if event.get("source") != AGREEMENT_SOURCE or not isinstance(detail, dict):
        return []
    if str(event.get("detail-type", "")).startswith("License"):
        return []  # a license event names its license itself
    agreement = (detail.get("agreement") or {}).get("id")
    account = (detail.get("acceptor") or {}).get("accountId") or BUYER_ACCOUNT
    try:
        at = datetime.fromisoformat(str(event.get("time")).replace("Z", "+00:00"))
    except ValueError:
        return []  # the handler refuses the event itself
    if not isinstance(agreement, str) or not agreement:
        return []
    pool = await create_pool(stack.database_url, 1)
    try:
        repo = PostgresSubscriptionRepository(pool)
        if await repo.license_for_agreement(agreement) is not None:
            return []
        arn = _license_arn(agreement)
        license_event = agreement_event(
            LICENSE_UPDATED,
            agreement_id=agreement,
            account_id=account,
            at=at - timedelta(minutes=1),
            license_arn=arn,
            product_code=AWS_PRODUCT_CODE,
        )
        await repo.record(parse_eventbridge(license_event))
    finally:
        await pool.close()
    stack.metering.add_license(AWS_PRODUCT_CODE, account, arn, agreement)
    return [
        f"the local store knew no license for agreement {agreement}: recorded the License Updated event"
        f" AWS sends for it first ({arn.rsplit(':', 1)[-1]}, account {account})"
    ]


def _issued_token(stack: LocalStack, event: dict[str, Any]) -> list[str]:
    from billing.adapters.aws_subscriptions import MalformedEventError, registration_form
    from billing_local.seed import AWS_PRODUCT_CODE

    try:
        token = registration_form(event).token
    except MalformedEventError:
        return []  # the handler answers 400 itself
    if token in stack.metering.tokens:
        return []
    arn = _license_arn(token)
    stack.metering.issue_token(AWS_PRODUCT_CODE, BUYER_ACCOUNT, license_arn=arn, token=token)
    return [
        "the local AWS emulator takes the request's registration token as one it issued (account"
        f" {BUYER_ACCOUNT}, license {arn.rsplit(':', 1)[-1]}): ResolveCustomer redeems it once"
    ]
