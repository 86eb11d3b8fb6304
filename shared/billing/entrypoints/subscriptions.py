"""The Subscriptions function's code: route an event by its shape, parse it with its marketplace's
adapter, record what it means (billing.services.subscriptions), answer in the caller's terms.

Shapes (one function, three triggers):
- an EventBridge event of source ``aws.agreement-marketplace`` (AWS agreement and license events);
- an SQS batch from the queue subscribed to the legacy AWS SaaS SNS topic (partial batch response);
- an API Gateway HTTP API (payload 2.0) request: ``POST /aws/register`` (the fulfillment URL),
  ``POST /gcp/pubsub`` (Procurement notifications by Pub/Sub push), ``POST /azure/webhook`` (SaaS
  fulfillment v2) and ``POST /azure/register`` (the landing page's resolve + activate).

A request whose signature, token or operation does not verify is answered 401/403 and writes nothing
(the adapters verify before anything is recorded); a malformed one 400; a marketplace API that cannot
answer 503, so the marketplace delivers again.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from aws_lambda_powertools import Logger
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.domain.errors import ConfigurationError, PermanentError, TransientError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from billing.adapters.azure_fulfillment import AzureSubscriptions
    from billing.adapters.gcp_procurement import GcpSubscriptions
    from billing.adapters.postgres_subscriptions import PostgresSubscriptionRepository
    from billing.bootstrap import Runtime
    from billing.domain.subscriptions import LifecycleEvent
    from billing.services.subscriptions import RecordOutcome, SubscriptionService

logger = Logger()


class SubscriptionSettings(BaseSettings):
    """The Subscriptions function's own settings (the marketplace adapters read theirs)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    # the seller's SaaS subscription topics (comma-separated ARNs): an SNS envelope from another topic
    # is refused; empty: any topic (the queue policy is then the only guard)
    aws_sns_topic_arns: str = Field(default="", validation_alias="BILLING_AWS_SNS_TOPIC_ARNS")

    @property
    def topic_arns(self) -> frozenset[str] | None:
        arns = frozenset(a.strip() for a in self.aws_sns_topic_arns.split(",") if a.strip())
        return arns or None


class Subscriptions:
    """What the function keeps warm: the service and the marketplace adapters it has needed so far
    (each built on first use, so a Google push never imports Azure's SDK)."""

    def __init__(self, runtime: Runtime, settings: SubscriptionSettings | None = None) -> None:
        self.runtime = runtime
        self.settings = settings or SubscriptionSettings()
        self._service: SubscriptionService | None = None
        self._repo: PostgresSubscriptionRepository | None = None
        self._gcp: GcpSubscriptions | None = None
        self._azure: AzureSubscriptions | None = None
        self._stack = contextlib.AsyncExitStack()

    async def service(self) -> SubscriptionService:
        if self._service is None:
            from billing.adapters.postgres_subscriptions import PostgresSubscriptionRepository
            from billing.domain.model import Marketplace
            from billing.services.subscriptions import SubscriptionService

            if not all(self.runtime.settings.lane_queue_url(m.value) for m in Marketplace):
                raise ConfigurationError(
                    "set BILLING_QUEUE_URL or every lane's BILLING_<MARKETPLACE>_QUEUE_URL (for final bills)"
                )
            self._repo = PostgresSubscriptionRepository(await self.runtime.pool())
            queue = await self.runtime.queue()
            self._service = SubscriptionService(
                self._repo, queue, self.runtime.settings.lookback_hours, clock=self.runtime.clock
            )
        return self._service

    async def repo(self) -> PostgresSubscriptionRepository:
        await self.service()
        assert self._repo is not None
        return self._repo

    async def gcp(self) -> GcpSubscriptions:
        if self._gcp is None:
            from billing.adapters import gcp_procurement
            from billing.bootstrap import _secret

            self._gcp = await gcp_procurement.create(self._stack, _secret)
        return self._gcp

    async def azure(self) -> AzureSubscriptions:
        if self._azure is None:
            from billing.adapters import azure_fulfillment
            from billing.bootstrap import _secret

            self._azure = await azure_fulfillment.create(self._stack, _secret, clock=self.runtime.clock)
        return self._azure

    async def record(self, events: list[LifecycleEvent]) -> list[RecordOutcome]:
        service = await self.service()
        outcomes = []
        for event in events:
            outcome = await service.record(event)
            logger.info(
                "subscription event",
                extra={
                    "subject": str(event.key),
                    "kind": event.kind.value,
                    "event_id": event.event_id,
                    "appended": outcome.appended,
                    "customer_id": outcome.recorded.customer_id,
                    "status": outcome.recorded.state.status.value,
                    "link_problem": outcome.recorded.link_problem,
                    "final_bills": outcome.final_bills,
                    # the end instant + the marketplace's final-metering window, for an operator's check
                    "final_deadline": outcome.final_deadline.isoformat() if outcome.final_deadline else None,
                },
            )
            outcomes.append(outcome)
        return outcomes

    async def close(self) -> None:
        await self._stack.aclose()


async def handle(subs: Subscriptions, event: Mapping[str, Any]) -> dict[str, Any]:
    """Route one invocation's event by its shape."""
    if isinstance(event.get("requestContext"), dict) and "http" in event["requestContext"]:
        return await _http(subs, event)
    records = event.get("Records")
    if isinstance(records, list):
        return await _sqs(subs, records)
    if event.get("source") == "aws.agreement-marketplace":
        return await _eventbridge(subs, event)
    raise PermanentError("not an EventBridge agreement event, an SQS batch or an HTTP API request")


async def _eventbridge(subs: Subscriptions, event: Mapping[str, Any]) -> dict[str, Any]:
    from billing.adapters.aws_subscriptions import NotALifecycleChange, parse_eventbridge

    detail = event.get("detail") if isinstance(event.get("detail"), dict) else {}
    agreement = (detail.get("agreement") or {}).get("id") if isinstance(detail, dict) else None
    # the parser is pure: the store's answer for this event's agreement is looked up first
    known: dict[str, str] = {}
    if isinstance(agreement, str):
        arn = await (await subs.repo()).license_for_agreement(agreement)
        if arn is not None:
            known[agreement] = arn
    try:
        parsed = parse_eventbridge(event, known.get)
    except NotALifecycleChange as exc:
        logger.info("event changes no subject", extra={"reason": str(exc)})
        return {"recorded": 0}
    # UnknownAgreementError (transient) propagates: EventBridge retries the invocation later
    outcomes = await subs.record([parsed])
    return {"recorded": sum(o.appended for o in outcomes)}


async def _sqs(subs: Subscriptions, records: list[Any]) -> dict[str, Any]:
    """The SNS-through-SQS batch: each record on its own; a failed one is reported back to SQS."""
    from billing.adapters.aws_subscriptions import NotALifecycleChange, parse_sqs_record

    failures = []
    for record in records:
        message_id = record.get("messageId") if isinstance(record, dict) else None
        try:
            event = parse_sqs_record(record, subs.settings.topic_arns)
            await subs.record([event])
        except NotALifecycleChange as exc:
            logger.info("message changes no subject", extra={"reason": str(exc), "message_id": message_id})
        except Exception as exc:  # the batch boundary: one bad record must not fail the others
            logger.warning(
                "subscription message failed",
                extra={"message_id": message_id, "error": f"{type(exc).__name__}: {exc}"},
            )
            failures.append({"itemIdentifier": message_id or ""})
    return {"batchItemFailures": failures}


def _answer(status: int, body: Mapping[str, Any]) -> dict[str, Any]:
    return {"statusCode": status, "headers": {"content-type": "application/json"}, "body": json.dumps(body)}


def _body(event: Mapping[str, Any]) -> str:
    raw = event.get("body") or ""
    if not isinstance(raw, str):
        raise _Refused(400, "the body is not text")
    if event.get("isBase64Encoded"):
        try:
            return base64.b64decode(raw, validate=True).decode()
        except ValueError:
            raise _Refused(400, "the body is not base64 text") from None
    return raw


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def _http(subs: Subscriptions, event: Mapping[str, Any]) -> dict[str, Any]:
    from billing.adapters.aws_subscriptions import MalformedEventError, RegistrationRefusedError
    from billing.adapters.azure_fulfillment import FulfillmentUnavailableError, RequestRejectedError
    from billing.adapters.gcp_procurement import ProcurementUnavailableError, PushRejectedError

    http = event["requestContext"]["http"]
    method, path = str(http.get("method", "")).upper(), str(http.get("path", event.get("rawPath", "")))
    headers = {str(k).lower(): v for k, v in (event.get("headers") or {}).items()}
    if method != "POST":
        return _answer(405, {"error": "POST only"})
    try:
        if path.endswith("/aws/register"):
            from billing.adapters.aws_subscriptions import register, registration_form

            form = registration_form(event)
            client = await subs.runtime.aws_client("meteringmarketplace")
            events = [await register(form, client, subs.runtime.clock())]
        elif path.endswith("/gcp/pubsub"):
            events = await (await subs.gcp()).receive(headers.get("authorization"), _body(event))
        elif path.endswith("/azure/webhook"):
            events = await (await subs.azure()).receive(headers.get("authorization"), _body(event))
        elif path.endswith("/azure/register"):
            fields = parse_qs(_body(event), max_num_fields=10)
            token, tenant = fields.get("token", [""])[0], fields.get("tenant_id", [""])[0]
            if not token or not tenant:
                raise _Refused(400, "token and tenant_id form fields are required")
            events = [await (await subs.azure()).register(token, tenant)]
        else:
            return _answer(404, {"error": "no such endpoint"})
    except (_Refused, PushRejectedError, RequestRejectedError) as exc:
        return _answer(exc.status, {"error": exc.reason})
    except (MalformedEventError, RegistrationRefusedError) as exc:
        return _answer(exc.status, {"error": str(exc)})
    except (ProcurementUnavailableError, FulfillmentUnavailableError, TransientError) as exc:
        logger.warning("marketplace unavailable", extra={"path": path, "error": str(exc)})
        return _answer(503, {"error": "the marketplace could not be reached; deliver again"})
    outcomes = await subs.record(events)
    return _answer(
        200,
        {
            "recorded": sum(o.appended for o in outcomes),
            "subjects": [
                {"subject": str(o.recorded.state.key), "customer_id": o.recorded.customer_id}
                for o in outcomes
            ],
        },
    )
